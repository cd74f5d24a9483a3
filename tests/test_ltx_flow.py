"""Flow matching (LTX-Video-Trainer's convention), the token-count-dependent timestep sampler, first-frame (i2v)
conditioning in the loss, the official schedules, and the sampler with CFG / STG / image conditioning."""
import pytest
import torch

import train_ltx as L
from tests.test_ltx_dit import tiny_dit


def test_token_shift_examples():
    # the spec's worked examples: 512x512x49, 768x512x49, 576x576x121
    for n, mu in ((1792, 1.225), (2688, 1.546), (5184, 2.440)):
        assert abs(L.token_shift(n) - mu) < 1e-3


def test_shifted_logit_normal_mean():
    g = torch.Generator().manual_seed(0)
    s = L.sample_sigmas(20000, "shifted_logit_normal", 2688, generator=g)
    logit = torch.log(s / (1 - s))
    assert abs(logit.mean().item() - 1.546) < 0.03 and abs(logit.std().item() - 1.0) < 0.03
    u = L.sample_sigmas(1000, "uniform", 2688, generator=g)
    assert 0 <= u.min() and u.max() <= 1
    with pytest.raises(ValueError):
        L.sample_sigmas(1, "shift", 10)


class Oracle(torch.nn.Module):
    """A 'model' that returns the exact velocity noise - x0 and records what it was given."""

    def __init__(self, x0, noise):
        super().__init__()
        self.x0, self.noise, self.seen = x0, noise, []

    def forward(self, x, t, ctx, mask, fps, keyframe=None):
        self.seen.append((x.clone(), t.clone(), keyframe))
        return self.noise - self.x0


def test_flow_loss_target_i2v_and_video_extension():
    g = torch.Generator().manual_seed(0)
    x0, noise = torch.randn(2, 4, 3, 2, 2, generator=g), torch.randn(2, 4, 3, 2, 2, generator=g)
    m = Oracle(x0, noise)
    sigma = torch.tensor([0.3, 0.8])
    assert L.flow_loss(m, x0, None, None, sigma, noise) == 0  # target = noise - x0
    xt, t, _ = m.seen[-1]
    assert t.shape == (2,) and torch.allclose(t, sigma * 1000)  # one timestep per sample without conditioning
    assert torch.allclose(xt[0], 0.7 * x0[0] + 0.3 * noise[0]) and torch.allclose(xt[1], 0.2 * x0[1] + 0.8 * noise[1])
    # i2v on sample 1: its latent frame 0 is clean, timestep 0 there, and it is out of the loss
    m2 = Oracle(x0, noise)
    err = torch.zeros_like(noise)
    err[1, :, 0] = 100.0  # a huge error on the conditioning frame only: must not count
    loss = L.flow_loss(lambda x, t, c, k, f, keyframe: m2(x, t, c, k, f) + err, x0, None, None, sigma, noise,
                       cond=torch.tensor([False, True]))
    assert loss == 0
    xt, t, _ = m2.seen[-1]
    assert torch.equal(xt[1, :, 0], x0[1, :, 0])
    assert torch.allclose(xt[0, :, 0], 0.7 * x0[0, :, 0] + 0.3 * noise[0, :, 0])
    assert t.shape == (2, 12) and torch.all(t[1, :4] == 0) and torch.all(t[1, 4:] == 800) and torch.all(t[0] == 300)
    # video extension: sample 0 continues its first 2 latent frames (clean, timestep 0, out of the loss); the loss is
    # the mean over the other tokens (a known error on them: its mean)
    m4 = Oracle(x0, noise)
    err = torch.zeros_like(noise)
    err[0, :, :2] = 100.0
    err[0, :, 2], err[1] = 1.0, 2.0
    loss = L.flow_loss(lambda x, t, c, k, f, keyframe: m4(x, t, c, k, f) + err, x0, None, None, sigma, noise,
                       cond=torch.tensor([2, 0]))
    assert torch.isclose(loss, torch.tensor((4 * 1.0 + 12 * 4.0) / 16))  # 1 frame of sample 0 + 3 of sample 1
    xt, t, _ = m4.seen[-1]
    assert torch.equal(xt[0, :, :2], x0[0, :, :2]) and torch.all(t[0, :8] == 0) and torch.all(t[0, 8:] == 300)
    assert torch.all(t[1] == 800)
    # the draws: k in 1..f-1 at --prefix_p; the first-frame and other draws as without it
    a, b = L.Args(prefix_p=0.5, first_frame_p=0.3, seed=2), L.Args(first_frame_p=0.3, seed=2)
    s_a, d_a, k_a = L.training_draws(a, 7, 0, 4000, 64, "cpu", 5)
    s_b, d_b, k_b = L.training_draws(b, 7, 0, 4000, 64, "cpu", 5)
    assert torch.equal(s_a, s_b) and torch.equal(d_a, d_b) and set(k_b.tolist()) == {0, 1}
    assert abs((k_b == 1).float().mean() - 0.3) < 0.03 and set(k_a.tolist()) == {0, 1, 2, 3, 4}
    assert abs((k_a >= 2).float().mean() - 0.5 * 3 / 4) < 0.03  # half prefix, three of its four k above 1
    assert torch.equal(k_a[k_b == 1].clamp(max=1), torch.ones_like(k_a[k_b == 1]))  # i2v samples keep a frame
    # one latent frame: nothing to condition
    m3 = Oracle(x0[:, :, :1], noise[:, :, :1])
    L.flow_loss(m3, x0[:, :, :1], None, None, sigma, noise[:, :, :1], cond=torch.tensor([True, True]))
    assert m3.seen[-1][1].shape == (2,)


def test_keyframes_in_the_loss_the_draws_and_the_cache():
    model = tiny_dit()
    c = model.cfg
    g = torch.Generator().manual_seed(3)
    x0, eps = torch.randn(2, c.in_channels, 3, 2, 2, generator=g), torch.randn(2, c.in_channels, 3, 2, 2, generator=g)
    ctx, sigma = torch.randn(2, 4, c.caption_channels, generator=g), torch.tensor([0.4, 0.9])
    z = torch.randn(2, c.in_channels, 1, 2, 2, generator=g, requires_grad=True)
    plain = L.flow_loss(model, x0, ctx, None, sigma, eps)
    with_key = L.flow_loss(model, x0, ctx, None, sigma, eps, keyframe=(z, L.last_frame_index(3)))
    with_key.backward()
    assert abs(with_key.item() - plain.item()) > 1e-5 and z.grad.abs().sum() > 0  # the loss sees the keyframe
    # the loss is over the video's tokens only, whatever the keyframe tokens' outputs (the model drops them)
    o = Oracle(x0, eps)
    assert L.flow_loss(o, x0, None, None, sigma, eps, keyframe=(z, 16)) == 0 and o.seen[-1][2][1] == 16
    # one draw per step, a pure function of (seed, step), at the asked rates: "last", or u for a frame (--keyframe_p)
    a = L.Args(last_frame_p=0.25, keyframe_p=0.5, seed=5)
    draws = [L.keyframe_draw(a, s) for s in range(4000)]
    assert draws == [L.keyframe_draw(a, s) for s in range(4000)]
    assert abs(draws.count("last") / 4000 - 0.25) < 0.03 and abs(draws.count(None) / 4000 - 0.25) < 0.03
    us = [d for d in draws if isinstance(d, float)]
    assert all(0 <= u < 1 for u in us) and abs(sum(us) / len(us) - 0.5) < 0.03
    only_last = [L.keyframe_draw(L.Args(last_frame_p=0.25, seed=5), s) for s in range(4000)]
    assert [d == "last" for d in only_last] == [d == "last" for d in draws]  # --keyframe_p keeps the last-frame draws
    assert not any(L.keyframe_draw(L.Args(last_frame_p=0.0), s) for s in range(100))
    # the cache's encoder: the clip, its last frame encoded ALONE (a one-frame clip: itself), and (--keyframe_p) each
    # frame at a latent-frame boundary alone: pixel frames 8 and 16 of a 17-frame clip
    calls = []

    def enc(v):
        calls.append(v.shape[2])
        n = 1 + (v.shape[2] - 1) // 8
        return v[:, :, :n] * v.shape[2]  # a stand-in whose output depends on how many frames it was given
    v = torch.randn(1, 3, 17, 4, 4, generator=g)
    out = L.with_keyframes(enc, last=True, frames=True)(v)
    assert calls == [17, 1, 1, 1] and torch.equal(out["last"], v[:, :, -1:])
    assert torch.equal(out[None], v[:, :, :3] * 17)
    assert torch.equal(out["frames"], v[:, :, [8, 16]])
    calls.clear()
    one = L.with_keyframes(enc, last=True, frames=True)(v[:, :, :1])
    assert calls == [1] and one["last"] is one[None] and one["frames"] is one[None]
    b = {"latents.last": out["last"], "latents.frames": out["frames"]}
    x0 = torch.zeros(1, 8, 3, 1, 1)
    assert L.batch_keyframe(b, x0, "cpu")[1] == 16 and L.batch_keyframe(b, x0[:, :, :1], "cpu") is None
    assert L.batch_keyframe(b, x0, "cpu", None) is None
    for u, j in ((0.0, 1), (0.49, 1), (0.5, 2), (0.99, 2)):  # boundary j = 1 + floor(u (f - 1)), pixel frame 8j
        z, p = L.batch_keyframe(b, x0, "cpu", u)
        assert p == 8 * j and torch.equal(z, v[:, :, 8 * j: 8 * j + 1]), u


def scratch_dit(**kw):
    """A tiny DiT (or kw's change of it) from scratch (seed 0), its AdamW at 3e-3 and an all-zero caption: the
    learning tests' set-up."""
    import dataclasses
    torch.manual_seed(0)
    cfg = dataclasses.replace(L.DIT_PRESETS["tiny"], **kw)
    model = L.Transformer3DModel(cfg)
    model.init_weights()
    return cfg, model, torch.optim.AdamW(model.parameters(), lr=3e-3), torch.zeros(1, 2, cfg.caption_channels)


def test_the_model_learns_from_the_keyframe():
    """Clips whose one random colour is told by nothing but their last frame: a tiny DiT from scratch, trained with
    the keyframe on every other step, predicts the velocity at sigma 0.9 far better with the keyframe than without
    (measured: 0.13 against 1.08), so the keyframe's tokens reach the video's through attention and are learned."""
    cfg, model, opt, ctx = scratch_dit()

    def clips(g, B):  # (B, C, 3, 2, 2) one colour a clip, and its last frame
        x0 = torch.randn(B, cfg.in_channels, 1, 1, 1, generator=g).expand(B, -1, 3, 2, 2).contiguous()
        return x0, x0[:, :, -1:].contiguous()

    def loss(x0, last, eps, keyed):
        B = len(x0)
        return L.flow_loss(model, x0, ctx.expand(B, -1, -1), None, torch.full((B,), 0.9), eps,
                           keyframe=(last, L.last_frame_index(3)) if keyed else None)
    g = torch.Generator().manual_seed(1)
    for step in range(300):
        x0, last = clips(g, 16)
        opt.zero_grad()
        loss(x0, last, torch.randn(x0.shape, generator=g), step % 2 == 0).backward()
        opt.step()
    g = torch.Generator().manual_seed(2)
    x0, last = clips(g, 64)
    eps = torch.randn(x0.shape, generator=g)
    with torch.no_grad():
        keyed, plain = loss(x0, last, eps, True).item(), loss(x0, last, eps, False).item()
    assert keyed < 0.4 * plain, (keyed, plain)


# slow: the default run keeps the keyframe learning test above and the keyframe parity against upstream
@pytest.mark.slow
def test_the_model_learns_where_a_keyframe_sits():
    """--keyframe_p's signal is the keyframe's place: clips that are zero but for one latent frame j (random, 1..3)
    of a random colour, the keyframe that colour at pixel frame 8j. A tiny DiT from scratch, trained so, predicts the
    velocity at sigma 0.9 better given the keyframe at its frame than at another one (measured: 0.14 against 0.27
    on average), so the keyframe's RoPE time is what tells it where the colour goes."""
    cfg, model, opt, ctx = scratch_dit()

    def clips(g, B):  # (B, C, 4, 2, 2) zero but for frame j; the keyframe (B, C, 1, 2, 2); j
        b = torch.randn(B, cfg.in_channels, 1, 1, 1, generator=g).expand(B, -1, 1, 2, 2)
        j = int(torch.randint(1, 4, (1,), generator=g))
        x0 = torch.zeros(B, cfg.in_channels, 4, 2, 2)
        x0[:, :, j:j + 1] = b
        return x0, b.contiguous(), j

    def loss(x0, key, eps, j):
        B = len(x0)
        return L.flow_loss(model, x0, ctx.expand(B, -1, -1), None, torch.full((B,), 0.9), eps, keyframe=(key, 8 * j))
    g = torch.Generator().manual_seed(1)
    for _ in range(1500):
        x0, key, j = clips(g, 16)
        opt.zero_grad()
        loss(x0, key, torch.randn(x0.shape, generator=g), j).backward()
        opt.step()
    g = torch.Generator().manual_seed(2)
    right = wrong = 0.0
    for _ in range(6):
        x0, key, j = clips(g, 32)
        eps = torch.randn(x0.shape, generator=g)
        with torch.no_grad():
            right += loss(x0, key, eps, j).item()
            wrong += loss(x0, key, eps, 1 + j % 3).item()
    assert right < 0.75 * wrong, (right, wrong)


def test_the_model_learns_to_follow_a_reference_frame_by_frame():
    """IC-LoRA's signal (--reference): clips whose every latent frame has a random colour of its own, the reference
    clip the same colours (a control video that says all). A small DiT from scratch, trained with the reference in
    front at frame 0 (the target's own positions, causal RoPE time), predicts the velocity at sigma 0.9 far better
    given the reference than given it with its frames rolled by one (measured: 0.01 against 2.5) or none (2.2): it
    reads each frame from the reference frame at its own time, not the reference as a whole. (The tiny preset's 16
    channels hold 2 RoPE frequencies per axis, too few to tell its frames apart: 4 heads of 8 here.)"""
    cfg, model, opt, ctx = scratch_dit(attention_head_dim=32)

    def clips(g, B):  # (B, C, 4, 2, 2): frame k one colour, and its reference (here: the same clip)
        x0 = torch.randn(B, cfg.in_channels, 4, 1, 1, generator=g).expand(B, -1, 4, 2, 2).contiguous()
        return x0, x0.clone()

    def loss(x0, ref, eps):
        B = len(x0)
        return L.flow_loss(model, x0, ctx.expand(B, -1, -1), None, torch.full((B,), 0.9), eps,
                           keyframe=[(ref, 0)] if ref is not None else None)
    g = torch.Generator().manual_seed(1)
    for _ in range(150):
        x0, ref = clips(g, 16)
        opt.zero_grad()
        loss(x0, ref, torch.randn(x0.shape, generator=g)).backward()
        opt.step()
    g = torch.Generator().manual_seed(2)
    x0, ref = clips(g, 64)
    eps = torch.randn(x0.shape, generator=g)
    with torch.no_grad():
        aligned, rolled, none = (loss(x0, r, eps).item() for r in (ref, ref.roll(1, dims=2), None))
    assert aligned < 0.1 * min(rolled, none), (aligned, rolled, none)


def test_linear_quadratic_matches_diffusers():
    from diffusers.pipelines.ltx.pipeline_ltx_condition import linear_quadratic_schedule
    for n in (1, 8, 30, 40, 51):
        ours = L.linear_quadratic_schedule(n)
        ref = torch.as_tensor(linear_quadratic_schedule(n))
        assert ours.shape == (n,) and torch.allclose(ours.double(), ref.double()[:n], atol=1e-6)
    assert L.linear_quadratic_schedule(40)[0] == 1.0


def test_sd3_schedule_terminal():
    t = L.sampling_sigmas(20, "Uniform", 2688, "SD3", 0.1)
    assert abs(t[-1].item() - 0.1) < 1e-6 and t[0] == 1.0 and torch.all(t[1:] < t[:-1])


def test_euler_with_exact_velocity_recovers_x0():
    g = torch.Generator().manual_seed(0)
    x0 = torch.randn(1, 4, 2, 2, 2, generator=g)

    class Straight(torch.nn.Module):  # the velocity of the straight path through the current point
        def forward(self, x, t, ctx, mask, fps, keyframe=None):
            s = t[:, :1].view(-1, 1, 1, 1, 1) / 1000
            return (x - x0) / s
    ctx = (torch.zeros(1, 2, 3), torch.ones(1, 2))
    out = L.sample_euler(Straight(), torch.randn(1, 4, 2, 2, 2, generator=g), ctx, steps=10, guidance=1.0, stg=None)
    assert torch.allclose(out, x0, atol=1e-5)


def test_sampler_guidance_stg_and_image_condition():
    model = tiny_dit()
    c = model.cfg
    g = torch.Generator().manual_seed(0)
    noise = torch.randn(1, c.in_channels, 3, 2, 2, generator=g)
    ctx = (torch.randn(1, 4, c.caption_channels, generator=g), torch.tensor([[1, 1, 1, 0]]))
    neg = (torch.randn(1, 4, c.caption_channels, generator=g), torch.tensor([[1, 1, 0, 0]]))
    image = torch.randn(1, c.in_channels, 1, 2, 2, generator=g)
    a = L.sample_euler(model, noise, ctx, neg, steps=3, guidance=3.0, stg=(1.0, (1,), 0.7), cond_latent=image)
    assert torch.equal(a[:, :, :1], image)
    assert all(blk.attn1.stg_skip == 0 for blk in model.transformer_blocks)  # reset after the call
    b = L.sample_euler(model, noise, ctx, neg, steps=3, guidance=3.0, stg=None, cond_latent=image)
    assert not torch.allclose(a, b)
    # first + last frame: the keyframe goes with every branch of the guided batch (uncond, cond, STG-perturbed)
    last = torch.randn(1, c.in_channels, 1, 2, 2, generator=g)
    k = L.sample_euler(model, noise, ctx, neg, steps=3, guidance=3.0, stg=(1.0, (1,), 0.7), cond_latent=image,
                       keyframe=(last, L.last_frame_index(3)))
    assert torch.equal(k[:, :, :1], image) and k.shape == a.shape and (k - a).abs().mean() > 1e-4
    # STG's perturbed pass really differs from the conditional one
    with torch.no_grad():
        model.transformer_blocks[1].attn1.stg_skip = 1
        p = model(noise, torch.full((1,), 500.0), *ctx)
        model.transformer_blocks[1].attn1.stg_skip = 0
        q = model(noise, torch.full((1,), 500.0), *ctx)
    assert not torch.allclose(p, q)


def test_conditioning_noise_is_the_pipelines():
    """image_cond_noise_scale (inference.py's 0.15): the model sees the first-frame and keyframe latents as clean +
    scale * eps * t^2 with fresh eps each step; the sample keeps the clean first frame; scale 0 is the clean input."""
    seen = []

    class Rec(torch.nn.Module):
        transformer_blocks = []

        def forward(self, x, t, ctx, mask, fps, keyframe=None):
            seen.append((x[:, :, :1].clone(), keyframe[0][0].clone(), t))  # the sampler passes a list
            return torch.zeros_like(x)
    g = torch.Generator().manual_seed(0)
    noise, image, last = (torch.randn(1, 4, *s, generator=g) for s in ((3, 2, 2), (1, 2, 2), (1, 2, 2)))
    ctx = (torch.zeros(1, 2, 3), torch.ones(1, 2))
    out = L.sample_euler(Rec(), noise, ctx, None, steps=4, guidance=1.0, stg=None, sampler="Uniform",
                         cond_latent=image, keyframe=(last, 16), cond_noise=(0.15, torch.Generator().manual_seed(7)))
    ref = torch.Generator().manual_seed(7)
    ts = L.sampling_sigmas(4, "Uniform", 12).tolist()
    assert len(seen) == 4
    for (first, key, t), s in zip(seen, ts):
        e1, e2 = torch.randn(image.shape, generator=ref), torch.randn(last.shape, generator=ref)
        assert torch.allclose(first, image + 0.15 * s**2 * e1) and torch.allclose(key, last + 0.15 * s**2 * e2)
        assert torch.all(t[:, :4] == 0) and torch.allclose(t[:, 4:], torch.tensor(s * 1000))  # timestep 0 still
    assert torch.equal(out[:, :, :1], image)
    seen.clear()
    L.sample_euler(Rec(), noise, ctx, None, steps=2, guidance=1.0, stg=None, cond_latent=image, keyframe=(last, 16),
                   cond_noise=(0.0, torch.Generator()))
    assert all(torch.equal(f, image) and torch.equal(k, last) for f, k, _ in seen)


def test_guidance_at_most_one_is_no_cfg():
    # pipeline_ltx_video.py: do_classifier_free_guidance = guidance_scale > 1. A scale below 1 must not run the
    # negative pass nor mix it in (u + g (c - u) with g < 1 would pull towards the negative prompt).
    batches = []

    class CtxMean(torch.nn.Module):  # a velocity that depends on the prompt, so cond and uncond differ
        def forward(self, x, t, ctx, mask, fps, keyframe=None):
            batches.append(x.shape[0])
            return x * 0 + ctx.mean(dim=(1, 2)).view(-1, 1, 1, 1, 1)
    x = torch.randn(1, 4, 2, 2, 2)
    ctx, neg = (torch.full((1, 2, 3), 2.0), torch.ones(1, 2)), (torch.full((1, 2, 3), -1.0), torch.ones(1, 2))
    for g in (0.5, 1.0):
        batches.clear()
        v = L.velocity(CtxMean(), x, 0.5, ctx, neg, g, None, 25.0)
        assert batches == [1] and torch.equal(v, torch.full_like(x, 2.0)), g
    v = L.velocity(CtxMean(), x, 0.5, ctx, neg, 3.0, None, 25.0)  # above 1: -1 + 3 (2 - -1) = 8
    assert torch.allclose(v, torch.full_like(x, 8.0))


def test_header_scheduler_defaults_are_the_official_ones(tmp_path):
    # --sample_schedule checkpoint builds the official RectifiedFlowScheduler from the header's "scheduler" section
    # (rf.py: from_config, whose sampler default is "Uniform"); LinearQuadratic only when the file has no section.
    # A shifting the sampler does not implement (rf.py also knows "SimpleDiffusion") must not be dropped silently.
    import json
    from safetensors.torch import save_file

    def schedule(scheduler):
        path = str(tmp_path / "ltxv.safetensors")
        cfg = {} if scheduler is None else {"scheduler": scheduler}
        save_file({"x": torch.zeros(1)}, path, metadata={"config": json.dumps(cfg)})
        return L.sample_schedule(L.Args(ckpt_dir=path, sample_schedule="checkpoint"))
    assert schedule({"shifting": "SD3", "target_shift_terminal": 0.1}) == ("Uniform", "SD3", 0.1)
    assert schedule({"sampler": "LinearQuadratic", "shifting": None}) == ("LinearQuadratic", "", None)
    assert schedule(None) == ("LinearQuadratic", "", None)
    with pytest.raises(ValueError, match="SimpleDiffusion"):
        schedule({"sampler": "Uniform", "shifting": "SimpleDiffusion"})
