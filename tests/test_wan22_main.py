"""Wan 2.2 TI2V-5B through train_wan.py's main(), on a tiny test-made folder in the official Wan2.2-TI2V-5B layout
(a 48-channel DiT, Wan2.2_VAE.pth, umT5), in --dtype bf16 on CPU: the 2.2 VAE's stride (32-pixel sides) and channels
everywhere, --task i2v (the clip's first latent frame kept clean: t = 0 there and out of the loss; in the resumed
run for half of the samples, --first_frame_p 0.5, so batches mix i2v and t2v samples), cache -> train ->
resume -> export, then t2v and i2v samples (--sample_image) from the same export. Plus the pieces in-process: the
loss ignores frame 0, the causal VAE's first latent frame is the image's latent, the samplers keep the clean frame."""
import os

import pytest
import torch

import train_wan as W
from common.log import read_log
from tests import checks
from tests.helpers import make_official_folder
from tests.procs import script_runner

# 32x32 pixels, 5 frames -> 2.2 latents 48 x 2 x 2 x 2 -> 2 tokens (one per latent frame with the 2x2 patch)
CLIP = ["--height", "32", "--width", "32", "--frames", "5", "--fps", "16", "--log_every", "1", "--warmup_steps", "1",
        "--global_batch", "4", "--micro_batch", "2", "--dtype", "bf16", "--lr", "1e-3"]

wan = script_runner("train_wan.py")


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    return checks.official_folder(tmp_path_factory, "Wan2.2-TI2V-tiny",
                                  lambda root: make_official_folder(root, model_type="ti2v"))


class Recorder(torch.nn.Module):
    """A stand-in DiT: returns `out` and remembers what it was given."""

    def __init__(self, out):
        super().__init__()
        self.out = out

    def forward(self, x, t, context, y=None, clip_fea=None):
        self.seen = (x, t)
        return self.out


def tiny_ti2v():
    """A one-block 48-channel TI2V DiT, seeded, its weights nudged off the zero-initialised head."""
    torch.manual_seed(0)
    model = W.WanModel(W.WanConfig(dim=64, ffn_dim=128, num_heads=2, num_layers=1, in_dim=48, out_dim=48, text_dim=8,
                                   text_len=4, model_type="ti2v"))
    model.init_weights()
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.05)
    return model


def test_the_first_latent_frame_is_out_of_the_loss():
    g = torch.Generator().manual_seed(0)
    x0, eps, out = (torch.randn(2, 48, 3, 2, 2, generator=g) for _ in range(3))
    ctx, sigma = torch.randn(2, 4, 8), torch.tensor([0.3, 0.8])
    model = Recorder(out.clone())
    base = W.flow_loss(model, x0, ctx, sigma, eps, clean_first=True)
    xt, t = model.seen
    assert torch.equal(xt[:, :, 0], x0[:, :, 0])  # frame 0 goes in clean
    s = sigma.view(-1, 1, 1, 1, 1)
    assert torch.allclose(xt[:, :, 1:], ((1 - s) * x0 + s * eps)[:, :, 1:])
    assert t.shape == (2, 3) and (t[:, 0] == 0).all() and torch.allclose(t[:, 1:], sigma[:, None] * 1000)
    model.out[:, :, 0] += 5.0  # any prediction on frame 0: the same loss
    assert W.flow_loss(model, x0, ctx, sigma, eps, clean_first=True) == base
    model.out[:, :, 1] += 5.0  # on frame 1 it counts
    assert W.flow_loss(model, x0, ctx, sigma, eps, clean_first=True) > base + 1
    # and without clean_first frame 0 counts too (t2v)
    assert W.flow_loss(Recorder(out), x0, ctx, sigma, eps) != W.flow_loss(model, x0, ctx, sigma, eps)


def test_a_batch_mixing_i2v_and_t2v_samples_is_each_sample_as_it_would_be_alone():
    """--first_frame_p: clean_first per sample. The i2v sample goes in as in an all-i2v batch, the t2v one as in a
    t2v batch, and the loss is the mean over the elements that count (frame 0 of the i2v sample does not)."""
    g = torch.Generator().manual_seed(0)
    x0, eps, out = (torch.randn(2, 48, 3, 2, 2, generator=g) for _ in range(3))
    ctx, sigma = torch.randn(2, 4, 8), torch.tensor([0.3, 0.8])
    model = Recorder(out.clone())
    mixed = W.flow_loss(model, x0, ctx, sigma, eps, clean_first=torch.tensor([True, False]))
    xt, t = model.seen
    alone = []
    for i, clean in ((0, True), (1, False)):
        rec = Recorder(out[i:i + 1].clone())
        alone.append(W.flow_loss(rec, x0[i:i + 1], ctx[i:i + 1], sigma[i:i + 1], eps[i:i + 1], clean_first=clean))
        assert torch.equal(xt[i:i + 1], rec.seen[0])
        assert torch.equal(t[i:i + 1], rec.seen[1] if clean else rec.seen[1][:, None].expand(1, 3))
    n_i2v, n_t2v = 48 * 2 * 4, 48 * 3 * 4  # elements in the loss: frames 1-2 of sample 0, all 3 frames of sample 1
    assert torch.allclose(mixed, (alone[0] * n_i2v + alone[1] * n_t2v) / (n_i2v + n_t2v), rtol=1e-6)
    # all True / all False as a tensor: the batch-wide paths, bitwise
    for flags, clean in ((torch.tensor([True, True]), True), (torch.tensor([False, False]), False)):
        assert torch.equal(W.flow_loss(Recorder(out), x0, ctx, sigma, eps, clean_first=flags),
                           W.flow_loss(Recorder(out), x0, ctx, sigma, eps, clean_first=clean))
    # and in the DiT, the t2v sample's per-frame t (all equal) is its one t: the same velocity
    dit = tiny_ti2v()
    with torch.no_grad():
        x = torch.randn(1, 48, 3, 4, 4)
        assert torch.allclose(dit(x, torch.tensor([800.0]), ctx[:1]), dit(x, torch.full((1, 3), 800.0), ctx[:1]),
                              atol=1e-6)


def test_first_frame_draws():
    """Each sample i2v with probability --first_frame_p, a pure function of (seed, step, index): the same for a
    sample whichever micro-batch or rank draws it (so 1 or N ranks and a resume agree); -1 follows --task."""
    args = W.Args(first_frame_p=0.25)
    d = W.first_frame_draws(args, "t2v", 3, 0, 4000, 2)
    assert d.dtype == torch.bool and abs(d.float().mean().item() - 0.25) < 0.03
    assert torch.equal(W.first_frame_draws(args, "t2v", 3, 1000, 8, 2), d[1000:1008])
    assert not torch.equal(W.first_frame_draws(args, "t2v", 4, 0, 64, 2), d[:64])  # another step, other draws
    assert not W.first_frame_draws(args, "i2v", 3, 0, 64, 1).any()  # single frames: nothing to predict
    assert W.first_frame_draws(W.Args(), "i2v", 3, 0, 8, 2).all()
    assert not W.first_frame_draws(W.Args(), "t2v", 3, 0, 8, 2).any()
    assert W.first_frame_draws(W.Args(first_frame_p=1.0), "t2v", 3, 0, 8, 2).all()


def test_the_first_latent_of_a_clip_is_its_first_frame_encoded_alone(folder):
    """Why --task i2v needs no extra cache: the causal VAE encodes frame 0 alone, so latent frame 0 of the cached clip
    is exactly the image latent upstream conditions on."""
    vae = W.load_vae(folder["ckpt"])
    assert isinstance(vae, W.Wan22VAE) and vae.z_dim == 48 and tuple(vae.stride) == (4, 16, 16)
    v = torch.rand(1, 3, 9, 32, 32, generator=torch.Generator().manual_seed(1)) * 2 - 1
    assert torch.allclose(vae.encode(v)[:, :, :1], vae.encode(v[:, :, :1]), atol=1e-5)


def test_the_samplers_keep_the_clean_first_frame():
    model = tiny_ti2v()
    first = torch.randn(1, 48, 1, 4, 4)
    x = torch.randn(1, 48, 3, 4, 4)
    x[:, :, :1] = first
    ctx, neg = torch.randn(1, 4, 8), torch.randn(1, 4, 8)
    for solver in (W.sample_unipc, W.sample_euler):
        z = solver(W.conditioned(model, first), x, ctx, neg, steps=4, guidance=3.0)
        assert torch.allclose(z[:, :, :1], first, atol=1e-5), solver
        assert not torch.allclose(z[:, :, 1:], x[:, :, 1:])


def test_ti2v_cache_train_i2v_resume_export_and_sample_t2v_and_i2v_in_bf16(folder, tmp_path):
    common = ["--ckpt_dir", folder["ckpt"], "--data", folder["data"], "--cache_dir", folder["cache"], *CLIP]
    t, meta = checks.check_cache(wan, common, folder["cache"])
    assert t["latents"].shape == (48, 2, 2, 2) and meta["settings"]["vae"] == "Wan2.2_VAE"
    assert set(t) == {"latents", "text"}  # TI2V's i2v needs nothing more: latent frame 0 is the image's

    image = os.path.join(folder["data"], sorted(f for f in os.listdir(folder["data"]) if f.endswith(".mp4"))[0])
    out = tmp_path / "i2v"
    i2v = ["--task", "i2v", "--sample_image", image, "--first_frame_p", "0.5"]  # half of the samples i2v
    checks.check_train_from_cache(wan, common, out, *i2v)
    checks.check_resume_to_6(wan, common, out, 5, *i2v)
    assert all(r["loss"] < 10 for r in read_log(out) if "loss" in r)
    sd = W.read_dit_checkpoint(str(out / "model.safetensors"))[1]
    assert sd["patch_embedding.weight"].shape[:2] == (64, 48) and sd["head.head.weight"].dtype == torch.bfloat16

    # --mode sample from the one export: t2v (no image) and i2v from a still image; the image changes the video
    import av

    from data.video import read_clip
    still = str(tmp_path / "first.png")
    frame = read_clip(image, 0, 1, 16, (32, 32))[:, 0]
    with av.open(still, "w") as c:  # the first frame as a PNG, written by PyAV (FFmpeg's png encoder)
        st = c.add_stream("png")
        st.width = st.height = 32
        st.pix_fmt = "rgb24"
        arr = ((frame.permute(1, 2, 0) + 1) * 127.5).round().clamp(0, 255).byte().numpy()
        for pkt in [*st.encode(av.VideoFrame.from_ndarray(arr, format="rgb24")), *st.encode()]:
            c.mux(pkt)
    s = checks.sample_flags(["--ckpt_dir", folder["ckpt"]], str(out / "model.safetensors"), folder["cache"], 5)
    wan(*s, "--out_dir", str(tmp_path / "t2v"))
    wan(*s, "--out_dir", str(tmp_path / "s_i2v"), "--task", "i2v", "--sample_image", still)
    a, b = (read_clip(str(tmp_path / d / "samples" / "step_00000000_0.mp4"), 0, 5, 16, (32, 32))
            for d in ("t2v", "s_i2v"))
    assert a.shape == b.shape == (3, 5, 32, 32) and (a - b).abs().mean() > 0.01


def test_the_loss_falls_with_a_clean_first_frame(folder, tmp_path):
    """12 steps of --task i2v at lr 3e-3: the validation loss (fixed sigmas and noise, frame 0 excluded) falls."""
    common = ["--ckpt_dir", folder["ckpt"], "--data", folder["data"], "--cache_dir", folder["cache"], *CLIP]
    out = tmp_path / "falls"
    wan(*common, "--out_dir", str(out), "--task", "i2v", "--max_steps", "12", "--lr", "3e-3", "--val_count", "2",
        "--val_every", "4")
    val = [r["val_loss"] for r in read_log(out) if "val_loss" in r]
    assert len(val) == 3 and val[0] > val[1] > val[2] and val[2] < 0.95 * val[0], val


@pytest.mark.parametrize("flags, says", [
    (["--height", "48"], "--height 48 --width 32: both must be positive multiples of 32"),
    (["--task", "flf2v"], "--task flf2v: a ti2v model does t2v or i2v"),
    (["--first_frame_p", "1.5"], "--first_frame_p 1.5: the share of TI2V-5B samples trained as i2v, in [0, 1]"),
])
def test_user_errors_follow_the_22_vae(folder, tmp_path, flags, says):
    base = ["--ckpt_dir", folder["ckpt"], "--data", folder["data"], "--out_dir", str(tmp_path / "o"), *CLIP]
    checks.check_user_error(wan, [*base, *flags], says, tmp_path / "o")
