"""Parity of the `sonic` decoder with Sonic's own inference code, on the tiny model.

Its own file, so that the test runner can run it beside tests/test_diffusion.py (it decodes
15 frames of 1024x512)."""
import numpy as np
import torch

from conftest import ROOT

def test_parity_with_the_reference_implementation(tiny_model):
    """tests/data/sonic_parity.npz: what Sonic's own inference code (its commit and versions are
    in the file's `source`) computes on this tiny model (seed 0) for a 1024x512 frame, 1.2 s of the
    example speech, seed 3, 2 steps; ours must compute the same to float32 noise. (The reference
    run's own spread, 1 thread against 2: latents 2.4e-4, frames 1 level.)"""
    from sonic.decoders.sonic.model import DECODE_CHUNK
    model = tiny_model
    ref = np.load(ROOT / "tests" / "data" / "sonic_parity.npz")
    n, steps = int(ref["n"]), int(ref["steps"])
    gen = torch.Generator("cpu").manual_seed(int(ref["seed"]))
    cond = model.condition(ref["frame"], tuple(ref["box"].tolist()), ref["wav"], n, float(ref["dynamic_scale"]), gen)
    assert np.array_equal(cond.mask[0, 0].numpy().astype(np.uint8), ref["fed_mask"])
    for name in ("tokens", "buckets", "embeds", "ref_latents", "image_latents"):
        ours = getattr(cond, name).float().numpy()
        assert np.abs(ours - ref[f"reference_{name}"]).max() < 1e-4 * max(1.0, np.abs(ours).max()), name
    assert np.abs(cond.silent.numpy()[0] - ref["reference_silent"][0]).max() < 1e-5
    latents = model.denoise(cond, n, steps, float(ref["motion_scale"]), gen)
    assert np.abs(latents.numpy() - ref["reference_latents"]).max() < 2e-3
    # the first chunk the VAE decodes (DECODE_CHUNK frames at a time, as upstream) holds frames 0 and 7
    assert DECODE_CHUNK == 8 and list(ref["frames_index"][:2]) == [0, 7]
    frames = next(model.decode(latents))
    step = int(ref["frames_stride"])
    ours = frames[[0, 7]][:, ::step, ::step].astype(int)
    assert np.abs(ours - ref["reference_frames_0_7_14_rounded"][:2]).max() <= 2


def test_rife_parity_with_the_reference_implementation(tmp_path):
    """tests/data/rife_parity.npz: Sonic's own RIFE code on the tiny writer's flownet.pkl (seed 0)
    and on the same weights with every convolution x `multiplier` (flows of a few pixels, so that
    the warps, the mask and the flow channels all matter), for two 64x128 frames."""
    from sonic.decoders.sonic.rife import load_interpolator
    from sonic.decoders.sonic.tiny import write_tiny_rife
    ref = np.load(ROOT / "tests" / "data" / "rife_parity.npz")
    path = write_tiny_rife(tmp_path / "flownet.pkl", seed=0)
    img0, img1 = torch.from_numpy(ref["img0"]), torch.from_numpy(ref["img1"])
    small = load_interpolator(path, torch.device("cpu"))
    assert np.abs(small.middle(img0, img1).numpy() - ref["reference_small"]).max() < 1e-5
    state = torch.load(path)
    m = float(ref["multiplier"])
    torch.save({k: v * m if v.dim() == 4 else v for k, v in state.items()}, path)
    big = load_interpolator(path, torch.device("cpu"))
    assert np.abs(big.middle(img0, img1).numpy() - ref["reference_big"]).max() < 1e-5
