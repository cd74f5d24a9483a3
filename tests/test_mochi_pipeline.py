"""A whole sample of our sampler (sample_euler, what write_samples / --mode sample runs) against diffusers'
MochiPipeline, an independent implementation of the same sampling loop, at the tiny config (random weights, CPU,
fp32): the same initial latents, the same T5 features, diffusers' transformer loaded with our DiT's weights
(tests/test_mochi_dit.py's twin), output_type="latent" so that no VAE runs and no latents_mean/std scaling enters
(diffusers applies it only before decoding, as genmo's sample_model does via dit_latents_to_vae_latents after the
loop). Our final latents must equal diffusers' to fp32 rounding: 3e-6 of the sample's largest value (measured:
1.2e-5 at g = 6 on values up to 10, 1.7e-6 at g = 1; guidance amplifies the per-call rounding of the DiT, and each
fp32 sampler is itself ~4e-5 from a float64 run of the same loop, so the two agree better than either agrees with
exact arithmetic. A real sampling bug, e.g. one step off in the schedule or a flipped sign, shows up at O(1)).

How the two line up (diffusers 0.42.1 pipelines/mochi/pipeline_mochi.py; genmoai/mochi src/genmo/mochi_preview/
pipelines.py sample_model, the project's reference):
- schedule: both build genmo's linear_quadratic_schedule (threshold 0.025, linear_steps = steps // 2); diffusers
  drops genmo's final 0 and lets the scheduler append the end point; it also rounds the sigmas to float32 (genmo
  and we keep python floats): a ~1e-7 difference, far below the tolerance.
- time and step: FlowMatchEulerDiscreteScheduler must be built with invert_sigmas=True (the scheduler's own
  comment: "This case is only required in Mochi"). It then stores 1 - sigma, feeds the transformer
  timestep = 1000 * (1 - sigma) (genmo: the DiT gets sigma and embeds 1000 * (1 - sigma) itself; so do we), and
  steps z + ((1 - s_next) - (1 - s)) * pred = z + (s - s_next) * pred: genmo's `z = z + dsigma * pred` with pred
  the x0 - eps direction, no sign flip. With the library's default (invert_sigmas=False) diffusers would feed
  1000 * sigma and integrate backwards, so that configuration is not a meaningful reference and is not used.
  The test also checks, per step, the timesteps diffusers' transformer saw against the sigmas ours saw.
- guidance: uncond + g * (cond - uncond) in fp32 in all three. Diffusers batches [negative; prompt], genmo
  [prompt; negative], we [cond; uncond]: the DiT treats samples independently, so order is immaterial. Diffusers
  runs CFG only when g > 1 (a single conditional pass otherwise); genmo always evaluates the formula, which at
  g = 1 is the conditional output, and so do we (we skip the uncond pass only at g == 1). They differ for g < 1,
  where diffusers silently ignores the negative prompt; we follow genmo, and the test compares only g = 1 and
  g > 1, where all three agree.
- text: diffusers needs prompt and negative embeddings of one padded shape with masks; genmo pads to 256 with the
  tokenizer's mask, and encodes the empty negative prompt as ids 0 with an all-False mask (diffusers does that only
  with force_zeros_for_empty_prompt=True; its default encodes "" as one EOS token). That is a text-encoding
  difference, bypassed here: both sides get the same precomputed features, and the negative here is genmo's empty
  prompt (all-False mask) or a short real one. Ours gets the prompts as write_samples passes them (the cached real
  tokens only, all-True masks, cond and uncond of different lengths), diffusers the padded text_len-long features
  with junk in the padded rows, so the test also covers our length padding and diffusers' masking meeting."""
import pytest
import torch

import train_mochi as M
from tests.test_mochi_dit import diffusers_twin, tiny_dit


@pytest.fixture(scope="module")
def pair():
    m = tiny_dit()
    return m, diffusers_twin(m)


def diffusers_pipeline(transformer):
    from diffusers import FlowMatchEulerDiscreteScheduler, MochiPipeline
    # no text encoder, tokenizer or VAE: the embeddings are given and output_type="latent" never decodes
    pipe = MochiPipeline(scheduler=FlowMatchEulerDiscreteScheduler(invert_sigmas=True), vae=None, text_encoder=None,
                         tokenizer=None, transformer=transformer)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def prompts(cfg, lengths, seed):
    """(B, text_len, t5_dim) features whose rows past each prompt's length are junk, and the right-padded masks."""
    g = torch.Generator().manual_seed(seed)
    y = torch.randn(len(lengths), cfg.text_len, cfg.t5_dim, generator=g)
    mask = torch.arange(cfg.text_len)[None] < torch.tensor(lengths)[:, None]
    return y, mask


@pytest.mark.parametrize("steps,guidance,pos_len,neg_len,batch", [
    (4, 6.0, [11], [0], 1),  # upstream's default guidance against the empty negative prompt (no text at all)
    (4, 1.0, [11], [0], 1),  # no guidance: one conditional pass (diffusers), the formula at g = 1 (genmo)
    (5, 4.5, [7, 16], [3, 0], 2),  # odd steps (2 linear + 3 quadratic), two prompts, a real negative prompt
])
def test_sample_matches_diffusers_pipeline(pair, steps, guidance, pos_len, neg_len, batch):
    model, ref = pair
    c = model.cfg
    T, H, W = 2, 4, 6  # latent frames, height, width
    noise = torch.randn(batch, c.in_channels, T, H, W, generator=torch.Generator().manual_seed(7))
    y, mask = prompts(c, pos_len, seed=8)
    ny, nmask = prompts(c, neg_len, seed=9)

    seen_ours, seen_ref = [], []
    h1 = model.register_forward_pre_hook(lambda mod, args: seen_ours.append(args[1].clone()))
    h2 = ref.register_forward_pre_hook(lambda mod, args, kw: seen_ref.append(kw["timestep"].clone()),
                                       with_kwargs=True)
    try:
        if batch == 1:  # exactly write_samples' inputs: each prompt's real tokens only, an all-True mask
            cond = (y[:, :pos_len[0]], torch.ones(1, pos_len[0], dtype=torch.bool))
            uncond = (ny[:, :neg_len[0]], torch.ones(1, neg_len[0], dtype=torch.bool))
        else:
            cond, uncond = (y, mask), (ny, nmask)
        ours = M.sample_euler(model, noise.clone(), cond, uncond, steps=steps, guidance=guidance)
        theirs = diffusers_pipeline(ref)(
            latents=noise.clone(), prompt_embeds=y, prompt_attention_mask=mask, negative_prompt_embeds=ny,
            negative_prompt_attention_mask=nmask, num_inference_steps=steps, guidance_scale=guidance,
            height=8 * H, width=8 * W, num_frames=6 * (T - 1) + 1, max_sequence_length=c.text_len,
            output_type="latent", return_dict=False)[0]
    finally:
        h1.remove()
        h2.remove()

    # the same number of DiT calls, each with the same conditioning time 1000 * (1 - sigma) for every sample
    assert len(seen_ours) == len(seen_ref) == steps
    sigmas = M.linear_quadratic_schedule(steps)
    cfg_batch = batch * (2 if guidance > 1 else 1)
    for s, ts_ours, ts_ref in zip(sigmas, seen_ours, seen_ref):
        assert ts_ours.shape == ts_ref.shape == (cfg_batch,)
        assert torch.allclose(1000 * (1 - ts_ours), ts_ref, atol=1e-3) and abs(ts_ref[0] - 1000 * (1 - s)) < 1e-3

    assert ours.shape == theirs.shape == noise.shape and ours.dtype == theirs.dtype == torch.float32
    err = (ours - theirs).abs().max().item()
    moved = (ours - noise).abs().max().item()
    print(f"steps={steps} guidance={guidance}: max |ours - diffusers| {err:.2e}, max |z - noise| {moved:.2f}")
    assert moved > 0.1  # the sample went somewhere: equal outputs are not two no-ops
    assert err <= 3e-6 * max(1.0, theirs.abs().max().item()), err


def test_guidance_changes_the_sample(pair):
    """The guided and unguided samples of the cases above differ: the comparison at g > 1 does exercise the
    negative prompt (a sampler that dropped it would still match at g = 1 only)."""
    model, _ = pair
    c = model.cfg
    noise = torch.randn(1, c.in_channels, 2, 4, 6, generator=torch.Generator().manual_seed(7))
    y, _ = prompts(c, [11], seed=8)
    cond = (y[:, :11], torch.ones(1, 11, dtype=torch.bool))
    uncond = (y[:, :0], torch.ones(1, 0, dtype=torch.bool))
    a = M.sample_euler(model, noise, cond, uncond, steps=4, guidance=1.0)
    b = M.sample_euler(model, noise, cond, uncond, steps=4, guidance=6.0)
    assert (a - b).abs().max() > 1e-2
