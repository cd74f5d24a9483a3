"""The conditioning images' preprocessing of the official inference (ltx_video/inference.py
load_image_to_tensor_with_resize_and_crop: a 3x3 gaussian blur, then crf_compressor.compress, an H.264 CRF 29
round trip per frame), which --sample_image / --sample_video / the keyframes go through (not --sample_reference)."""
import math

import torch

import train_ltx as L


def smooth_video(frames=2, H=64, W=96, seed=0):
    """(3, F, H, W) in [-1, 1] on the uint8 grid: gradients and a square, what a codec keeps well."""
    g = torch.Generator().manual_seed(seed)
    y, x = torch.meshgrid(torch.linspace(0, 1, H), torch.linspace(0, 1, W), indexing="ij")
    out = []
    for f in range(frames):
        c = torch.rand(3, 1, 1, generator=g)
        img = c * x + (1 - c) * y
        img[:, H // 4: H // 2, W // 4 + 8 * f: W // 2 + 8 * f] = 0.9
        out.append(img)
    u = (torch.stack(out, 1) * 255).round()
    return u / 127.5 - 1


def reference_blur(x, sigma=1.0):
    """torchvision's gaussian_blur(kernel_size=3, sigma) written out: weight exp(-(dy^2 + dx^2) / 2 sigma^2),
    normalised over the 3x3 window, neighbours past the edge reflected (index -1 -> 1, H -> H - 2)."""
    H, W = x.shape[-2:]
    w1 = [math.exp(-0.5 * (d / sigma) ** 2) for d in (-1, 0, 1)]
    s = sum(w1)
    w1 = [w / s for w in w1]
    refl = lambda i, n: -i if i < 0 else 2 * (n - 1) - i if i >= n else i  # noqa: E731
    out = torch.zeros_like(x, dtype=torch.float64)
    for dy in (-1, 0, 1):
        rows = [refl(i + dy, H) for i in range(H)]
        for dx in (-1, 0, 1):
            cols = [refl(j + dx, W) for j in range(W)]
            out += w1[dy + 1] * w1[dx + 1] * x.double()[..., rows, :][..., :, cols]
    return out


def test_blur_is_torchvisions():
    x = torch.rand(3, 2, 17, 23, generator=torch.Generator().manual_seed(1))
    got = L.gaussian_blur3(x)
    assert got.shape == x.shape and got.dtype == torch.float32
    assert (got.double() - reference_blur(x)).abs().max() < 1e-6
    assert (got - x).abs().mean() > 0.05  # it does blur


def test_preprocessing_is_blur_then_a_close_deterministic_crf_round_trip():
    v = smooth_video()
    a, b = L.condition_pixels(v), L.condition_pixels(v)
    assert torch.equal(a, b)  # the same bytes each call: the same samples
    assert a.shape == v.shape and a.dtype == torch.float32 and a.min() >= -1 and a.max() <= 1
    q = (a + 1) * 127.5
    assert (q - q.round()).abs().max() < 1e-4  # uint8 pixels, as decoded
    blurred = reference_blur((v + 1) / 2).float() * 2 - 1
    err = (a - blurred).abs()
    print(f"CRF 29 round trip vs the blurred frames: mean {err.mean():.4f}, max {err.max():.4f} (of [-1, 1])")
    assert 1e-3 < err.mean() < 0.03  # compressed: changed, but close
    assert err.mean() < (a - v).abs().mean()  # the blur is in it too: closer to the blurred frames than to v
    # each frame alone (a one-frame video each, as upstream): frame 1 is the same as when it comes alone
    assert torch.equal(L.condition_pixels(v[:, 1:]), a[:, 1:])
    # a higher CRF compresses more; 0 is off (the pixels as they are)
    hi = L.condition_pixels(v, 45)
    assert (hi - blurred).abs().mean() > err.mean()
    assert torch.equal(L.condition_pixels(v, 0), v)


def test_the_decode_noise_default_is_the_official_configs():
    # every official config (configs/*.yaml) decodes with decode_noise_scale 0.025 and decode_timestep 0.05
    args = L.Args()
    official = L.SAMPLE_CONFIGS["ltxv-2b-0.9.6-dev"]
    assert (args.decode_noise, args.decode_timestep) == (official["decode_noise_scale"], official["decode_timestep"])
    assert L.sample_config(args)["decode_noise_scale"] == 0.025


def test_the_crf_round_trip_is_the_same_on_any_number_of_cores(tmp_path):
    """x264 picks its thread count from the cores it may use, and its output depends on it: a process pinned to one
    core must give the pixels this one gives (one x264 thread in both)."""
    import os
    import subprocess
    import sys
    if not hasattr(os, "sched_setaffinity") or len(os.sched_getaffinity(0)) < 2:
        import pytest
        pytest.skip("needs a machine with 2 or more cores and sched_setaffinity")
    v = smooth_video(frames=2, H=128, W=160)
    torch.save(v, tmp_path / "v.pt")
    code = ("import os, sys, torch; os.sched_setaffinity(0, {min(os.sched_getaffinity(0))}); "
            f"sys.path.insert(0, {os.path.dirname(os.path.dirname(os.path.abspath(__file__)))!r}); "
            "import train_ltx as L; "
            f"torch.save(L.condition_pixels(torch.load({str(tmp_path / 'v.pt')!r})), {str(tmp_path / 'one.pt')!r})")
    subprocess.run([sys.executable, "-c", code], check=True, timeout=300)
    assert torch.equal(torch.load(tmp_path / "one.pt"), L.condition_pixels(v))
