"""Uploads whose content makes a decoder open other files: manifests, playlists, concatenation
scripts and session descriptions. ffmpeg picks its demuxer by content, so each of these is sent
as plain `audio`; each must be refused (415, its format named) before the file it names is
opened, so the answer for a file that exists is the answer for one that does not."""
from __future__ import annotations

import io
import subprocess
from pathlib import Path

import pytest
from PIL import Image

from conftest import PORTRAIT
from server_helpers import FAST, assert_clean_error, post
from sonic import UnsupportedMedia
from sonic.media import FFMPEG, load_audio, load_image


def _hls(target: str) -> bytes:
    return (f"#EXTM3U\n#EXT-X-VERSION:3\n#EXT-X-TARGETDURATION:10\n#EXT-X-MEDIA-SEQUENCE:0\n"
            f"#EXTINF:2.0,\n{target}\n#EXT-X-ENDLIST\n").encode()


def _hls_master(target: str) -> bytes:
    return f"#EXTM3U\n#EXT-X-STREAM-INF:BANDWIDTH=128000,CODECS=\"mp4a.40.2\"\n{target}\n".encode()


def _dash(target: str) -> bytes:
    return (f'<?xml version="1.0" encoding="UTF-8"?>\n<MPD xmlns="urn:mpeg:dash:schema:mpd:2011" type="static" '
            f'mediaPresentationDuration="PT2S" minBufferTime="PT1S" '
            f'profiles="urn:mpeg:dash:profile:isoff-on-demand:2011"><Period>'
            f'<AdaptationSet mimeType="audio/mp4"><Representation id="a" bandwidth="128000">'
            f'<BaseURL>{target}</BaseURL></Representation></AdaptationSet></Period></MPD>\n').encode()


def _concat(target: str) -> bytes:
    return f"ffconcat version 1.0\nfile '{target}'\n".encode()


def _imf(target: str) -> bytes:
    return (f'<?xml version="1.0" encoding="UTF-8"?>\n<CompositionPlaylist '
            f'xmlns="http://www.smpte-ra.org/schemas/2067-3/2016"><Id>urn:uuid:0</Id>'
            f'<ContentTitle>talk</ContentTitle><EditRate>25 1</EditRate><SegmentList><Segment><SequenceList><MainAudioSequence>'
            f'<ResourceList><Resource><TrackFileId>{target}</TrackFileId></Resource></ResourceList>'
            f'</MainAudioSequence></SequenceList></Segment></SegmentList></CompositionPlaylist>\n').encode()


def _sdp(_target: str) -> bytes:
    # an SDP opens network sockets, not files: refused all the same (no address is contacted)
    return b"v=0\no=- 0 0 IN IP4 127.0.0.1\ns=x\nc=IN IP4 127.0.0.1\nt=0 0\nm=audio 5004 RTP/AVP 0\n"


MANIFESTS = {"hls": _hls, "hls_master": _hls_master, "dash": _dash, "concat": _concat, "imf": _imf, "sdp": _sdp}


@pytest.fixture(scope="module")
def local_media(tmp_path_factory) -> dict[str, Path]:
    """Media files on the server's disk that an upload must not reach: an MP4 like the service's
    own outputs and a WAV; and paths to files that do not exist."""
    folder = tmp_path_factory.mktemp("server_files")
    mp4, wav = folder / "someone_elses.mp4", folder / "private.wav"
    for out in (mp4, wav):
        subprocess.run([FFMPEG, "-v", "error", "-y", "-f", "lavfi", "-i", "sine=f=440:d=2", str(out)], check=True)
    return {"mp4": mp4, "wav": wav, "missing": folder / "missing.mp4"}


def _targets(path: Path) -> list[str]:
    """The ways a manifest may name a local file: absolute, as a file: URL, relative."""
    return [str(path), f"file://{path}", path.name]


def _refusal(tmp_path: Path, manifest: bytes) -> tuple[str, str]:
    upload = tmp_path / "audio"                       # stored as the service stores uploads: no extension
    upload.write_bytes(manifest)
    with pytest.raises(UnsupportedMedia) as e:
        load_audio(upload, 60)
    return e.value.code, e.value.message


@pytest.mark.parametrize("kind", sorted(MANIFESTS))
def test_manifests_are_refused_alike_for_existing_and_missing_files(kind, local_media, tmp_path):
    build = MANIFESTS[kind]
    for existing in (local_media["mp4"], local_media["wav"]):
        for there, gone in zip(_targets(existing), _targets(local_media["missing"])):
            assert _refusal(tmp_path, build(there)) == _refusal(tmp_path, build(gone))
    code, message = _refusal(tmp_path, build(str(local_media["mp4"])))
    assert code == "unsupported_media" and "WAV" in message


@pytest.mark.parametrize("kind", ["dash", "concat", "imf"])
def test_recognised_manifests_are_named(kind, local_media, tmp_path):
    _, message = _refusal(tmp_path, MANIFESTS[kind](str(local_media["mp4"])))
    assert f"'{kind}'" in message


def test_a_manifest_with_a_media_extension_is_refused(local_media, tmp_path):
    """The name an upload arrives with plays no part: a DASH manifest named talk.mp4 is still one."""
    p = tmp_path / "talk.mp4"
    p.write_bytes(_dash(str(local_media["mp4"])))
    with pytest.raises(UnsupportedMedia, match="'dash'"):
        load_audio(p, 60)


def test_manifest_over_http_is_a_415_identical_for_existing_and_missing(make_client, local_media, tmp_path):
    client, _ = make_client()
    answers = []
    for target in (local_media["mp4"], local_media["missing"]):
        upload = tmp_path / "manifest.m4a"
        upload.write_bytes(_dash(f"file://{target}"))
        r = post(client, FAST, audio=upload)
        assert_clean_error(r, 415, "unsupported_media", "audio")
        answers.append({k: v for k, v in r.get_json()["error"].items()})
    assert answers[0] == answers[1] and "'dash'" in answers[0]["message"]


def test_documented_containers_still_decode(tmp_path):
    sources = {"wav": [], "mp3": [], "flac": [], "ogg": ["-c:a", "libvorbis"], "m4a": [],
               "webm": ["-c:a", "libopus"], "aac": [],
               # what Macs and phones' recorders write: refused as "not supported" before
               "aiff": [], "caf": [], "amr": ["-ar", "8000", "-ac", "1", "-c:a", "libopencore_amrnb"]}
    for ext, codec in sources.items():
        p = tmp_path / f"s.{ext}"
        subprocess.run([FFMPEG, "-v", "error", "-y", "-f", "lavfi", "-i", "sine=f=300:d=1.5", *codec, str(p)],
                       check=True)
        assert abs(len(load_audio(p, 60)) / 16_000 - 1.5) < 0.1, ext


def test_a_recording_whose_rate_is_no_speechs_is_refused_naming_it(tmp_path):
    """A 244-byte WAV that declares 1 Hz was 100 s of interpolated noise, rendered for 16 s; a
    telephone's 8 kHz still decodes."""
    import numpy as np
    import soundfile as sf
    noise = (np.random.default_rng(0).standard_normal(100) * 0.3).astype(np.float32)
    for rate in (1, 3999):
        sf.write(tmp_path / "low.wav", noise, rate, subtype="PCM_16")
        with pytest.raises(UnsupportedMedia, match=f"audio is at {rate} Hz, too low a sample rate for speech"):
            load_audio(tmp_path / "low.wav", 60)
    sf.write(tmp_path / "phone.wav", np.tile(noise, 80), 8000, subtype="PCM_16")
    assert len(load_audio(tmp_path / "phone.wav", 60)) == 16_000


def test_other_containers_are_refused_with_their_name(tmp_path):
    p = tmp_path / "audio"
    subprocess.run([FFMPEG, "-v", "error", "-y", "-f", "lavfi", "-i", "sine=f=300:d=1", "-f", "au", str(p)],
                   check=True)
    with pytest.raises(UnsupportedMedia, match="'au'"):
        load_audio(p, 60)


def test_images_only_in_the_documented_formats(tmp_path):
    for fmt in ("BMP", "TIFF", "GIF", "PPM", "AVIF"):  # AVIF: named from its brand (was "could not be decoded")
        buf = io.BytesIO()
        Image.open(PORTRAIT).save(buf, format=fmt)
        p = tmp_path / "image"
        p.write_bytes(buf.getvalue())
        with pytest.raises(UnsupportedMedia, match=f"image format {fmt} is not supported"):
            load_image(p, 10**7)



def test_a_png_with_a_huge_text_chunk_is_refused_in_the_apis_words(tmp_path):
    """Pillow's own words named its constant (PngImagePlugin.MAX_TEXT_CHUNK)."""
    from PIL import PngImagePlugin
    info = PngImagePlugin.PngInfo()
    info.add_text("Comment", "x" * 2_000_000, zip=True)  # 2 MB of text, a few kB compressed
    p = tmp_path / "photo.png"
    Image.open(PORTRAIT).save(p, format="PNG", pnginfo=info)
    with pytest.raises(UnsupportedMedia) as e:
        load_image(p, 10**7)
    assert "text metadata" in e.value.message and "PngImagePlugin" not in e.value.message


def _silence(path: Path, rate: int, layout: str, seconds: float, piped: bool = False) -> Path:
    """Silence made by ffmpeg; `piped`: written as a stream, so the file states no duration."""
    cmd = [FFMPEG, "-v", "error", "-y", "-f", "lavfi", "-i", f"anullsrc=r={rate}:cl={layout}", "-t", str(seconds),
           "-c:a", "flac", "-f", "flac"]
    if piped:
        path.write_bytes(subprocess.run([*cmd, "-"], check=True, capture_output=True).stdout)
    else:
        subprocess.run([*cmd, str(path)], check=True)
    return path


def test_a_recording_costlier_to_decode_than_its_size_says_is_refused_by_name(monkeypatch, tmp_path):
    """Decoding costs samples (rate x channels x seconds), not bytes: a small FLAC of silence at
    a high rate in many channels is refused past MAX_DECODE_SAMPLES, its rate and channels named,
    whether its container states its duration (refused before decoding) or not (decoding stops at
    the limit); a recording within the limit still decodes."""
    from sonic import AudioTooLong, media

    monkeypatch.setattr(media, "MAX_DECODE_SAMPLES", 2_000_000)  # 2.6 s of 8 channels at 96 kHz
    for name, piped in (("stated.flac", False), ("streamed.flac", True)):
        heavy = _silence(tmp_path / name, 96_000, "7.1", 4.0, piped)
        with pytest.raises(AudioTooLong, match="8 channel.* at 96000 Hz") as refused:
            load_audio(heavy, 60)
        assert refused.value.field == "audio"
    stream = media.probe_audio(_silence(tmp_path / "short.flac", 96_000, "7.1", 2.0))
    assert (stream.rate, stream.channels, stream.duration_s) == (96_000, 8, 2.0)
    within = tmp_path / "within.flac"
    subprocess.run([FFMPEG, "-v", "error", "-y", "-f", "lavfi", "-i", "sine=f=300:d=2:sample_rate=96000",
                    "-af", "pan=7.1|c0=c0|c1=c0", str(within)], check=True)
    assert abs(len(load_audio(within, 60)) / 16_000 - 2.0) < 0.05


def test_a_costly_recording_over_http_is_a_422_naming_the_audio(make_client, monkeypatch, tmp_path):
    from sonic import media

    monkeypatch.setattr(media, "MAX_DECODE_SAMPLES", 2_000_000)
    client, _ = make_client()
    r = post(client, FAST, audio=_silence(tmp_path / "heavy.flac", 96_000, "7.1", 4.0))
    assert_clean_error(r, 422, "audio_too_long", "audio")
    assert "96000 Hz" in r.get_json()["error"]["message"]


def test_a_silent_mix_of_many_channels_is_searched_without_holding_them(tmp_path):
    """A silent mix sends the decoder looking for a channel that holds speech. Measured by ffmpeg
    as it decodes, not held: 64 channels of 8-bit silence at 100 Hz (1 MB for 150 s) held every
    channel at 16 kHz at once, 3.7 GB (such a rate is now refused: here 4 kHz, 38 MB, 0.6 GB
    held). The speech on channel 40 of such a file is still found."""
    import resource

    import numpy as np
    import soundfile as sf

    from sonic import EmptyAudio
    from sonic.media import SAMPLE_RATE

    before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    silent = tmp_path / "silent.wav"
    with sf.SoundFile(silent, "w", 4000, 64, subtype="PCM_U8") as f:  # written in blocks: held, 77 MB
        for _ in range(150):
            f.write(np.zeros((4000, 64), np.int16))
    with pytest.raises(EmptyAudio):
        load_audio(silent, 300)
    assert (resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - before) / 1024 < 300  # MB
    speech = load_audio(Path(__file__).parent.parent / "examples" / "speech.flac", 60)
    many = np.zeros((len(speech), 64), np.float32)
    many[:, 40] = speech
    sf.write(tmp_path / "one_of_64.wav", many, SAMPLE_RATE, subtype="FLOAT")
    assert np.abs(load_audio(tmp_path / "one_of_64.wav", 60) - speech).max() < 1e-3
    # past 64 channels ffmpeg mixes none: said so, not "the file has no sound track"
    sf.write(tmp_path / "sixty_five.wav", np.zeros((SAMPLE_RATE // 5, 65), np.int16), SAMPLE_RATE)
    with pytest.raises(UnsupportedMedia, match="audio has 65 channels; at most 64 are supported"):
        load_audio(tmp_path / "sixty_five.wav", 60)
    # the levels are read from the meter's own lines, not from a tag that reads like one (a 500)
    sf.write(tmp_path / "pair.wav", np.stack([speech, -speech], 1), SAMPLE_RATE)
    tagged = tmp_path / "tagged.flac"
    subprocess.run([FFMPEG, "-v", "error", "-y", "-i", str(tmp_path / "pair.wav"), "-metadata",
                    "comment=RMS level dB: .", str(tagged)], check=True)
    assert len(load_audio(tagged, 60)) == len(speech)


def test_a_stream_whose_timestamps_never_advance_is_cut_at_its_bytes_not_held_whole(tmp_path):
    """ffmpeg's `-t` counts by timestamps: a Matroska file whose packets all say 0 made the 10 ms
    probe and the capped decode run to the file's end, every sample held in memory (4.75 MB of
    FLAC at 384 kHz: 3.7 GB and 25 s of CPU, then a 422). ffmpeg's output is cut by its bytes: the
    same 422 comes, and nothing is held. Run in a process of its own, whose peak memory is this."""
    import sys

    zero = tmp_path / "zero.mka"
    subprocess.run([FFMPEG, "-v", "error", "-y", "-f", "lavfi", "-i", "anullsrc=r=96000:cl=stereo", "-t", "600",
                    "-c:a", "flac", "-f", "matroska", "-bsf:a", "setts=pts=0:dts=0", str(zero)], check=True)
    script = (
        "import resource, sys\n"
        "from sonic import AudioTooLong\n"
        "from sonic.media import load_audio\n"
        "before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss\n"
        "try:\n"
        "    load_audio(sys.argv[1], 60)\n"
        "    print('decoded')\n"
        "except AudioTooLong as e:\n"
        "    print('refused', e.field)\n"
        "print((resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - before) // 1024)\n"
    )
    ran = subprocess.run([sys.executable, "-c", script, str(zero)], capture_output=True, text=True, timeout=120)
    assert ran.returncode == 0, ran.stderr
    answer, grown_mb = ran.stdout.split("\n")[:2]
    assert answer == "refused audio"
    assert int(grown_mb) < 100, grown_mb  # 600 s of 2 channels at 96 kHz held as the probe's WAV: 230 MB
