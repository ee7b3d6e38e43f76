"""A photo's colours in sRGB, whatever profile it was saved with.

Phones save in wide gamuts (an iPhone's photos are Display P3, with the profile embedded) and
cameras in Adobe RGB: the same numbers mean more saturated colours there than in sRGB, which is
what the video is (H.264 as players show it). Read as if they were sRGB, such a face came out
pale (a P3 portrait: 17 % less saturated). The embedded profile is applied once, at decoding.
"""

from __future__ import annotations

import io
import logging

from PIL import Image, ImageCms

log = logging.getLogger("sonic.media")
CONVERTIBLE_MODES = {"RGB": "RGB", "RGBA": "RGBA", "CMYK": "RGB", "L": "RGB"}  # mode -> the mode it comes out in
_SRGB = ImageCms.createProfile("sRGB")


def embedded_profile(im: Image.Image) -> bytes | None:
    """The ICC profile saved in the file, read before decoding (a reduced decode may drop it)."""
    icc = im.info.get("icc_profile")
    return icc if isinstance(icc, bytes) and icc else None


def to_srgb(im: Image.Image, icc: bytes | None) -> Image.Image:
    """`im` in sRGB when `icc` says it is in another space; as it is when it has no profile, an
    sRGB one, a mode the profile cannot apply to, or a profile that cannot be read (a broken
    profile must not cost the request: its colours were wrong before too)."""
    if icc is None:
        return im
    if im.mode == "LA":  # a transform takes grey with alpha as colour with alpha
        im = im.convert("RGBA")
    if im.mode not in CONVERTIBLE_MODES:
        return im
    try:
        source = ImageCms.ImageCmsProfile(io.BytesIO(icc))
        if _is_srgb(source):
            return im
        converted = ImageCms.profileToProfile(im, source, _SRGB, outputMode=CONVERTIBLE_MODES[im.mode])
        return converted if converted is not None else im  # None only when asked to convert in place
    except (ImageCms.PyCMSError, OSError, ValueError, TypeError) as e:
        log.info("the image's colour profile could not be applied (%s); its colours are taken as sRGB", e)
        return im


def _is_srgb(profile: ImageCms.ImageCmsProfile) -> bool:
    """The common case, not worth a transform: a profile that names itself sRGB."""
    try:
        name = ImageCms.getProfileDescription(profile)
    except ImageCms.PyCMSError:
        return False
    name = name.lower().replace(" ", "")
    return "srgb" in name and "linear" not in name  # linear sRGB has sRGB's primaries, not its curve
