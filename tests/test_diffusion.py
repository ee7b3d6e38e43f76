"""The `sonic` diffusion decoder on the CPU, with a tiny randomly initialised model of the real
architecture written as a checkpoint folder in the official layout (sonic/decoders/sonic/tiny.py):
the real loader, sampler, pipeline, CLI and server, 2 steps, 256 px (8x8 latents), 0.6 s of speech."""
import json
import shutil
import subprocess
import sys

import numpy as np
import pytest
import requests
import soundfile as sf
import torch

from conftest import PORTRAIT, ROOT, SPEECH, read_frames
from server_helpers import settings as server_settings
from sonic.errors import SetupError

TINY = {"min_resolution": 256, "inference_steps": 2, "seed": 3}


@pytest.fixture(scope="module")
def tiny(tiny_checkpoints):
    return tiny_checkpoints


@pytest.fixture(scope="module")
def speech_short(tmp_path_factory):
    wav, sr = sf.read(SPEECH, dtype="float32")
    out = tmp_path_factory.mktemp("a") / "speech_short.wav"
    sf.write(out, wav[: int(0.6 * sr)], sr)  # 15 frames at 25 fps: 8 generated, one VAE chunk
    return out


@pytest.fixture(scope="module")
def model(tiny_model):
    return tiny_model


def condition(model, n=30, seed=0):
    wav, _ = sf.read(SPEECH, dtype="float32")
    frame = np.full((320, 256, 3), 128, np.uint8)
    gen = torch.Generator("cpu").manual_seed(seed)
    return model.condition(frame, (64, 80, 192, 240), wav[:40000], n, 1.0, gen), gen


def test_cli_writes_a_playable_mp4_of_the_audio_length(tiny, speech_short, tmp_path):
    out = tmp_path / "tiny.mp4"
    r = subprocess.run([sys.executable, "-m", "sonic", "generate", "--decoder", "sonic", "--checkpoints", str(tiny),
                        "--device", "cpu", "--image", str(PORTRAIT), "--audio", str(speech_short), "--out", str(out),
                        "--config", json.dumps(TINY), "--quiet"], cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr[-2000:]
    result = json.loads(r.stdout)
    assert result["frames"] == 15 and result["fps"] == 25 and result["duration"] == 0.6
    assert result["width"] % 64 == 0 and result["height"] % 64 == 0 and min(result["width"], result["height"]) == 256
    assert not any("not used" in w for w in result["warnings"])          # every parameter set here is honoured
    frames = read_frames(out)
    assert frames.shape == (15, result["height"], result["width"], 3)
    assert r.stderr == ""                                                # no progress bars or library advice


def test_inference_steps_is_the_number_of_sampler_steps(model):
    cond, gen = condition(model, n=30)                 # 30 frames: two windows of 25 per step
    for steps in (1, 3):
        before = model.unet_calls
        model.denoise(cond, 30, steps, 1.0, gen)
        assert model.unet_calls - before == 2 * steps


def test_the_half_precision_model_a_gpu_gets_runs_every_step(tiny):
    """float16 is what SonicModel loads on CUDA by default; the same code in float16 on the CPU
    (64 px, one step) hands every step the dtype it needs, so a first run on a GPU does not stop at
    a dtype mismatch. (The reference is encoded in float16 too, as upstream Sonic does: its
    pipeline turns diffusers' VAE upcasting off.)"""
    from sonic.decoders.sonic.model import SonicModel
    half = SonicModel(tiny, "cpu", dtype=torch.float16)
    wav, _ = sf.read(SPEECH, dtype="float32")
    gen = torch.Generator("cpu").manual_seed(0)
    cond = half.condition(np.full((64, 64, 3), 128, np.uint8), (16, 16, 48, 48), wav[:16000], 3, 1.0, gen)
    assert cond.tokens.dtype == cond.ref_latents.dtype == cond.image_latents.dtype == torch.float16
    latents = half.denoise(cond, 3, 1, 1.0, gen)
    assert latents.dtype == torch.float16 and bool(torch.isfinite(latents).all())
    frames = next(half.decode(latents))
    assert frames.shape == (3, 64, 64, 3) and frames.dtype == np.uint8


def test_seeded_runs_are_identical_and_seeds_differ(model):
    runs = []
    for seed in (5, 5, 0, 0, 6):
        cond, gen = condition(model, n=12, seed=seed)
        runs.append(model.denoise(cond, 12, 2, 1.0, gen))
    assert torch.equal(runs[0], runs[1]) and torch.equal(runs[2], runs[3])      # seed 0 too
    assert not torch.equal(runs[0], runs[2]) and not torch.equal(runs[0], runs[4])


def test_audio_moves_the_result(model):
    """The audio tokens reach the UNet: other audio, other latents (same seed)."""
    from sonic.decoders.sonic.model import Conditioning
    cond, gen = condition(model, n=12, seed=1)
    a = model.denoise(cond, 12, 2, 1.0, gen)
    quiet = Conditioning(**{**cond.__dict__, "tokens": cond.silent.expand_as(cond.tokens).clone()})
    gen.manual_seed(1)
    cond2, gen2 = condition(model, n=12, seed=1)
    b = model.denoise(Conditioning(**{**cond2.__dict__, "tokens": quiet.tokens}), 12, 2, 1.0, gen2)
    assert not torch.allclose(a, b)


def test_retime_streams_the_right_number_of_frames():
    from sonic.decoders.sonic.model import generated_count, retime
    for n_out, fps in ((1, 25), (30, 25), (31, 30), (100, 24), (7, 10)):
        n = generated_count(n_out, fps)
        gen = np.arange(n, dtype=np.uint8)[:, None, None, None].repeat(2, 1).repeat(2, 2).repeat(3, 3)
        chunks = (gen[i:i + 8] for i in range(0, n, 8))
        out = np.concatenate(list(retime(chunks, n_out, fps)))
        assert len(out) == n_out
        t = np.arange(n_out) / fps * 12.5                   # generated-frame time of each output frame
        assert np.abs(out[:, 0, 0, 0] - t).max() <= 0.5 + 1e-6


def _break(tiny, tmp_path, edit):
    bad = tmp_path / "ckpt"
    shutil.copytree(tiny, bad)
    edit(bad)
    from sonic.decoders.sonic.model import SonicModel
    with pytest.raises(SetupError) as e:
        SonicModel(bad, "cpu")
    return e.value.message


def test_setup_errors_name_the_file_and_the_key(tiny, tmp_path):
    msg = _break(tiny, tmp_path / "a", lambda d: (d / "Sonic" / "audio2bucket.pth").unlink())
    assert "lacks Sonic/audio2bucket.pth" in msg
    msg = _break(tiny, tmp_path / "b", lambda d: (d / "whisper-tiny" / "preprocessor_config.json").unlink())
    assert "whisper-tiny/preprocessor_config.json" in msg

    def edit_unet(change):
        def edit(d):
            state = torch.load(d / "Sonic" / "unet.pth")
            change(state)
            torch.save(state, d / "Sonic" / "unet.pth")
        return edit
    key = "mid_block.attentions.0.transformer_blocks.0.attn2.processor.to_v_ip.0.weight"
    msg = _break(tiny, tmp_path / "c", edit_unet(lambda s: s.pop(key)))
    assert "unet.pth" in msg and f"missing key {key!r}" in msg
    msg = _break(tiny, tmp_path / "d", edit_unet(lambda s: s.__setitem__(key, torch.zeros(3, 5))))
    assert "unet.pth" in msg and key in msg and "(3, 5)" in msg and "(32, 32)" in msg
    msg = _break(tiny, tmp_path / "e", edit_unet(lambda s: s.__setitem__("extra.weight", torch.zeros(1))))
    assert "unexpected key 'extra.weight'" in msg
    msg = _break(tiny, tmp_path / "f", lambda d: (d / "Sonic" / "audio2token.pth").write_bytes(b"not a checkpoint"))
    assert "audio2token.pth" in msg and "cannot be read" in msg


class Opaque:
    """Not a tensor: a file holding it needs full pickle to load."""


def test_full_pickle_only_when_allowed_and_conversion_to_safetensors(tiny, tmp_path):
    from sonic.decoders.sonic.model import SonicModel
    from sonic.decoders.sonic.weights import load_state
    path = tmp_path / "a2t.pth"
    state = torch.load(tiny / "Sonic" / "audio2token.pth")
    torch.save({**state, "norm.weight": torch.nn.Parameter(state["norm.weight"]), "_note": Opaque()}, path)
    with pytest.raises(SetupError) as e:
        load_state(path)
    assert "allow_unsafe_pickle" in e.value.message and "convert_checkpoints.py" in e.value.message
    assert set(load_state(path, allow_unsafe_pickle=True)) == set(state)
    # the conversion script rewrites every .pth as .safetensors, which then loads without pickle
    conv = tmp_path / "conv"
    shutil.copytree(tiny, conv)
    r = subprocess.run([sys.executable, "scripts/convert_checkpoints.py", str(conv)], cwd=ROOT,
                       capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr
    for stem in ("unet", "audio2token", "audio2bucket"):
        assert (conv / "Sonic" / f"{stem}.safetensors").is_file()
        (conv / "Sonic" / f"{stem}.pth").unlink()
    converted = SonicModel(conv, "cpu")
    assert converted.layout.weights("unet").suffix == ".safetensors"


def test_server_serves_the_sonic_decoder_with_progress(tiny, speech_short, tmp_path):
    from test_http_live import start_server
    proc, info = start_server(tmp_path, top={"decoder": "sonic", "sonic_checkpoints": str(tiny), "device": "cpu"})
    base = info["base"]
    try:
        health = requests.get(base + "/health", timeout=5).json()
        assert health["decoder"] == "sonic" and health["device"] == "cpu"
        params = requests.get(base + "/api/sonic/params", timeout=5).json()
        assert params["decoder"] == "sonic" and params["device"] == "cpu"
        with open(PORTRAIT, "rb") as img, open(speech_short, "rb") as aud:
            files = {"image": img.read(), "audio": aud.read()}
        r = requests.post(base + "/api/sonic/generate", files=files,
                          data={"config": json.dumps({**TINY, "decoder": "warp"})}, timeout=30)
        assert r.status_code == 400 and r.json()["error"]["field"] == "decoder"
        r = requests.post(base + "/api/sonic/generate", files=files,
                          data={"config": json.dumps({**TINY, "decoder": "sonic", "async": True})}, timeout=30)
        assert r.status_code == 202, r.text
        stages = []
        with requests.get(r.json()["status_url"] + "/events", stream=True, timeout=300) as events:
            for line in events.iter_lines(decode_unicode=True):
                if line.startswith("data: "):
                    body = json.loads(line[6:])
                    stages.append((body.get("stage"), body.get("progress")))
        assert body["status"] == "succeeded", body
        assert "denoise" in [s for s, _ in stages]
        progress = [p for _, p in stages if p is not None]
        assert progress == sorted(progress) and progress[-1] == 1.0
        video = requests.get(body["video_url"], timeout=30)
        out = tmp_path / "served.mp4"
        out.write_bytes(video.content)
        assert read_frames(out).shape[0] == 15 == body["frames"]
    finally:
        proc.terminate()
        proc.wait(10)


def test_a_broken_folder_is_setup_failed_with_the_reason(tiny, tmp_path, make_client):
    bad = tmp_path / "ckpt"
    shutil.copytree(tiny, bad)
    (bad / "Sonic" / "unet.pth").unlink()
    from sonic_server import create_app
    cfg = server_settings(tmp_path)
    cfg.update(decoder="sonic", sonic_checkpoints=str(bad), device="cpu")
    client = create_app(cfg).test_client()
    h = client.get("/health")
    assert h.status_code == 503
    body = h.get_json()
    assert body["readiness"] == "setup_failed" and "lacks Sonic/unet.pth" in body["error"]


# the official sizes (SVD-xt's unet/config.json; whisper-tiny: 5 hidden states of 384; CLIP ViT-H: 1024)
OFFICIAL_UNET = {"in_channels": 8, "out_channels": 4, "block_out_channels": [320, 640, 1280, 1280],
                 "down_block_types": ["CrossAttnDownBlockSpatioTemporal"] * 3 + ["DownBlockSpatioTemporal"],
                 "up_block_types": ["UpBlockSpatioTemporal"] + ["CrossAttnUpBlockSpatioTemporal"] * 3,
                 "addition_time_embed_dim": 256, "projection_class_embeddings_input_dim": 768, "layers_per_block": 2,
                 "cross_attention_dim": 1024, "transformer_layers_per_block": 1, "num_attention_heads": [5, 10, 20, 20],
                 "num_frames": 25, "sample_size": 96}


def test_our_modules_at_official_sizes_have_the_official_keys_and_shapes():
    """tests/data/sonic_official_keys.json.gz: the state-dict keys and shapes of Sonic's own module
    classes (unet.pth, audio2token.pth, audio2bucket.pth), recorded once in a separate environment
    (its "source" says which commit and diffusers). Ours, built on the meta device, must match
    them exactly, so the official files load with strict key and shape checks."""
    import gzip
    from sonic.decoders.sonic.audio import AudioToBucket, AudioToTokens
    from sonic.decoders.sonic.unet import AudioContext, build_unet
    official = json.loads(gzip.decompress((ROOT / "tests" / "data" / "sonic_official_keys.json.gz").read_bytes()))
    with torch.device("meta"):
        ours = {"unet": build_unet(OFFICIAL_UNET, ROOT, AudioContext(), device="meta"),
                "audio2token": AudioToTokens(10 * 5 * 384, 1024, 1024, 32),
                "audio2bucket": AudioToBucket(50 * 384 + 1024, 1024, 2)}
    for name, module in ours.items():
        shapes = {k: list(v.shape) for k, v in module.state_dict().items()}
        assert list(shapes) == list(official[name]), name           # the same keys, in the same order
        assert shapes == official[name], name
    assert sum("_ip." in k for k in official["unet"]) == 64


def test_the_cache_identity_follows_the_weights(model):
    """The result cache keys on the decoder's identity: other weights, other key."""
    import os
    from sonic.decoders.sonic.kind import SonicKind
    kind = SonicKind(model)
    before = kind.identity
    assert before.startswith("sonic-") and before == SonicKind(model).identity
    unet = model.layout.weights("unet")
    st = unet.stat()
    os.utime(unet, ns=(st.st_atime_ns, st.st_mtime_ns + 10**9))
    try:
        assert kind.identity != before
    finally:
        os.utime(unet, ns=(st.st_atime_ns, st.st_mtime_ns))



def test_rife_puts_a_frame_between_each_pair(tiny, tmp_path):
    """With RIFE/flownet.pkl in the folder (the published network's sizes and "module." keys), the
    12.5 generated frames a second are doubled: I0, M0, I1, ..., and then retimed to fps."""
    from sonic.decoders.sonic.model import SonicModel, retime
    from sonic.decoders.sonic.tiny import write_tiny_rife
    folder = tmp_path / "with_rife"
    shutil.copytree(tiny, folder)
    write_tiny_rife(folder / "RIFE" / "flownet.pkl")
    model = SonicModel(folder, "cpu")
    assert model.rife is not None and sum(k.startswith("block_tea.") for k in model.rife.state_dict()) == 40
    rng = np.random.default_rng(0)
    gen = [rng.integers(0, 255, (3, 64, 64, 3), dtype=np.uint8), rng.integers(0, 255, (2, 64, 64, 3), dtype=np.uint8)]
    out = np.concatenate(list(model.doubled(iter(gen))))
    flat = np.concatenate(gen)
    assert len(out) == 2 * len(flat) - 1
    assert np.array_equal(out[::2], flat)                                 # the generated frames stay as they are
    # near-zero random flow: a middle frame is close to the mean of its neighbours
    mean = (flat[:-1].astype(float) + flat[1:]) / 2
    assert np.abs(out[1::2] - mean).mean() < 40
    assert len(np.concatenate(list(retime(iter([out]), 11, 25, source_fps=25)))) == 11
    # a key the network does not have is named
    state = torch.load(folder / "RIFE" / "flownet.pkl")
    state["module.block0.extra"] = torch.zeros(1)
    torch.save(state, folder / "RIFE" / "flownet.pkl")
    with pytest.raises(SetupError) as e:
        SonicModel(folder, "cpu")
    assert "flownet.pkl" in e.value.message and "block0.extra" in e.value.message


def test_auto_picks_sonic_only_with_cuda_and_a_complete_folder(tiny, tmp_path, monkeypatch):
    from sonic.decoders import choose_decoder
    from sonic.settings import settings_from
    pick = lambda **kw: choose_decoder(settings_from({"decoder": "auto", **kw}, env={}))   # noqa: E731
    assert pick() == "warp"                                             # no folder
    assert pick(sonic_checkpoints=str(tmp_path)) == "warp"              # an empty folder
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert pick(sonic_checkpoints=str(tiny)) == "warp"                  # no CUDA
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    assert pick(sonic_checkpoints=str(tiny)) == "sonic"
    assert pick(sonic_checkpoints=str(tiny), device="cpu") == "warp"    # auto never puts the big model on a CPU
    assert choose_decoder(settings_from({"decoder": "sonic"}, env={})) == "sonic"


def test_the_gpu_check_script_runs_its_dry_run_on_the_cpu(tmp_path):
    """scripts/gpu_check.py (what measures the decoder on a GPU) runs end to end on the tiny model:
    the full-size UNet config is checked against the published tensors, each run prints its line."""
    out = subprocess.run([sys.executable, str(ROOT / "scripts" / "gpu_check.py"), "--tiny", "--device", "cpu",
                          "--seconds", "0.5", "--steps", "1", "--size", "128", "--dir", str(tmp_path)],
                         capture_output=True, text=True, timeout=240, cwd=ROOT)
    assert out.returncode == 0, out.stderr[-2000:]
    runs = [json.loads(line) for line in out.stdout.splitlines() if line.startswith('{"dtype"')]
    assert [r["rife"] for r in runs] == [False, True]
    assert runs[0]["frames_out"] == 7 and runs[1]["frames_out"] == 13  # 12.5 a second, then doubled by RIFE
    assert all(r["s_per_s_of_video"] > 0 and r["s_per_denoising_step"] > 0 for r in runs)
