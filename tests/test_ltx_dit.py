"""The LTX DiT against diffusers' LTXVideoTransformer3DModel (an independent implementation) at a tiny config with
every weight random, through diffusers' own key names; the RoPE grid against the pipeline's formula; full-size
keys, shapes and parameter counts on the meta device against fixtures made from the official code."""
import os

import pytest
import torch

import train_ltx as L
from tests.checks import check_full_size_keys

FIX = os.path.join(os.path.dirname(__file__), "fixtures")


def randomise(model, seed=0):
    """O(1)-effect random weights everywhere: no zero output layer, no unit norms hide a bug."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("norm.weight"):
                p.copy_(1 + 0.2 * torch.randn(p.shape, generator=g))
            elif p.dim() == 1 or "scale_shift_table" in name:
                p.copy_(0.2 * torch.randn(p.shape, generator=g))
            else:
                p.copy_(torch.randn(p.shape, generator=g) * p[0].numel() ** -0.5)
    return model


def tiny_dit(seed=0, **kw):
    import dataclasses
    return randomise(L.Transformer3DModel(dataclasses.replace(L.DIT_PRESETS["tiny"], **kw)), seed).eval()


# original (LTX-Video) key -> diffusers key, as diffusers' own single-file conversion renames them
def to_diffusers(sd):
    out = {}
    for k, v in sd.items():
        for a, b in (("patchify_proj.", "proj_in."), ("adaln_single.", "time_embed."), (".q_norm.", ".norm_q."),
                     (".k_norm.", ".norm_k.")):
            k = k.replace(a, b)
        out[k] = v.clone()
    return out


def diffusers_twin(model):
    from diffusers import LTXVideoTransformer3DModel
    c = model.cfg
    ref = LTXVideoTransformer3DModel(in_channels=c.in_channels, out_channels=c.out_channels,
                                     num_attention_heads=c.num_attention_heads,
                                     attention_head_dim=c.attention_head_dim, cross_attention_dim=c.cross_attention_dim,
                                     num_layers=c.num_layers, caption_channels=c.caption_channels)
    ref.load_state_dict(to_diffusers(model.state_dict()), strict=True)
    return ref.eval()


def pipeline_coords(B, f, h, w, fps, causal):
    """The LTX-Video pipeline's video_coords, written out from its description: latent corner (f, h, w) * (8, 32, 32),
    the causal fix (t + 1 - 8).clamp(0), time times 1/frame_rate."""
    ff, hh, ww = torch.meshgrid(torch.arange(f), torch.arange(h), torch.arange(w), indexing="ij")
    c = torch.stack([ff, hh, ww]).reshape(3, -1)[None].repeat(B, 1, 1) * torch.tensor([8, 32, 32])[None, :, None]
    if causal:
        c[:, 0] = (c[:, 0] + 1 - 8).clamp(min=0)
    c = c.float()
    c[:, 0] = c[:, 0] * (1.0 / fps)
    return c


@pytest.mark.parametrize("f,h,w,per_token,causal", [(3, 4, 6, True, True), (2, 5, 3, False, False),
                                                     (1, 2, 7, True, False)])
def test_dit_matches_diffusers(f, h, w, per_token, causal):
    model = tiny_dit(causal_temporal_positioning=causal)
    ref = diffusers_twin(model)
    c = model.cfg
    g = torch.Generator().manual_seed(1)
    B, Lt, N = 2, 7, f * h * w
    x = torch.randn(B, c.in_channels, f, h, w, generator=g)
    t = torch.rand(B, N, generator=g) * 1000 if per_token else torch.tensor([999.0, 17.5])
    ctx = torch.randn(B, Lt, c.caption_channels, generator=g)
    mask = torch.ones(B, Lt)
    mask[0, 5:] = 0  # unequal prompt lengths
    mask[1, 2:] = 0
    fps = 24.0
    with torch.no_grad():
        ours = model(x, t, ctx, mask, frame_rate=fps)
        theirs = ref(x.flatten(2).transpose(1, 2), ctx, t, mask, video_coords=pipeline_coords(B, f, h, w, fps, causal),
                     return_dict=False)[0]
    theirs = theirs.transpose(1, 2).reshape(ours.shape)
    assert ours.shape == (B, c.out_channels, f, h, w)
    err = (ours - theirs).abs().max().item()
    assert err <= 1e-5, err
    assert ours.abs().mean() > 0.1  # not a trivially small output


def with_tokens_in_front(model, ref, x, t, ctx, mask, fps, keyframe, tt, coords):
    """Ours with `keyframe` = (z, p), and diffusers' transformer given z's tokens in front of x's with the per-token
    timesteps tt and video_coords `coords`, its outputs for z dropped -> (ours, theirs, ours without z)."""
    z = keyframe[0]
    with torch.no_grad():
        ours = model(x, t, ctx, mask, frame_rate=fps, keyframe=keyframe)
        tokens = torch.cat([z.flatten(2).transpose(1, 2), x.flatten(2).transpose(1, 2)], dim=1)
        theirs = ref(tokens, ctx, tt, mask, video_coords=coords, return_dict=False)[0][:, z[0, 0].numel():]
        plain = model(x, t, ctx, mask, frame_rate=fps)
    return ours, theirs.transpose(1, 2).reshape(ours.shape), plain


@pytest.mark.parametrize("causal,per_token", [(True, False), (False, True)])
def test_keyframe_matches_diffusers(causal, per_token):
    """Keyframe conditioning as the 0.9.5+ pipeline builds it for an image away from frame 0 (prepare_conditioning):
    the image's latent tokens in front of the video's, their video_coords the pixel coordinates of a one-frame grid
    + the frame number, then x 1/frame_rate, timestep 0; diffusers' transformer given exactly that, its keyframe
    outputs dropped, against ours with keyframe=(z, p)."""
    model = tiny_dit(causal_temporal_positioning=causal)
    ref = diffusers_twin(model)
    c = model.cfg
    g = torch.Generator().manual_seed(2)
    B, Lt, (f, h, w), fps = 2, 6, (3, 2, 5), 16.0
    N, M = f * h * w, h * w
    x, z = torch.randn(B, c.in_channels, f, h, w, generator=g), torch.randn(B, c.in_channels, 1, h, w, generator=g)
    t = torch.rand(B, N, generator=g) * 1000 if per_token else torch.tensor([640.0, 3.0])
    ctx, mask = torch.randn(B, Lt, c.caption_channels, generator=g), torch.ones(B, Lt)
    mask[1, 3:] = 0
    p = L.last_frame_index(f)
    assert p == 16  # 17 frames: the last is pixel frame 16
    key_coords = pipeline_coords(B, 1, h, w, 1.0, causal)  # the one-frame grid's pixel coordinates (time 0) ...
    key_coords[:, 0] = (key_coords[:, 0] + p) * (1.0 / fps)  # ... + media_frame_number, then the time in seconds
    coords = torch.cat([key_coords, pipeline_coords(B, f, h, w, fps, causal)], dim=2)
    tt = torch.cat([torch.zeros(B, M), t if per_token else t[:, None].expand(B, N)], dim=1)
    ours, theirs, plain = with_tokens_in_front(model, ref, x, t, ctx, mask, fps, (z, p), tt, coords)
    err = (ours - theirs).abs().max().item()
    assert err <= 1e-5, err
    assert (ours - plain).abs().mean() > 1e-3  # the keyframe is attended to
    with torch.no_grad():  # and where it sits matters (its RoPE time)
        assert (model(x, t, ctx, mask, frame_rate=fps, keyframe=(z, 8)) - ours).abs().max() > 1e-4


@pytest.mark.parametrize("causal,ref_frames", [(True, 3), (False, 1)])
def test_reference_matches_diffusers(causal, ref_frames):
    """IC-LoRA's reference as LTX-Video-Trainer trains it (ReferenceVideoTrainingStrategy): the reference's clean
    tokens in front of the target's, with the target's own video_coords (prepare_video_coordinates with
    sequence_multiplier 2: the grid twice), timestep 0, loss on the target only; diffusers' transformer given exactly
    that, against ours with keyframe=(reference, 0). ref_frames 1: an image reference, at the first frame's place."""
    model = tiny_dit(causal_temporal_positioning=causal)
    ref = diffusers_twin(model)
    c = model.cfg
    g = torch.Generator().manual_seed(4)
    B, Lt, (f, h, w), fps = 2, 5, (3, 2, 3), 24.0
    N, M = f * h * w, ref_frames * h * w
    x = torch.randn(B, c.in_channels, f, h, w, generator=g)
    z = torch.randn(B, c.in_channels, ref_frames, h, w, generator=g)
    t = torch.tensor([900.0, 250.0])
    ctx, mask = torch.randn(B, Lt, c.caption_channels, generator=g), torch.ones(B, Lt)
    mask[0, 2:] = 0
    coords = torch.cat([pipeline_coords(B, ref_frames, h, w, fps, causal), pipeline_coords(B, f, h, w, fps, causal)],
                       dim=2)
    tt = torch.cat([torch.zeros(B, M), t[:, None].expand(B, N)], dim=1)
    ours, theirs, plain = with_tokens_in_front(model, ref, x, t, ctx, mask, fps, (z, 0), tt, coords)
    err = (ours - theirs).abs().max().item()
    assert err <= 1e-5, err
    assert (ours - plain).abs().mean() > 1e-3  # the reference is attended to
    # the batch's reference, from the cache, goes in front of the step's keyframe (batch_keyframes)
    b = {"reference": z, "latents.last": z[:, :, :1]}
    keys = L.batch_keyframes(b, x, "cpu", "last", reference=True)
    assert [(k[0].shape[2], k[1]) for k in keys] == [(ref_frames, 0), (1, L.last_frame_index(f))]
    assert L.batch_keyframes(b, x, "cpu", None) is None and len(L.batch_keyframes(b, x, "cpu", None, True)) == 1


def test_rope_grid_is_the_pipelines():
    for causal in (False, True):
        got = L.rope_grid(4, 3, 5, 30.0, causal)
        assert torch.equal(got, pipeline_coords(1, 4, 3, 5, 30.0, causal)[0])
    g = L.rope_grid(3, 1, 1, 1.0, True)
    assert g[0].tolist() == [0.0, 1.0, 9.0]  # frame 0 -> 0, frame 1 -> 1, frame 2 -> 9 (causal fix)


def test_rope_padding_and_full_size_angles():
    # 2B: D = 2048, 341 frequencies, 2 padded channels at the front (cos 1, sin 0)
    grid = L.rope_grid(2, 2, 2, 25.0, True)
    cos, sin = L.rope_tables(grid, 2048, 10000.0, (20, 2048, 2048))
    assert cos.shape == (8, 2048)
    assert torch.all(cos[:, :2] == 1) and torch.all(sin[:, :2] == 0)
    # the same angles as diffusers' rotary module computes them (fp32, same op order): bit-equal
    from diffusers.models.transformers.transformer_ltx import LTXVideoRotaryPosEmbed
    rc, rs = LTXVideoRotaryPosEmbed(2048)(torch.zeros(1, 8, 2048), video_coords=grid[None])
    assert torch.equal(cos, rc[0]) and torch.equal(sin, rs[0])


def test_per_sample_frame_rate():
    model = tiny_dit()
    c = model.cfg
    x, ctx = torch.randn(2, c.in_channels, 2, 2, 3), torch.randn(2, 4, c.caption_channels)
    t = torch.tensor([500.0, 500.0])
    with torch.no_grad():
        both = model(x, t, ctx, frame_rate=torch.tensor([24.0, 30.0]))
        a = model(x[:1], t[:1], ctx[:1], frame_rate=24.0)
        b = model(x[1:], t[1:], ctx[1:], frame_rate=30.0)
    assert torch.allclose(both, torch.cat([a, b]), atol=1e-6)
    assert not torch.allclose(a, model(x[:1], t[:1], ctx[:1], frame_rate=30.0), atol=1e-5)


@pytest.mark.parametrize("preset,n_params", [("2B", 1_923_385_472), ("13B", 13_042_569_344)])
def test_full_size_keys_and_shapes(preset, n_params):
    with torch.device("meta"):
        m = L.Transformer3DModel(L.DIT_PRESETS[preset])
    check_full_size_keys(m, os.path.join(FIX, f"ltx_{preset}_dit_keys.json"), n_params)


def test_full_size_forward_on_meta():
    with torch.device("meta"):
        m = L.Transformer3DModel(L.DIT_PRESETS["13B"])
        out = m(torch.zeros(2, 128, 2, 2, 3), torch.zeros(2, 12), torch.zeros(2, 5, 4096), torch.ones(2, 5))
    assert out.shape == (2, 128, 2, 2, 3)
