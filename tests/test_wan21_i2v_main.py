"""Wan 2.1 image-to-video and first-last-frame through train_wan.py's main(), on tiny test-made folders in the official
Wan2.1-I2V / FLF2V layout (a 36-channel DiT with img_emb, Wan2.1_VAE.pth, umT5, the CLIP .pth), in --dtype bf16 on
CPU: the conditioning (the clip's own first frame, or first and last, with zeros between, VAE-encoded as a whole
video, and the CLIP tokens of the frame(s)) is cached beside the latents; cache -> train -> resume -> export ->
--mode sample from --sample_image (and --sample_last_image)."""
import os

import pytest
import torch

import train_wan as W
from data.cache import load_entry
from data.video import read_clip
from tests import checks
from tests.helpers import TINY_CLIP, make_official_folder
from tests.procs import script_runner

# 32x32 pixels, 5 frames -> latents 16 x 2 x 4 x 4 -> 8 tokens; y adds 4 + 16 channels; 257 CLIP tokens per frame
CLIP = ["--height", "32", "--width", "32", "--frames", "5", "--fps", "16", "--log_every", "1", "--warmup_steps", "1",
        "--global_batch", "4", "--micro_batch", "2", "--dtype", "bf16", "--lr", "1e-3"]

wan = script_runner("train_wan.py")


def _folder(tmp_path_factory, kind):
    return checks.official_folder(tmp_path_factory, f"Wan2.1-{kind}-tiny",
                                  lambda root: make_official_folder(root, model_type=kind))


@pytest.fixture(scope="module")
def i2v(tmp_path_factory):
    return _folder(tmp_path_factory, "i2v")


@pytest.fixture(scope="module")
def flf2v(tmp_path_factory):
    return _folder(tmp_path_factory, "flf2v")


def _clips(folder):
    return sorted(os.path.join(folder["data"], f) for f in os.listdir(folder["data"]) if f.endswith(".mp4"))


def _check_cached_conditioning(folder, last):
    """Every cached entry: latents.cond = the VAE encoding of [first frame, zeros, (last frame)] as one video, which
    equals the clip's own latents on latent frame 0 only; latents.clip = the CLIP tokens of the frame(s)."""
    vae, clip = W.load_vae(folder["ckpt"]), W.load_clip(folder["ckpt"])
    files = [f for f in os.listdir(folder["cache"]) if f.endswith(".safetensors")]
    assert len(files) == 8
    for f in files[:2]:
        t, meta = load_entry(os.path.join(folder["cache"], f))
        H, Wd, n = meta["bucket"]
        v = read_clip(meta["path"], meta["start"], n, meta["fps"], (H, Wd))[None]  # (1, 3, 5, 32, 32)
        assert t["latents"].shape == t["latents.cond"].shape == (16, 2, 4, 4)
        cond_video = torch.zeros_like(v)
        cond_video[:, :, 0] = v[:, :, 0]
        if last:
            cond_video[:, :, -1] = v[:, :, -1]
        want = vae.encode(cond_video)[0]
        assert torch.allclose(t["latents.cond"], want, atol=1e-5)
        assert torch.allclose(t["latents.cond"][:, 0], t["latents"][:, 0], atol=1e-5)  # latent 0 is the clip's own
        assert (t["latents.cond"][:, 1:] - t["latents"][:, 1:]).abs().max() > 1e-3  # the rest is not (zero frames)
        frames = v[:, :, [0, -1]].permute(0, 2, 1, 3, 4)[0] if last else v[:, :, 0]
        want_clip = clip.encode_image(frames).reshape(-1, TINY_CLIP["dim"])
        assert t["latents.clip"].shape == ((514 if last else 257), TINY_CLIP["dim"])
        assert torch.allclose(t["latents.clip"], want_clip, atol=1e-5)
        assert meta["settings"]["cond"] == ("first+last" if last else "first")
        assert meta["settings"]["clip"] == W.CLIP_FILE


def test_cached_conditioning_is_the_first_frame_and_zeros_encoded(i2v):
    """An 81-frame-like layout at small size: 5 frames, 1 given, 4 zero frames."""
    common = ["--ckpt_dir", i2v["ckpt"], "--data", i2v["data"], "--cache_dir", i2v["cache"], *CLIP]
    checks.check_cache(wan, common, i2v["cache"])
    _check_cached_conditioning(i2v, last=False)


def test_i2v_cache_train_resume_export_sample_in_bf16(i2v, tmp_path):
    common = ["--ckpt_dir", i2v["ckpt"], "--data", i2v["data"], "--cache_dir", i2v["cache"], *CLIP]
    checks.check_cache(wan, common, i2v["cache"])
    image = _clips(i2v)[0]
    out = tmp_path / "full"
    checks.check_train_from_cache(wan, common, out, "--sample_image", image)
    checks.check_resume_to_6(wan, common, out, 5, "--sample_image", image)
    sd = W.read_dit_checkpoint(str(out / "model.safetensors"))[1]
    assert sd["patch_embedding.weight"].shape[1] == 36 and "img_emb.proj.0.weight" in sd
    # --mode sample from two different first frames: the image conditions the video
    s = checks.sample_flags(["--ckpt_dir", i2v["ckpt"]], str(out / "model.safetensors"), i2v["cache"], 5)
    for d, img in (("s0", _clips(i2v)[0]), ("s1", _clips(i2v)[1])):
        wan(*s, "--out_dir", str(tmp_path / d), "--sample_image", img)
    a, b = (read_clip(str(tmp_path / d / "samples" / "step_00000000_0.mp4"), 0, 5, 16, (32, 32)) for d in ("s0", "s1"))
    assert a.shape == (3, 5, 32, 32) and (a - b).abs().mean() > 0.005


def test_flf2v_caches_first_and_last_and_trains_and_samples(flf2v, tmp_path):
    common = ["--ckpt_dir", flf2v["ckpt"], "--data", flf2v["data"], "--cache_dir", flf2v["cache"], *CLIP]
    checks.check_cache(wan, common, flf2v["cache"])
    _check_cached_conditioning(flf2v, last=True)
    first, last = _clips(flf2v)[:2]
    out = tmp_path / "flf"
    wan(*common, "--out_dir", str(out), "--max_steps", "2", "--sample_prompts", "a red circle moving left",
        "--sample_steps", "2", "--sample_image", first, "--sample_last_image", last)
    assert os.path.exists(out / "model.safetensors") and os.path.exists(out / "samples" / "step_00000002_0.mp4")
    # the samples' guidance contrasted against FLF2V's own negative prompt (upstream's config prefixes the shared one)
    texts = [torch.load(os.path.join(flf2v["cache"], f)) for f in os.listdir(flf2v["cache"]) if f.startswith("texts-")]
    assert any("镜头切换，镜头晃动，" + W.NEGATIVE_PROMPT in t for t in texts)
    assert not any(W.NEGATIVE_PROMPT in t for t in texts)


@pytest.mark.parametrize("flags, says", [
    (["--sample_prompts", "a"], "a i2v model samples from an image: --sample_image PATH"),
    (["--task", "t2v"], "--task t2v: a i2v model does i2v"),
    (["--sample_last_image", "x.png"], "--sample_last_image x.png: no such file"),
])
def test_user_errors(i2v, tmp_path, flags, says):
    base = ["--ckpt_dir", i2v["ckpt"], "--data", i2v["data"], "--out_dir", str(tmp_path / "o"), *CLIP]
    checks.check_user_error(wan, [*base, *flags], says, tmp_path / "o")
