import io

import numpy as np
import pytest
import soundfile as sf
from PIL import Image

from sonic import AudioTooLong, EmptyAudio, InputTooLarge, UnsupportedMedia
from sonic.media import FFMPEG, SAMPLE_RATE, check_waveform, load_audio, load_image
from conftest import PORTRAIT, SPEECH


def test_portrait_decodes():
    rgb = load_image(PORTRAIT, 10**7)
    assert rgb.shape == (300, 256, 3) and rgb.dtype == np.uint8


def test_not_an_image(tmp_path):
    p = tmp_path / "x.jpg"
    p.write_bytes(b"this is text, not a picture" * 20)
    with pytest.raises(UnsupportedMedia) as e:
        load_image(p, 10**7)
    assert e.value.field == "image" and e.value.code == "unsupported_media"


def test_a_large_file_that_is_no_image_is_refused_from_its_first_bytes():
    """A 2 GB file of anything else was read whole into memory before it was refused: only its
    head is read now, and a GIF is still named as one."""
    class Endless(io.RawIOBase):
        asked = 0

        def read(self, n=-1):
            self.asked += n if n >= 0 else 1 << 40
            return b"\x00" * (n if 0 <= n <= 1 << 20 else 1 << 20)

    endless = Endless()
    with pytest.raises(UnsupportedMedia, match="not a PNG, JPEG or WebP"):
        load_image(endless, 10**7)
    assert endless.asked <= 4096
    gif = io.BytesIO()
    Image.new("RGB", (64, 64)).save(gif, format="GIF")
    with pytest.raises(UnsupportedMedia, match="image format GIF is not supported"):
        load_image(io.BytesIO(gif.getvalue()), 10**7)


def test_truncated_image(tmp_path):
    p = tmp_path / "t.jpg"
    p.write_bytes(PORTRAIT.read_bytes()[:3000])
    with pytest.raises(UnsupportedMedia) as e:
        load_image(p, 10**7)
    assert "truncated" in e.value.message  # the fault named, not "OSError"


def test_unsupported_image_format(tmp_path):
    p = tmp_path / "x.png"
    Image.new("RGB", (64, 64)).save(p, format="BMP")
    with pytest.raises(UnsupportedMedia, match="image format BMP is not supported"):
        load_image(p, 10**7)
    # an iPhone's default format, which Pillow cannot name: named by its file type box
    heic = tmp_path / "IMG_0001.HEIC"
    heic.write_bytes(b"\0\0\0\x18ftypheic\0\0\0\0mif1heic" + bytes(2000))
    with pytest.raises(UnsupportedMedia, match=r"image format HEIC/HEIF \(an iPhone's photo format\)"):
        load_image(heic, 10**7)
    avif = tmp_path / "photo.avif"  # an AVIF under HEIF's major brand, its own among the compatible ones
    avif.write_bytes(b"\0\0\0\x1cftypmif1\0\0\0\0mif1avifmiaf" + bytes(2000))
    with pytest.raises(UnsupportedMedia, match=r"image format AVIF is not supported"):
        load_image(avif, 10**7)


def test_too_many_pixels_refused_before_decoding(tmp_path):
    p = tmp_path / "big.png"
    Image.new("L", (3000, 3000)).save(p)
    with pytest.raises(InputTooLarge):
        load_image(p, 1_000_000)


def test_a_phones_100_mp_jpeg_is_taken_a_png_as_large_is_not(tmp_path):
    """A JPEG is decoded reduced in the DCT: 4x the pixel limit (phones' 48-108 MP photos);
    a PNG is decoded whole: the limit itself; each refusal names its format's limit."""
    jpeg, png, huge = tmp_path / "phone.jpg", tmp_path / "big.png", tmp_path / "huge.jpg"
    Image.open(PORTRAIT).resize((12000, 9000), Image.NEAREST).save(jpeg, quality=80)  # 108 MP
    rgb = load_image(jpeg, 40_000_000)
    assert rgb.shape[0] * rgb.shape[1] <= 16_000_000 and abs(rgb.shape[1] / rgb.shape[0] - 12000 / 9000) < 0.01
    Image.new("L", (7000, 6000)).save(png, compress_level=1)  # 42 MP
    with pytest.raises(InputTooLarge, match="limit of 40000000 for a PNG") as refused:
        load_image(png, 40_000_000)
    assert refused.value.message.endswith("scale it down, or save it as a baseline JPEG")  # what to do
    Image.new("L", (14000, 12000)).save(huge, quality=50)  # 168 MP
    with pytest.raises(InputTooLarge, match="limit of 160000000 for a JPEG") as refused:
        load_image(huge, 40_000_000)
    assert refused.value.message.endswith("): scale it down")  # a baseline JPEG already


def test_a_progressive_jpeg_has_the_pngs_limit_and_a_phones_mpo_the_jpegs(tmp_path):
    """A progressive JPEG holds all its coefficients while it decodes: no 4x. A JPEG carrying a
    second image (MPF, as phones' gain-map photos do) is what Pillow calls MPO: a JPEG still."""
    photo = Image.open(PORTRAIT).resize((2000, 1000))  # 2 MP against a limit of 1 MP
    baseline, progressive, mpo = tmp_path / "b.jpg", tmp_path / "p.jpg", tmp_path / "m.jpg"
    photo.save(baseline)
    photo.save(progressive, progressive=True)
    photo.save(mpo, "MPO", save_all=True, append_images=[photo.resize((200, 100))])
    assert Image.open(mpo).format == "MPO"
    for path in (baseline, mpo):
        assert load_image(path, 1_000_000).shape[:2] == (1000, 2000)
    with pytest.raises(InputTooLarge, match="limit of 1000000 for a progressive JPEG"):
        load_image(progressive, 1_000_000)


def test_grayscale_alpha_and_exif(tmp_path):
    g = tmp_path / "g.png"
    Image.open(PORTRAIT).convert("L").save(g)
    assert load_image(g, 10**7).shape == (300, 256, 3)
    a = tmp_path / "a.png"
    im = Image.open(PORTRAIT).convert("RGBA")
    im.putalpha(0)
    im.save(a)
    assert load_image(a, 10**7).min() == 255          # fully transparent -> white
    r = tmp_path / "r.jpg"
    exif = Image.Exif()
    exif[0x0112] = 6                                   # rotate 90 degrees clockwise on display
    Image.open(PORTRAIT).save(r, exif=exif)
    assert load_image(r, 10**7).shape == (256, 300, 3)


def test_a_16_bit_greyscale_png_keeps_its_tones(tmp_path):
    """Pillow opens it as "I;16", whose convert("RGB") clips every tone above 255 to white."""
    grey = np.asarray(Image.open(PORTRAIT).convert("L"))
    p = tmp_path / "g16.png"
    Image.fromarray(grey.astype(np.uint16) * 257).save(p)
    rgb = load_image(p, 10**7)
    assert rgb.shape == (300, 256, 3) and np.abs(rgb[..., 1].astype(int) - grey).max() <= 1


def test_audio_resampled_to_mono_16k(tmp_path):
    wav, sr = sf.read(SPEECH, dtype="float32")
    p = tmp_path / "stereo44.wav"
    t = np.arange(int(len(wav) / sr * 44100)) / 44100
    tone = 0.3 * np.sin(2 * np.pi * 220 * t).astype(np.float32)
    sf.write(p, np.stack([tone, tone], 1), 44100)
    out = load_audio(p, 60)
    assert out.dtype == np.float32 and out.ndim == 1
    assert abs(len(out) / SAMPLE_RATE - len(t) / 44100) < 0.02


def test_mp3_and_ogg_decode(tmp_path):
    import subprocess
    for ext in ("mp3", "ogg", "m4a"):
        p = tmp_path / f"s.{ext}"
        subprocess.run([FFMPEG, "-v", "error", "-y", "-i", str(SPEECH), str(p)], check=True)
        assert abs(len(load_audio(p, 60)) / SAMPLE_RATE - 3.0) < 0.1


def test_empty_silent_and_bad_audio(tmp_path):
    e = tmp_path / "empty.wav"
    sf.write(e, np.zeros(0, np.float32), 16000)
    with pytest.raises((EmptyAudio, UnsupportedMedia)):
        load_audio(e, 60)
    s = tmp_path / "silent.wav"
    sf.write(s, np.zeros(32000, np.float32), 16000)
    with pytest.raises(EmptyAudio) as err:
        load_audio(s, 60)
    assert err.value.code == "empty_audio"
    quiet = tmp_path / "quiet.wav"  # speech 40 dB down: its level is named, and what is asked
    sf.write(quiet, load_audio(SPEECH, 60) * 0.01, 16000)
    with pytest.raises(EmptyAudio) as err:
        load_audio(quiet, 60)
    assert err.value.message == ("audio is silent or too quiet (its loudest 0.5 s is -60 dBFS RMS; speech must "
                                 "reach -55 dBFS): if it holds speech, raise its level")
    # judged where the speech is: quiet speech followed by silence was refused for the silence
    padded = tmp_path / "quiet_then_silence.wav"
    speech = load_audio(SPEECH, 60) * 0.03
    sf.write(padded, np.concatenate([speech, np.zeros(2 * len(speech), np.float32)]), 16000)
    assert 20 * np.log10(np.sqrt(np.mean(load_audio(padded, 60).astype(np.float64) ** 2))) < -55

    b = tmp_path / "noise.mp3"
    b.write_bytes(bytes(np.random.default_rng(0).integers(0, 256, 5000, dtype=np.uint8)))
    with pytest.raises(UnsupportedMedia, match="not in a recognised format"):
        load_audio(b, 60)


def test_a_recording_given_as_the_photo_says_so(tmp_path):
    """A recording sent as the image (the two fields swapped) is named, as an image sent as the
    audio is: it was "could not be decoded: not a PNG, JPEG or WebP"."""
    import subprocess

    made = {}
    for name, args in (("speech.wav", []), ("speech.mp3", []), ("speech.m4a", ["-c:a", "aac"]),
                       ("speech.webm", ["-c:a", "libopus"]), ("speech.ogg", ["-c:a", "libopus"])):
        made[name] = tmp_path / name
        subprocess.run([FFMPEG, "-v", "error", "-i", str(SPEECH), *args, str(made[name])], check=True)
    for name, kind in (("speech.wav", "a WAV recording"), ("speech.mp3", "an MP3 recording"),
                       ("speech.m4a", "an MP4, M4A or MOV file (a recording or a video)"),
                       ("speech.webm", "a WebM or Matroska file (a recording or a video)"),
                       ("speech.ogg", "an Ogg recording (Opus, Vorbis)")):
        with pytest.raises(UnsupportedMedia) as err:
            load_image(io.BytesIO(made[name].read_bytes()), 10**7)
        assert err.value.message == f"image is {kind}, not a picture (are the image and the audio swapped?)", name
    with pytest.raises(UnsupportedMedia) as err:
        load_image(io.BytesIO(SPEECH.read_bytes()), 10**7)
    assert err.value.message.startswith("image is a FLAC recording, not a picture")


def test_a_recording_past_the_limit_says_how_long_it_is(tmp_path):
    long = tmp_path / "long.wav"
    sf.write(long, 0.1 * np.sin(np.arange(12 * SAMPLE_RATE, dtype=np.float32) / 5), SAMPLE_RATE)
    with pytest.raises(AudioTooLong) as err:
        load_audio(long, 5)
    assert err.value.message == "audio lasts 12 s, longer than the limit of 5 s: trim it, or send it in parts"


def test_audio_that_is_not_a_recording_says_what_it_is(tmp_path):
    """An empty file, the portrait given as the recording, a video without sound: each named as
    such (they read "not in a recognised format", "format 'jpeg_pipe' is not supported" and
    "could not be decoded as mov")."""
    import subprocess

    empty = tmp_path / "empty.wav"
    empty.write_bytes(b"")
    silent_video = tmp_path / "no_sound.mp4"
    subprocess.run([FFMPEG, "-v", "error", "-f", "lavfi", "-i", "testsrc=size=64x64:rate=10:duration=1",
                    "-pix_fmt", "yuv420p", str(silent_video)], check=True)
    cut = tmp_path / "cut.flac"  # the start of a FLAC: its header and no whole frame
    cut.write_bytes(SPEECH.read_bytes()[:6000])
    no_rate = tmp_path / "no_rate.wav"  # a WAV header that says 0 Hz
    with sf.SoundFile(no_rate, "w", 16000, 1, subtype="PCM_16") as f:
        f.write(np.zeros(1600, np.int16))
    no_rate.write_bytes(no_rate.read_bytes()[:24] + b"\0\0\0\0" + no_rate.read_bytes()[28:])
    # an M4A whose upload stopped early: its index (the moov box) comes at its end, and none came
    # ("has no sound track", as a video without sound is told); an MP3 cut inside its cover art
    # ("not in a recognised format")
    m4a, cut_m4a, cut_mp3 = tmp_path / "whole.m4a", tmp_path / "cut.m4a", tmp_path / "cut.mp3"
    subprocess.run([FFMPEG, "-v", "error", "-i", str(SPEECH), "-c:a", "aac", str(m4a)], check=True)
    cut_m4a.write_bytes(m4a.read_bytes()[: m4a.stat().st_size // 2])
    tag = 200_000  # ID3v2: "ID3", version, flags, then the size in four bytes of 7 bits
    cut_mp3.write_bytes(b"ID3\x04\x00\x00" + bytes((tag >> s) & 0x7F for s in (21, 14, 7, 0)) + b"\0" * 30_000)
    for path, words in ((empty, "audio file is empty (0 bytes)"),
                        (cut_m4a, "audio: the mov file cannot be opened: it is cut short (an MP4 or M4A not written "
                                  "for streaming keeps its index at its end: none came) or damaged; an upload or a "
                                  "recorder that stopped early leaves such a file"),
                        (cut_mp3, "audio is an MP3 cut short: its tag (ID3: the title, cover art...) takes 200010 "
                                  "bytes and the file ends at 30010, before any sound: the upload or the download "
                                  "stopped early"),
                        (PORTRAIT, "audio is a JPEG image, not a recording (are the image and the audio swapped?)"),
                        (silent_video, "audio: the file (mov) has no sound track"),
                        (cut, "audio: the flac file holds no sound that can be read: it is cut short, or its header "
                              "is damaged (sample rate, channels, sample size)"),
                        (no_rate, "audio: the wav file holds no sound that can be read: it is cut short, or its "
                                  "header is damaged (sample rate, channels, sample size)")):
        with pytest.raises(UnsupportedMedia) as err:
            load_audio(path, 60)
        assert err.value.message == words and err.value.field == "audio"


def test_channels_in_opposite_phase_do_not_cancel_to_silence(tmp_path):
    speech = load_audio(SPEECH, 60)
    p = tmp_path / "antiphase.wav"
    sf.write(p, np.stack([speech, -speech], 1), 16000)
    assert np.abs(load_audio(p, 60) - speech).max() < 1e-3  # the first channel, not their silent mix


def test_audio_too_long(tmp_path):
    p = tmp_path / "long.wav"
    sf.write(p, 0.1 * np.ones(16000 * 5, np.float32), 16000)
    with pytest.raises(AudioTooLong):
        load_audio(p, 3)


def test_waveform_in_memory_checked_as_a_file_is():
    """check_waveform: the checks load_audio makes, with the same codes and messages."""
    cases = [(np.zeros(100, np.float32), EmptyAudio, "audio is empty (less than 0.1 s decoded)"),
             (np.zeros(SAMPLE_RATE, np.float32), EmptyAudio, "audio is silent (digital silence; speech must reach -55 dBFS RMS)"),
             (0.1 * np.ones(SAMPLE_RATE * 5, np.float32), AudioTooLong, "audio is longer than the limit of 3 s"),
             (np.zeros((SAMPLE_RATE, 2), np.float32), UnsupportedMedia, None)]
    for wav, error, message in cases:
        with pytest.raises(error) as e:
            check_waveform(wav, 3)
        assert e.value.field == "audio" and (message is None or e.value.message == message)
    wav = 1.5 * np.sin(np.arange(SAMPLE_RATE, dtype=np.float32) / 7)
    wav[0] = np.nan
    out = check_waveform(wav, 3)
    assert out.dtype == np.float32 and abs(out[0]) < 1e-3 and out.max() == 1.0 and np.isnan(wav[0])  # the caller's array untouched
    # ... but a waveform made mostly of them is damaged, not silent
    wav[::2] = np.nan
    with pytest.raises(UnsupportedMedia, match="audio is damaged: 50 % of its samples are not numbers"):
        check_waveform(wav, 3)
    # a DC offset is no sound: a constant level is as silent as zeros, and is taken out of speech
    with pytest.raises(EmptyAudio, match="silent"):
        check_waveform(np.full(SAMPLE_RATE, 0.2, np.float32), 3)
    assert abs(check_waveform(0.3 + 0.1 * np.sin(np.arange(SAMPLE_RATE) / 7), 3).mean()) < 1e-3
    # 16-bit PCM as a caller has it is scaled, not clipped to full scale (a square wave)
    tone = np.sin(np.arange(SAMPLE_RATE) / 10)
    out = check_waveform((8000 * tone).astype(np.int16), 3)
    assert out.dtype == np.float32 and np.abs(out - 8000 / 32768 * tone).max() < 5e-4  # (less its DC)


def test_webp_decodes(tmp_path):
    p = tmp_path / "p.webp"
    Image.open(PORTRAIT).save(p, format="WEBP")
    assert load_image(p, 10**7).shape == (300, 256, 3)


def test_many_channels_are_averaged(tmp_path):
    """Layouts ffmpeg cannot downmix by itself (9 to 64 channels, none named) are averaged."""
    t = np.arange(SAMPLE_RATE) / SAMPLE_RATE
    tone = (0.3 * np.sin(2 * np.pi * 220 * t)).astype(np.float32)
    for channels in (9, 64):
        p = tmp_path / f"c{channels}.wav"
        sf.write(p, np.tile(tone[:, None], (1, channels)), SAMPLE_RATE)
        out = load_audio(p, 60)
        assert len(out) == SAMPLE_RATE and abs(out.std() - tone.std()) < 0.01


def test_the_sound_track_of_many_channels_is_their_average_at_the_sound_rate(tmp_path):
    """9 to 64 channels (no layout ffmpeg downmixes): the sound track is their average on both
    sides at SOUND_RATE, as the analysis copy is their average (it was the 16 kHz analysis copy,
    with a warning that the track is a stand-in)."""
    from sonic.media import SOUND_RATE
    from sonic.sound import load_sound
    t = np.arange(SOUND_RATE) / SOUND_RATE
    tone = (0.3 * np.sin(2 * np.pi * 220 * t)).astype(np.float32)
    for channels in (9, 64):
        p = tmp_path / f"c{channels}.wav"
        sf.write(p, np.tile(tone[:, None], (1, channels)), SOUND_RATE, subtype="FLOAT")
        sound = load_sound(p, 60, load_audio(p, 60))
        assert sound.rate == SOUND_RATE and not sound.stand_in and sound.stand_in_warning() is None
        both = sound.samples.astype(np.float64) / 32767
        assert both.shape == (SOUND_RATE, 2) and abs(both.std() - tone.std()) < 0.01


def test_large_photos_are_decoded_reduced(tmp_path):
    """Reduced to what max_working_pixels allows, not by a whole factor past it."""
    from sonic.media import WORKING_PIXELS
    jpeg = tmp_path / "big.jpeg"
    Image.open(PORTRAIT).resize((5120, 6000)).save(jpeg, format="JPEG")  # 30.7 MP: reduced in the DCT
    png = tmp_path / "big.png"
    Image.open(PORTRAIT).resize((2560, 3000)).save(png, format="PNG", compress_level=1)
    for path, working in ((jpeg, WORKING_PIXELS), (png, 2_000_000)):
        rgb = load_image(path, 40_000_000, max_working_pixels=working)
        assert rgb.shape[0] * rgb.shape[1] <= working
        # as many pixels as allowed: halved each way, a 24 MP phone photo kept 6 MP of 16
        assert abs(rgb.shape[0] / rgb.shape[1] - 6000 / 5120) < 0.01 and rgb.shape[0] * rgb.shape[1] >= 0.99 * working
    small = load_image(PORTRAIT, 40_000_000, max_working_pixels=10_000)
    assert small.shape[0] * small.shape[1] <= 10_000


@pytest.mark.parametrize("size", [(7999, 7999), (9236, 6927), (5712, 4284), (8064, 6048)])
def test_a_decodes_reservation_is_what_pillow_decodes(tmp_path, size):
    """The reservation counts the buffer of the size Pillow's draft really decodes at (an odd
    size near 64 MP was counted at half of each side, and decoded whole: 190 MB unreserved);
    the result keeps at least 60 % of the working pixels."""
    from sonic.media import WORKING_PIXELS, decode_bytes, decode_plan
    path = tmp_path / "phone.jpg"
    Image.new("RGB", size, (120, 90, 80)).save(path, quality=30)
    with Image.open(path) as im:
        plan = decode_plan(im, WORKING_PIXELS)
        reserved = decode_bytes(im, WORKING_PIXELS)
        if plan.dct > 1:
            im.draft("RGB", (size[0] // plan.dct, size[1] // plan.dct))
        im.load()
        assert reserved >= im.size[0] * im.size[1] * 4 + plan.size[0] * plan.size[1] * 4 * 3
    rgb = load_image(path, 100_000_000)
    assert 0.6 * WORKING_PIXELS <= rgb.shape[0] * rgb.shape[1] <= WORKING_PIXELS


def test_large_palette_and_one_bit_images_are_reduced_smoothly(tmp_path):
    """Pillow resizes palette and 1-bit images by the nearest pixel: they are converted first
    (a dithered image's reduction was 18-41 grey levels off its average)."""
    rng = np.random.default_rng(0)
    dots = Image.fromarray((rng.random((2000, 2400)) < 0.5).astype(np.uint8) * 255).convert("1")
    for mode in ("1", "P"):
        path = tmp_path / f"{mode}.png"
        (dots if mode == "1" else dots.convert("RGB").convert("P")).save(path)
        rgb = load_image(path, 10**7, max_working_pixels=1_000_000).astype(float)
        assert abs(rgb.mean() - 127.5) < 10 and rgb.std() < 40  # an even grey, not black and white dots


def test_decode_budget_waits_then_refuses_busy():
    import threading
    import time
    from sonic import Busy
    from sonic.media import DecodeBudget
    budget = DecodeBudget(100, wait_s=0.2)
    with budget.reserve(80):
        with pytest.raises(Busy) as e:
            with budget.reserve(30):
                pass
        assert e.value.code == "busy"
        with budget.reserve(20):                     # what fits goes ahead
            pass
    with budget.reserve(10**9):                      # alone, a decode larger than the budget runs
        assert budget.in_use == 100
    holding = threading.Event()

    def hold_briefly():
        with budget.reserve(90):
            holding.set()
            time.sleep(0.1)

    holder = threading.Thread(target=hold_briefly)
    holder.start()
    holding.wait(1)
    t0 = time.monotonic()
    with budget.reserve(50):                         # waits for the holder, within wait_s
        assert 0.03 < time.monotonic() - t0 < 0.2 and budget.in_use == 50
    holder.join()
    assert budget.in_use == 0


def test_the_sound_track_plays_the_recording_as_a_listener_should_hear_it(tmp_path):
    """The video's sound: a mono recording at its own level (ffmpeg's upmix lowered it 3 dB), a
    miswired pair in opposite phase and speech on one side in the middle (silent when mixed to
    mono; in one ear), non-finite samples silent (full-scale clicks), a float recording over full
    scale brought down (not clipped), no DC offset; speech on the LFE channel alone, which the
    mix leaves out, is still found and heard."""
    from sonic.sound import load_sound

    speech = load_audio(SPEECH, 60)
    level = float(np.sqrt(np.mean(speech.astype(np.float64) ** 2)))

    def sound_of(name, samples, subtype="FLOAT"):
        p = tmp_path / name
        sf.write(p, samples, 16000, subtype=subtype)
        out = load_sound(p, 60, load_audio(p, 60)).samples.astype(np.float64) / 32767
        assert out.shape[1] == 2, name  # stereo, as the README says, whichever way it was made
        return out

    def db(x):
        return 20 * np.log10(np.sqrt(np.mean(x ** 2)) / level)

    mono = sound_of("mono.wav", speech, "PCM_16")
    assert abs(db(mono[:, 0])) < 0.3 and abs(db(mono[:, 1])) < 0.3
    for name, pair in (("opposite.wav", np.stack([speech, -speech], 1)),
                       ("right.wav", np.stack([np.zeros_like(speech), speech], 1))):
        out = sound_of(name, pair, "PCM_16")
        assert np.corrcoef(out[:, 0], out[:, 1])[0, 1] > 0.99 and abs(db(out.mean(axis=1))) < 0.5, name
    damaged = 10 * speech
    damaged[[20000, 30000]] = np.nan, np.inf
    out = sound_of("damaged.wav", damaged + 0.3)
    assert np.all(np.isfinite(out)) and np.mean(np.abs(out) > 0.99) < 1e-3 and np.abs(out.mean(axis=0)).max() < 1e-3
    lfe = np.zeros((len(speech), 6), np.float32)
    lfe[:, 3] = speech
    out = sound_of("lfe.wav", lfe)
    assert abs(db(out[:, 0])) < 1.0 and abs(db(out[:, 1])) < 1.0


def test_audio_decodes_at_once_are_bounded_and_one_more_is_busy(monkeypatch):
    """Request threads decoding uploads (check_inputs) hold at most AUDIO_DECODES slots at once:
    one more waits, then is refused busy (503 with Retry-After), not run beside them. A decode
    outside a request (a job's, the library's) takes no slot: it never waits behind uploads."""
    import threading

    from sonic import Busy, GenerateOptions, media
    from sonic.checks import check_inputs
    from sonic.settings import Limits

    monkeypatch.setattr(media, "_audio_decodes", threading.BoundedSemaphore(1))
    monkeypatch.setattr(media, "AUDIO_DECODE_WAIT_S", 0.2)
    with media.upload_decode():  # an upload under way
        with pytest.raises(Busy, match="retry shortly"):
            check_inputs(PORTRAIT, SPEECH, GenerateOptions(), Limits())
        assert len(load_audio(SPEECH, 60)) == 3 * SAMPLE_RATE
    assert len(check_inputs(PORTRAIT, SPEECH, GenerateOptions(), Limits()).wav) == 3 * SAMPLE_RATE


def test_at_most_as_many_uploads_wait_for_a_decode_as_decode_and_one_more_is_busy_at_once():
    """Each waiting upload holds a server thread: 48 uploads of a file costly to decode held all
    of waitress's 48 threads for 30 s, /health unanswered. As many as decode may wait; one more
    is refused busy at once. The same for images waiting for the decode budget."""
    import threading
    import time

    from sonic import Busy, media
    from sonic.media import DecodeBudget

    go, inside = threading.Event(), threading.Semaphore(0)

    def upload():
        with media.upload_decode():
            inside.release()
            go.wait(10)

    uploads = [threading.Thread(target=upload) for _ in range(2 * media.AUDIO_DECODES)]
    for t in uploads:
        t.start()
    try:
        for _ in range(media.AUDIO_DECODES):  # these decode; as many wait behind them
            assert inside.acquire(timeout=5)
        time.sleep(0.2)
        t0 = time.monotonic()
        with pytest.raises(Busy, match="retry shortly"):
            with media.upload_decode():
                pass
        assert time.monotonic() - t0 < 1.0  # not after AUDIO_DECODE_WAIT_S (30 s)
    finally:
        go.set()
        for t in uploads:
            t.join(10)
    with media.upload_decode():  # all of them gone, the next one decodes
        pass

    budget = DecodeBudget(100, wait_s=30, max_waiting=1)
    with budget.reserve(100):
        def wait_then_decode():
            with budget.reserve(50):
                pass

        waiter = threading.Thread(target=wait_then_decode)
        waiter.start()
        time.sleep(0.2)
        t0 = time.monotonic()
        with pytest.raises(Busy):
            with budget.reserve(50):
                pass
        assert time.monotonic() - t0 < 1.0
    waiter.join(5)
    assert budget.in_use == 0 and budget.waiting == 0


def test_a_wav_header_is_read_safely_and_a_streaming_size_is_no_length(tmp_path):
    """A WAV's declared length (its data chunk's size) tells a file cut short; the sizes that
    recorders write while they stream (0, 0x7FFFFFFF, all ones) tell nothing, and a header whose
    chunks run past what is read (a large JUNK chunk before fmt) is no length either, not a 500."""
    import struct

    import numpy as np
    import soundfile as sf

    from sonic.sound import load_sound

    plain = tmp_path / "plain.wav"
    sf.write(plain, (np.sin(np.arange(48000) / 8) * 0.3).astype(np.float32), 16000, subtype="PCM_16")
    data = plain.read_bytes()
    at = data.index(b"data")

    def warning(raw: bytes) -> str | None:
        path = tmp_path / "x.wav"
        path.write_bytes(raw)
        wav = load_audio(path, 60)
        return load_sound(path, 60, wav).cut_short(len(wav) / SAMPLE_RATE)

    assert warning(data) is None
    assert "cut short" in warning(data[: at + 8 + 32000])
    for size in (0x7FFFEFFC, 0x7FFFFFFF, 0xFFFFFFFF):  # the first: sox's, rounded down to whole samples
        assert warning(data[: at + 4] + struct.pack("<I", size) + data[at + 8 :]) is None
    junk = b"JUNK" + struct.pack("<I", 65498) + bytes(65498)  # fmt's byte rate straddles the 64 KB read
    padded = data[:12] + junk + data[12:]
    riff = struct.pack("<I", len(padded) - 8)
    padded = padded[:4] + riff + padded[8:]
    assert warning(padded[: len(padded) - 40000]) is None  # fmt beyond the header read: no length, no error



def test_a_few_samples_that_are_not_numbers_are_counted_and_silenced_at_the_files_own_rate(tmp_path):
    """Resampled first, each NaN spread over the resampler's filter: 0.05 % of a 44.1 kHz file's
    samples became 5 % at 16 kHz (refused as damaged), and each left a gap of silence in the
    sound track. More than 1 % of the file's own samples is still refused."""
    from sonic.sound import load_sound
    t = np.arange(44100 * 2) / 44100
    tone = (0.3 * np.sin(2 * np.pi * 220 * t) * (1.2 + np.sin(2 * np.pi * 3 * t))).astype(np.float32)
    sparse = tone.copy()
    sparse[::2000] = np.nan  # 0.05 %
    tracks = {}
    for name, samples in (("clean", tone), ("sparse", sparse)):
        sf.write(tmp_path / f"{name}.wav", samples, 44100, subtype="FLOAT")
        wav = load_audio(tmp_path / f"{name}.wav", 60)
        tracks[name] = (wav, load_sound(tmp_path / f"{name}.wav", 60, wav).samples)
    (clean_wav, clean_sound), (wav, sound) = tracks["clean"], tracks["sparse"]
    # no gaps of silence: each NaN one silent sample at 44.1 kHz, smoothed by the resampling
    assert np.isfinite(wav).all() and np.count_nonzero(wav == 0) <= np.count_nonzero(clean_wav == 0) + 3
    assert np.count_nonzero(sound == 0) <= np.count_nonzero(clean_sound == 0) + 6
    dense = tone.copy()
    dense[::50] = np.nan  # 2 %
    sf.write(tmp_path / "dense.wav", dense, 44100, subtype="FLOAT")
    with pytest.raises(UnsupportedMedia, match="audio is damaged: 2 % of its samples"):
        load_audio(tmp_path / "dense.wav", 60)
    exact = np.sin(np.arange(16000, dtype=np.float32) / 7)
    exact[::100] = np.nan  # 1 % exactly: not more than 1 %
    assert np.isfinite(check_waveform(exact, 3)).all()

def test_a_recording_that_cannot_be_decoded_again_for_the_sound_track_is_said_in_warnings(tmp_path):
    """The sound track decodes the file again at 48 kHz; when that fails (out of file handles,
    the file gone) the video plays the 16 kHz analysis copy, everything above 8 kHz cut. It
    succeeded with `warnings: []`; a log line said so, naming neither job nor cause."""
    import shutil
    from sonic.sound import load_sound
    path = tmp_path / "speech.flac"
    shutil.copy(SPEECH, path)
    wav = load_audio(path, 60)
    assert load_sound(path, 60, wav).stand_in_warning() is None
    path.unlink()  # gone between the analysis and the sound track
    sound = load_sound(path, 60, wav)
    assert sound.rate == SAMPLE_RATE and "plays a 16 kHz copy" in sound.stand_in_warning()
    assert sound.fitted(1.0).stand_in  # kept when trimmed to the clip


def display_p3_profile() -> bytes:
    """A minimal ICC v2 display profile with Display P3's primaries (D50-adapted) and a 2.2
    gamma: what an iPhone embeds, near enough for the colours to differ from sRGB's."""
    import struct

    def fixed(v):
        return struct.pack(">i", round(v * 65536))

    def xyz(x, y, z):
        return b"XYZ " + bytes(4) + fixed(x) + fixed(y) + fixed(z)

    gamma = b"curv" + bytes(4) + struct.pack(">IH", 1, round(2.2 * 256)) + bytes(2)
    name = b"Display P3 (test)\0"
    desc = b"desc" + bytes(4) + struct.pack(">I", len(name)) + name + bytes(4 + 4 + 2 + 1 + 67)
    tags = [(b"desc", desc), (b"wtpt", xyz(0.9642, 1.0, 0.8249)), (b"rXYZ", xyz(0.5151, 0.2412, -0.0011)),
            (b"gXYZ", xyz(0.2920, 0.6922, 0.0419)), (b"bXYZ", xyz(0.1571, 0.0666, 0.7841)),
            (b"rTRC", gamma), (b"gTRC", gamma), (b"bTRC", gamma)]
    offset, table, body = 128 + 4 + 12 * len(tags), b"", b""
    for sig, data in tags:
        table += sig + struct.pack(">II", offset + len(body), len(data))
        body += data + bytes(-len(data) % 4)
    size = offset + len(body)
    header = (struct.pack(">I", size) + bytes(4) + struct.pack(">I", 0x02100000) + b"mntrRGB XYZ " + bytes(12)
              + b"acsp" + bytes(24) + struct.pack(">I", 0) + fixed(0.9642) + fixed(1.0) + fixed(0.8249) + bytes(48))
    return header + struct.pack(">I", len(tags)) + table + body


@pytest.mark.parametrize("fmt", ["JPEG", "PNG", "WEBP"])
def test_a_wide_gamut_photo_is_decoded_in_srgb(tmp_path, fmt):
    """A phone's Display P3 photo holds other numbers for the same colours: read as sRGB it was
    pale (a P3 portrait 17 % less saturated). Its embedded profile is applied at decoding."""
    from PIL import ImageCms
    icc = display_p3_profile()
    p3 = ImageCms.ImageCmsProfile(io.BytesIO(icc))
    srgb = Image.open(PORTRAIT).convert("RGB")
    as_p3 = ImageCms.profileToProfile(srgb, ImageCms.createProfile("sRGB"), p3, outputMode="RGB")
    path = tmp_path / f"p3.{fmt.lower()}"
    as_p3.save(path, fmt, quality=98, icc_profile=icc)
    expected, raw = np.asarray(srgb, float), np.asarray(as_p3, float)
    got = load_image(path, 10**7).astype(float)
    assert np.abs(raw - expected).mean() > 4  # the profile matters for this photo
    assert np.abs(got - expected).mean() < 1.5
    # a profile that cannot be read leaves the numbers as they are, and the photo is still taken
    broken = tmp_path / f"broken.{fmt.lower()}"
    as_p3.save(broken, fmt, quality=98, icc_profile=b"not a profile" * 10)
    assert np.abs(load_image(broken, 10**7).astype(float) - raw).mean() < 1.5


def test_a_wav_whose_samples_go_on_past_its_declared_size_is_read_whole(tmp_path):
    """A header that declares 1 s of a 3 s recording (a recorder that fixed its size too early)
    made a 1 s video with nothing said; the samples past the declared end are read. Tags after
    the samples (a LIST chunk, after or without its pad byte; an ID3 tag) are still not sound."""
    import struct
    from sonic.sound import load_sound
    speech = load_audio(SPEECH, 60)[: 3 * SAMPLE_RATE]
    whole = tmp_path / "whole.wav"
    sf.write(whole, speech, SAMPLE_RATE, subtype="PCM_16")
    data = bytearray(whole.read_bytes())
    at = data.index(b"data")
    struct.pack_into("<I", data, at + 4, 2 * SAMPLE_RATE)  # declares 1 s of 16-bit mono
    liar = tmp_path / "liar.wav"
    liar.write_bytes(bytes(data))
    heard = load_audio(liar, 60)
    assert len(heard) == len(speech) and np.abs(heard - load_audio(whole, 60)).max() < 1e-6
    assert len(load_sound(liar, 60, heard).samples) == 3 * 48000
    tagged = tmp_path / "tagged.wav"
    one_s = bytes(data[: at + 8 + 2 * SAMPLE_RATE])
    tags = b"LIST" + struct.pack("<I", 18) + b"INFOISFT" + struct.pack("<I", 6) + b"sonic\0"
    tagged.write_bytes(one_s[:4] + struct.pack("<I", len(one_s) - 8 + len(tags)) + one_s[8:] + tags)
    assert len(load_audio(tagged, 60)) == SAMPLE_RATE
    # an ID3 tag appended to the file (its bytes were 0.6 s of noise louder than the speech)
    id3 = tmp_path / "id3.wav"
    id3.write_bytes(whole.read_bytes() + b"ID3\x03\x00\x00\x00\x00\x01\x00" + bytes(20000))
    assert len(load_audio(id3, 60)) == len(speech)
    # an odd-sized data chunk whose writer left out the pad byte, then tags: still tags
    odd = tmp_path / "odd.wav"
    sf.write(odd, speech[: SAMPLE_RATE - 1], SAMPLE_RATE, subtype="PCM_U8")
    body = odd.read_bytes()
    unpadded = body[: body.index(b"data") + 8 + SAMPLE_RATE - 1] + tags
    odd.write_bytes(unpadded[:4] + struct.pack("<I", len(unpadded) - 8) + unpadded[8:])
    assert len(load_audio(odd, 60)) == SAMPLE_RATE - 1


def test_a_palette_photos_profile_is_applied_too(tmp_path):
    """A palette image's colours are in its profile's space as well (they were taken as sRGB)."""
    icc = display_p3_profile()
    red = Image.new("RGB", (64, 64), (220, 40, 30))
    red.save(tmp_path / "rgb.png", icc_profile=icc)
    red.convert("P", palette=Image.Palette.ADAPTIVE).save(tmp_path / "p.png", icc_profile=icc)
    as_rgb, as_palette = (load_image(tmp_path / n, 10**7)[0, 0].astype(int) for n in ("rgb.png", "p.png"))
    assert np.abs(as_rgb - (220, 40, 30)).max() > 10 and np.abs(as_palette - as_rgb).max() <= 2


def test_a_clip_whose_picture_outlasts_its_sound_is_not_called_cut_short(tmp_path):
    """A video given as the recording states its longest stream's length: a clip of 3 s whose
    sound stops after 1 s was told "the recording says it lasts 3.0 s ... may be cut short". A
    recording's cover picture is no video: its stated length still tells a file cut short."""
    import subprocess

    import soundfile as sf
    from PIL import Image

    from sonic.media import FFMPEG, probe_audio
    from sonic.sound import load_sound

    voice, cover = tmp_path / "voice.wav", tmp_path / "cover.png"
    sf.write(voice, (np.sin(np.arange(16000) / 8) * 0.3).astype(np.float32), 16000, subtype="PCM_16")
    Image.new("RGB", (64, 64), (200, 40, 40)).save(cover)
    clip, tagged = tmp_path / "clip.mp4", tmp_path / "tagged.mp3"
    quiet = [FFMPEG, "-loglevel", "error", "-y"]
    subprocess.run([*quiet, "-f", "lavfi", "-i", "testsrc=size=128x96:rate=25:duration=3", "-i", str(voice),
                    "-map", "0:v", "-map", "1:a", "-c:v", "libx264", "-c:a", "aac", str(clip)], check=True)
    subprocess.run([*quiet, "-i", str(voice), "-i", str(cover), "-map", "0:a", "-map", "1:v", "-c:v", "mjpeg",
                    "-disposition:v", "attached_pic", str(tagged)], check=True)
    wav = load_audio(clip, 60)
    assert abs(len(wav) / SAMPLE_RATE - 1.0) < 0.1
    assert load_sound(clip, 60, wav).cut_short(len(wav) / SAMPLE_RATE) is None
    stated = probe_audio(tagged).duration_s
    assert stated is not None and abs(stated - 1.0) < 0.1
