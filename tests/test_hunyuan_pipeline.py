"""A whole sample of our sampler (train_hunyuan.sample_euler, what write_samples / --mode sample run) against
diffusers' HunyuanVideoPipeline (an independent implementation), at the tiny config with random weights, fp32 on
CPU: the same initial latents, the same precomputed text embeddings (no text encoder runs, output_type="latent" so
no VAE runs either), the diffusers twin of our DiT (tests/test_hunyuan_dit.py) as its transformer, 4 steps.

Lined up against upstream (Tencent/HunyuanVideo hyvideo/diffusion/schedulers/scheduling_flow_match_discrete.py,
hyvideo/diffusion/pipelines/pipeline_hunyuan_video.py, hyvideo/config.py; the sample scripts pass --flow-reverse):
- schedule: upstream sigmas = sd3_time_shift(linspace(1, 0, N + 1)) (N + 1 values, the last 0), t = 1000 * sigma
  of the first N, Euler x += v * (sigma[i+1] - sigma[i]) in fp32. diffusers takes linspace(1, 0, N + 1)[:-1], shifts
  it with the same formula (FlowMatchEulerDiscreteScheduler(shift=7.0), no dynamic shifting) and appends 0: the same
  schedule, so diffusers' own default schedule is compared (its sigmas and timesteps are checked too).
- shift: upstream's --flow-shift default 7.0, our --sample_shift default.
- embedded guidance: upstream makes torch.tensor(scale, fp32).to(target_dtype) * 1000 with --precision bf16 by
  default, so 6.0 becomes 6016; we always feed that bf16 value (embedded_guidance). diffusers makes it in the
  transformer's dtype: 6000 in fp32 (6016 in bf16 too). This is the one difference, and it is upstream's default
  that we follow: diffusers is given guidance_scale = 6.016 (exactly 6016 after its fp32 * 1000) to compare.
- true CFG (upstream --cfg-scale > 1 with the negative prompt, pipeline line ~1008): uncond + s * (cond - uncond),
  the embedded guidance fed to both halves, in upstream and in both samplers here (ours: cfg_scale with neg_text,
  one batch uncond first as upstream; diffusers: true_cfg_scale with negative_* embeds, two passes).
- text masks: right-padded 0/1; diffusers and we both mask the padded keys, so a negative prompt given to diffusers
  trimmed to its true length gives what ours gives padded to the prompt's length (as write_samples pads them).
"""
import numpy as np
import pytest
import torch

import train_hunyuan as H
from tests.test_hunyuan_dit import diffusers_twin, tiny_dit

STEPS, SHIFT, EMBEDDED = 4, 7.0, 6.0


def text(cfg, B, L, lengths, seed):
    g = torch.Generator().manual_seed(seed)
    states = torch.randn(B, L, cfg.text_states_dim, generator=g)
    mask = (torch.arange(L)[None] < torch.tensor(lengths)[:, None]).long()
    return states, mask, torch.randn(B, cfg.text_states_dim_2, generator=g)


def pipeline(model):
    """diffusers' pipeline around the twin of our DiT; no text encoders, tokenizers or VAE (all None)."""
    from diffusers import FlowMatchEulerDiscreteScheduler, HunyuanVideoPipeline
    pipe = HunyuanVideoPipeline(text_encoder=None, tokenizer=None, transformer=diffusers_twin(model), vae=None,
                                scheduler=FlowMatchEulerDiscreteScheduler(shift=SHIFT), text_encoder_2=None,
                                tokenizer_2=None)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def record(module, calls):
    """Keep each forward's (timestep, guidance) as the transformer saw them."""
    def hook(_, args, kwargs):
        t = kwargs["timestep"] if "timestep" in kwargs else args[1]
        g = kwargs["guidance"] if "guidance" in kwargs else args[-1]
        calls.append((t.clone(), g.clone()))
    return module.register_forward_pre_hook(hook, with_kwargs=True)


def run_diffusers(pipe, noise, cond, neg=None, cfg_scale=1.0):
    states, mask, pooled = cond
    kw = {}
    if neg is not None:
        kw = dict(negative_prompt_embeds=neg[0], negative_prompt_attention_mask=neg[1],
                  negative_pooled_prompt_embeds=neg[2], true_cfg_scale=cfg_scale)
    T, h, w = noise.shape[2:]
    # the guidance value upstream's bf16 pipeline (and ours) feeds: bf16(6.0) * 1000 = 6016, exact in fp32 as 6.016
    scale = H.embedded_guidance(EMBEDDED, 1)[0].item() / 1000
    with torch.no_grad():
        return pipe(prompt_embeds=states, prompt_attention_mask=mask, pooled_prompt_embeds=pooled, latents=noise,
                    height=8 * h, width=8 * w, num_frames=4 * (T - 1) + 1, num_inference_steps=STEPS,
                    guidance_scale=scale, output_type="latent", return_dict=False, **kw)[0]


def test_schedule_matches_diffusers_and_upstream():
    from diffusers import FlowMatchEulerDiscreteScheduler
    ours = H.sampling_sigmas(STEPS, SHIFT)
    # upstream: sd3_time_shift on linspace(1, 0, N + 1), reverse=True keeps it descending, ends at 0
    lin = torch.linspace(1, 0, STEPS + 1)
    assert torch.equal(ours, SHIFT * lin / (1 + (SHIFT - 1) * lin))
    assert ours[0] == 1 and ours[-1] == 0 and len(ours) == STEPS + 1
    s = FlowMatchEulerDiscreteScheduler(shift=SHIFT)
    s.set_timesteps(sigmas=np.linspace(1.0, 0.0, STEPS + 1)[:-1])  # as HunyuanVideoPipeline calls it
    assert (s.sigmas - ours).abs().max() <= 1e-7
    assert (s.timesteps - ours[:-1] * 1000).abs().max() <= 1e-4
    assert H.embedded_guidance(6.0, 1).item() == 6016 and H.embedded_guidance(1.0, 1).item() == 1000


@pytest.mark.parametrize("cfg_scale", [1.0, 3.0])
def test_sample_matches_diffusers_pipeline(cfg_scale):
    model = tiny_dit()
    pipe = pipeline(model)
    c = model.cfg
    B, T, h, w, L = 2, 2, 8, 8, 10
    noise = torch.randn(B, c.in_channels, T, h, w, generator=torch.Generator().manual_seed(3))
    cond = text(c, B, L, [L, 6], seed=4)  # the second prompt right-padded
    neg = text(c, B, 7, [7, 4], seed=5) if cfg_scale > 1 else None  # shorter than the prompts
    ours_calls, theirs_calls = [], []
    hooks = [record(model, ours_calls), record(pipe.transformer, theirs_calls)]
    theirs = run_diffusers(pipe, noise, cond, neg, cfg_scale)
    # ours takes cond and uncond in one batch: the negative padded to the prompts' length, as write_samples does
    ours_neg = None if neg is None else H.pad_text(neg, L)
    ours = H.sample_euler(model, noise, cond, ours_neg, steps=STEPS, shift=SHIFT, embedded_scale=EMBEDDED,
                          cfg_scale=cfg_scale)
    for hk in hooks:
        hk.remove()
    # the model saw the same timesteps (1000 * sigma, in [0, 1000]) and the same embedded guidance at every step
    assert len(ours_calls) == STEPS and len(theirs_calls) == STEPS * (2 if neg is not None else 1)
    every = theirs_calls[::2] if neg is not None else theirs_calls
    for (t, g), (t2, g2) in zip(ours_calls, every):
        assert torch.allclose(t, t2[:1].expand_as(t), atol=1e-4) and torch.equal(g, g2[:1].expand_as(g))
    assert ours_calls[0][0].max() == 1000 and (ours_calls[0][1] == 6016).all()
    assert ours.shape == theirs.shape == noise.shape
    err = (ours - theirs).abs().max().item()
    assert err <= 1e-5, err
    assert (ours - noise).abs().mean() > 0.1  # the sample moved: the comparison is not of two copies of the noise
