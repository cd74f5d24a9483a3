"""Samplers: UniPC against diffusers' UniPCMultistepScheduler (configured as the official FlowUniPC) and against golden
outputs of the official scheduler itself; Euler and UniPC on an exactly straight path; classifier-free guidance;
the official sigma/timestep schedule; and an mp4 write/read round trip."""
import os

import av
import numpy as np
import pytest
import torch
from safetensors.torch import load_file

import train_wan as W
from data.video import write_video

sample_unipc, unipc_timesteps = W.sample_unipc, W.unipc_timesteps

GOLDEN = os.path.join(os.path.dirname(os.path.abspath(__file__)), "fixtures", "wan21_unipc_golden.safetensors")
# (steps, shift, guidance) of the golden file; shift 1 with 9 steps has sigma * 1000 on integers (666, 333), where
# the timestep truncation is the most fragile
GOLDEN_CASES = [(10, 5.0, 5.0), (25, 5.0, 5.0), (9, 1.0, 5.0), (12, 3.0, 2.5)]
SIGMA_MAX = float(np.float32(0.999))  # upstream's sigma_max: 1 - 1/1000 as its fp32 training table stores it


class ToyVelocity:
    """A deterministic stand-in for the DiT: nonlinear in x, depends on t (so a wrong timestep shows) and on the
    context (so cond != uncond). x (B,C,F,H,W), t (B,), context (B,L,D) -> (B,C,F,H,W) fp32."""

    def __init__(self, w, b):
        self.w, self.b = w, b  # (C, C) channel mix, (C,) per-channel time response

    def __call__(self, x, t, context):
        mix = torch.tanh(torch.einsum("oc,bcfhw->bofhw", self.w, x.float()))
        time = torch.cos(t.float() / 50).view(-1, 1, 1, 1, 1) * self.b.view(1, -1, 1, 1, 1)
        text = context.float().mean(dim=(1, 2)).view(-1, 1, 1, 1, 1)
        return mix + time + text


def toy_inputs(seed=0, C=4, Fr=2, H=4, Wd=4):
    g = torch.Generator().manual_seed(seed)
    model = ToyVelocity(torch.randn(C, C, generator=g), torch.randn(C, generator=g))
    noise = torch.randn(1, C, Fr, H, Wd, generator=g)
    return model, noise, torch.randn(1, 3, 8, generator=g), torch.randn(1, 3, 8, generator=g)


def upstream_schedule(steps, shift):
    """FlowUniPCMultistepScheduler.set_timesteps(steps, shift=shift), its numpy lines: float64 sigmas before the fp32
    cast, and the int64 timesteps."""
    s = np.linspace(SIGMA_MAX, 0, steps + 1).copy()[:-1]
    s = shift * s / (1 + (shift - 1) * s)
    return np.concatenate([s, [0.0]]), (s * 1000).astype(np.int64)


# -----------------------------------------------------------------------------------------------------
# schedule


@pytest.mark.parametrize("steps,shift", [(10, 5.0), (25, 5.0), (50, 3.0), (9, 1.0)])
def test_sampling_sigmas_match_upstream(steps, shift):
    ours = W.sampling_sigmas(steps, shift)
    assert ours.dtype == torch.float64 and ours.shape == (steps + 1,)
    assert ours[0].item() == pytest.approx(shift * 0.999 / (1 + (shift - 1) * 0.999), abs=1e-12) and ours[-1] == 0
    assert (ours[1:] < ours[:-1]).all()
    ref, _ = upstream_schedule(steps, shift)
    # only difference: we start at 0.999, upstream at fp32(0.999) = 0.999 + 1.3e-8
    assert np.abs(ours.numpy() - ref).max() < 5e-8


def test_unipc_timesteps_match_upstream():
    # int(sampling_sigmas * 1000) would be off by one in 50 of these (shift 1: 666.0 vs 665.99999...)
    for shift in (1.0, 3.0, 5.0, 8.0):
        for steps in range(1, 61):
            assert unipc_timesteps(steps, shift).tolist() == upstream_schedule(steps, shift)[1].tolist(), (steps, shift)


# -----------------------------------------------------------------------------------------------------
# UniPC parity


def diffusers_unipc(steps, shift):
    """diffusers' UniPCMultistepScheduler with the official FlowUniPC settings (upstream's defaults: order 2, bh2,
    predict_x0, lower_order_final, final sigma 0, no thresholding / dynamic shifting / disabled corrector steps).
    Given explicit unshifted sigmas: its own set_timesteps(steps) (what diffusers' WanPipeline calls) starts from
    linspace(1, 1/1000, steps + 1), i.e. sigma 1 - 1e-6, not upstream's 0.999."""
    from diffusers import UniPCMultistepScheduler

    sched = UniPCMultistepScheduler(num_train_timesteps=1000, solver_order=2, prediction_type="flow_prediction",
                                    use_flow_sigmas=True, flow_shift=shift, predict_x0=True, solver_type="bh2",
                                    lower_order_final=True, final_sigmas_type="zero", thresholding=False,
                                    use_dynamic_shifting=False, disable_corrector=[])
    sched.set_timesteps(sigmas=np.linspace(SIGMA_MAX, 0, steps + 1)[:-1])
    return sched


@pytest.mark.parametrize("steps,shift", [(10, 5.0), (25, 5.0)])
def test_unipc_matches_diffusers(steps, shift):
    guidance = 5.0
    model, noise, ctx, neg = toy_inputs()
    sched = diffusers_unipc(steps, shift)
    # the schedule: diffusers' fp32 sigmas = ours; its int timesteps = what we feed the model
    assert (sched.sigmas.double() - W.sampling_sigmas(steps, shift)).abs().max() < 1e-7
    assert sched.timesteps.tolist() == unipc_timesteps(steps, shift).tolist()

    x = noise.clone()
    for t in sched.timesteps:
        cond, uncond = model(x, t[None], ctx), model(x, t[None], neg)
        x = sched.step(uncond + guidance * (cond - uncond), t, x).prev_sample
    ours = sample_unipc(model, noise, ctx, neg, steps=steps, guidance=guidance, shift=shift)
    assert ours.dtype == torch.float32 and ours.shape == noise.shape
    diff = (ours - x).abs().max().item()
    assert diff <= 1e-5, diff
    # the comparison can tell solvers apart: Euler on the same schedule lands far away
    euler = W.sample_euler(model, noise, ctx, neg, steps=steps, guidance=guidance, shift=shift)
    assert (euler - x).abs().max() > 1e-2


def test_unipc_matches_upstream_golden():
    """Against the official FlowUniPCMultistepScheduler (tests/fixtures/make_wan_unipc_golden.py)."""
    gold = load_file(GOLDEN)
    model = ToyVelocity(gold["w"], gold["b"])
    seen = []

    def recording(x, t, context):
        seen.extend(t.tolist())
        return model(x, t, context)

    for steps, shift, guidance in GOLDEN_CASES:
        key = f"{steps}_{shift}_{guidance}"
        assert (gold[f"sigmas_{key}"].double() - W.sampling_sigmas(steps, shift)).abs().max() < 1e-7
        assert unipc_timesteps(steps, shift).tolist() == gold[f"timesteps_{key}"].tolist()
        seen.clear()
        ours = sample_unipc(recording, gold["noise"], gold["context"], gold["neg_context"], steps=steps,
                            guidance=guidance, shift=shift)
        # the model saw upstream's integer timesteps, each once for the cond+uncond batch of 2
        assert seen == [float(t) for t in gold[f"timesteps_{key}"].tolist() for _ in range(2)]
        diff = (ours - gold[f"x0_{key}"]).abs().max().item()
        assert diff <= 1e-5, (key, diff)


# -----------------------------------------------------------------------------------------------------
# exact straight path, CFG


def straight_path_model(x0, sigma_of_t):
    """Returns the exact velocity of the straight path from x0 through the current point, v = (x - x0) / sigma, with
    sigma read off the model timestep (each sampler's own mapping). Ignores the context, so cond == uncond."""

    def model(x, t, context):
        s = torch.tensor([sigma_of_t(ti) for ti in t.tolist()], dtype=torch.float64).view(-1, 1, 1, 1, 1)
        x0b = x0.repeat(x.shape[0] // x0.shape[0], 1, 1, 1, 1)  # CFG doubles the batch
        return ((x.double() - x0b) / s).float()

    return model


@pytest.mark.parametrize("sampler", ["euler", "unipc"])
@pytest.mark.parametrize("guidance", [1.0, 5.0])
@pytest.mark.parametrize("steps", [1, 10])
def test_samplers_recover_x0_on_straight_path(sampler, guidance, steps):
    shift = 5.0
    g = torch.Generator().manual_seed(3)
    x0, noise = torch.randn(2, 4, 3, 4, 6, generator=g), torch.randn(2, 4, 3, 4, 6, generator=g)
    ctx = torch.randn(2, 5, 8, generator=g)
    if sampler == "euler":  # Euler feeds t = 1000 * sigma
        fn, sigma_of_t = W.sample_euler, lambda t: t / 1000
    else:  # UniPC feeds upstream's truncated integers: look the exact sigma up
        fn = sample_unipc
        table = dict(zip(unipc_timesteps(steps, shift).tolist(), W.sampling_sigmas(steps, shift).tolist()))
        sigma_of_t = lambda t: table[int(t)]  # noqa: E731  (a KeyError = a timestep upstream never passes)
    out = fn(straight_path_model(x0, sigma_of_t), noise, ctx, ctx.clone(), steps=steps, guidance=guidance,
             shift=shift)
    assert (out - x0).abs().max() <= 1e-5


def test_velocity_cfg():
    model, noise, ctx, neg = toy_inputs(seed=5)
    t = torch.tensor([731.0])
    cond, uncond = model(noise, t, ctx), model(noise, t, neg)
    assert (cond - uncond).abs().min() > 1e-3  # the two halves really differ
    for g in (1.0, 3.0, 7.5):
        assert torch.allclose(W.velocity(model, noise, 0.731, ctx, neg, g), uncond + g * (cond - uncond), atol=1e-6)
    assert torch.allclose(W.velocity(model, noise, 0.731, ctx, None, 5.0), cond, atol=1e-6)  # no negative: cond only


@pytest.mark.parametrize("sampler", ["euler", "unipc"])
def test_samplers_use_cfg_velocity(sampler):
    """One step from sigma_0 to 0 is x = noise - sigma_0 * v for both samplers: read back the v they used."""
    model, noise, ctx, neg = toy_inputs(seed=6)
    g, shift = 4.0, 5.0
    sigma0 = W.sampling_sigmas(1, shift)[0].item()
    t = torch.tensor([sigma0 * 1000 if sampler == "euler" else float(unipc_timesteps(1, shift)[0])])
    expected = model(noise, t, neg) + g * (model(noise, t, ctx) - model(noise, t, neg))
    fn = W.sample_euler if sampler == "euler" else sample_unipc
    out = fn(model, noise, ctx, neg, steps=1, guidance=g, shift=shift)
    assert torch.allclose((noise - out) / sigma0, expected, atol=1e-5)


# -----------------------------------------------------------------------------------------------------
# mp4


def test_mp4_round_trip(tmp_path):
    Fr, H, Wd, fps = 17, 48, 80, 16
    # smooth moving colour waves (h264 keeps them well; white noise would not survive any lossy codec)
    f = torch.arange(Fr).view(Fr, 1, 1)
    y, x = torch.arange(H).view(1, H, 1), torch.arange(Wd).view(1, 1, Wd)
    video = torch.stack([torch.sin((x + 2 * f) / 9.0) * torch.cos(y / 11.0),
                         torch.cos((y - f) / 7.0) * 0.8 + 0 * x,
                         torch.sin((x + y + 3 * f) / 13.0) * 0.9]).float()  # (3, F, H, W) in [-1, 1]
    path = tmp_path / "clip.mp4"
    write_video(str(path), video, fps)
    with av.open(str(path)) as c:
        s = c.streams.video[0]
        assert float(s.average_rate) == pytest.approx(fps)
        frames = [fr.to_ndarray(format="rgb24") for fr in c.decode(s)]
    assert len(frames) == Fr and frames[0].shape == (H, Wd, 3)
    back = torch.from_numpy(np.stack(frames)).permute(3, 0, 1, 2).float() / 127.5 - 1  # (3, F, H, W)
    err = (back - video).abs().mean().item()
    assert err < 0.05, err
