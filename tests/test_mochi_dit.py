"""The Mochi DiT against diffusers' MochiTransformer3DModel (an independent implementation; the spec measured it
equal to genmoai/mochi's own code at fp32), loaded from OUR state dict through a key map written here from the
spec; unequal prompt lengths in one batch; full-size key names, shapes and parameter count on the meta device
against a fixture of the official keys."""
import os

import pytest
import torch

import train_mochi as M
from tests.checks import check_full_size_keys

FIX = os.path.join(os.path.dirname(__file__), "fixtures")


def tiny_dit(seed=0, preset="tiny"):
    """Every parameter random and O(1)-effect (the init zeroes modulations and the head; a zero hides bugs)."""
    torch.manual_seed(seed)
    m = M.AsymmDiT(M.DIT_PRESETS[preset])
    with torch.no_grad():
        for name, p in m.named_parameters():
            if name.endswith("norm_x.weight") or name.endswith("norm_y.weight"):
                p.copy_(1 + 0.2 * torch.randn_like(p))
            elif name == "pos_frequencies":
                p.copy_(torch.randn_like(p) * 0.3)
            elif p.dim() == 1:
                p.copy_(0.1 * torch.randn_like(p))
            else:
                p.copy_(torch.randn_like(p) * p[0].numel() ** -0.5)
    return m.eval()


def to_diffusers(sd, depth):
    """Official Mochi keys -> diffusers MochiTransformer3DModel keys (spec section 1.5): fused qkv split in three,
    the SwiGLU w1 halves swapped (diffusers gates the first half), the final modulation halves swapped (scale,
    shift)."""
    def swap(t):
        a, b = t.chunk(2, dim=0)
        return torch.cat([b, a], dim=0)
    out = {"pos_frequencies": sd["pos_frequencies"]}
    top = {"x_embedder.proj.": "patch_embed.proj.", "t_embedder.mlp.0.": "time_embed.timestep_embedder.linear_1.",
           "t_embedder.mlp.2.": "time_embed.timestep_embedder.linear_2.", "t5_y_embedder.": "time_embed.pooler.",
           "t5_yproj.": "time_embed.caption_proj.", "final_layer.linear.": "proj_out."}
    for k, v in sd.items():
        for a, b in top.items():
            if k.startswith(a):
                out[b + k[len(a):]] = v
        if k.startswith("final_layer.mod."):
            out["norm_out.linear." + k.split(".")[-1]] = swap(v)
    for i in range(depth):
        o, d = f"blocks.{i}.", f"transformer_blocks.{i}."
        last = i == depth - 1
        for s in ("weight", "bias"):
            out[d + "norm1.linear." + s] = sd[o + "mod_x." + s]
            out[d + ("norm1_context.linear_1." if last else "norm1_context.linear.") + s] = sd[o + "mod_y." + s]
            out[d + "attn1.to_out.0." + s] = sd[o + "attn.proj_x." + s]
            if not last:
                out[d + "attn1.to_add_out." + s] = sd[o + "attn.proj_y." + s]
        for name, w in zip(("to_q", "to_k", "to_v"), sd[o + "attn.qkv_x.weight"].chunk(3)):
            out[d + f"attn1.{name}.weight"] = w
        for name, w in zip(("add_q_proj", "add_k_proj", "add_v_proj"), sd[o + "attn.qkv_y.weight"].chunk(3)):
            out[d + f"attn1.{name}.weight"] = w
        for a, b in (("q_norm_x", "norm_q"), ("k_norm_x", "norm_k"), ("q_norm_y", "norm_added_q"),
                     ("k_norm_y", "norm_added_k")):
            out[d + f"attn1.{b}.weight"] = sd[o + f"attn.{a}.weight"]
        out[d + "ff.net.0.proj.weight"] = swap(sd[o + "mlp_x.w1.weight"])
        out[d + "ff.net.2.weight"] = sd[o + "mlp_x.w2.weight"]
        if not last:
            out[d + "ff_context.net.0.proj.weight"] = swap(sd[o + "mlp_y.w1.weight"])
            out[d + "ff_context.net.2.weight"] = sd[o + "mlp_y.w2.weight"]
    return out


def diffusers_twin(model):
    from diffusers import MochiTransformer3DModel
    c = model.cfg
    ref = MochiTransformer3DModel(patch_size=c.patch_size, num_attention_heads=c.num_heads,
                                  attention_head_dim=c.dim_x // c.num_heads, num_layers=c.depth,
                                  pooled_projection_dim=c.dim_y, in_channels=c.in_channels,
                                  text_embed_dim=c.t5_dim, max_sequence_length=c.text_len)
    ref.load_state_dict(to_diffusers({k: v.clone() for k, v in model.state_dict().items()}, c.depth), strict=True)
    return ref.eval()


def inputs(cfg, B, T, H, W, lengths, seed=1):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(B, cfg.in_channels, T, H, W, generator=g)
    y = torch.randn(B, cfg.text_len, cfg.t5_dim, generator=g)
    mask = torch.arange(cfg.text_len)[None] < torch.tensor(lengths)[:, None]
    return x, y, mask


@pytest.fixture(scope="module")
def pair():
    m = tiny_dit()
    return m, diffusers_twin(m)


@pytest.mark.parametrize("T,H,W,lengths", [(2, 6, 10, [5, 11]), (1, 8, 4, [16, 16]), (3, 4, 6, [0, 7]),
                                           (1, 4, 4, [0, 0])])
def test_dit_matches_diffusers(pair, T, H, W, lengths):
    model, ref = pair
    c = model.cfg
    x, y, mask = inputs(c, 2, T, H, W, lengths)
    sigma = torch.tensor([0.93, 0.21])
    with torch.no_grad():
        ours = model(x, sigma, y, mask)
        theirs = ref(x, y, 1000 * (1 - sigma), mask, return_dict=False)[0]
    assert ours.shape == (2, c.in_channels, T, H, W)
    err = (ours - theirs).abs().max().item()
    print(f"T={T} H={H} W={W} lengths={lengths}: max diff {err:.2e}, mean |out| {ours.abs().mean():.3f}")
    assert err <= 1e-5, err


def test_each_sample_gets_what_it_gets_alone(pair):
    model, _ = pair
    c = model.cfg
    x, y, mask = inputs(c, 3, 2, 4, 6, [3, 16, 9], seed=3)
    sigma = torch.tensor([0.5, 0.8, 0.1])
    with torch.no_grad():
        batch = model(x, sigma, y, mask)
        for i in range(3):
            alone = model(x[i:i + 1], sigma[i:i + 1], y[i:i + 1], mask[i:i + 1])
            assert (batch[i:i + 1] - alone).abs().max() <= 1e-5
    # padded positions' features never matter (they are neither keys nor pooled)
    y2 = y.clone()
    y2[0, 3:] = torch.randn_like(y2[0, 3:])
    with torch.no_grad():
        assert torch.equal(model(x, sigma, y2, mask)[0], batch[0])
    # the empty prompt (an all-False mask, as upstream encodes it): the output does not depend on the T5 features
    none = torch.zeros_like(mask)
    with torch.no_grad():
        assert torch.equal(model(x, sigma, y, none), model(x, sigma, torch.randn_like(y), none))


def test_bf16_close_to_fp32(pair):
    model, _ = pair
    c = model.cfg
    x, y, mask = inputs(c, 2, 2, 4, 6, [4, 12])
    sigma = torch.tensor([0.7, 0.3])
    m16 = tiny_dit()
    m16.blocks.to(torch.bfloat16)
    assert m16.pos_frequencies.dtype == torch.float32
    with torch.no_grad():
        a, b = model(x, sigma, y, mask), m16(x, sigma, y, mask)
    rel = ((a - b).norm() / a.norm()).item()
    assert b.dtype == torch.float32 and rel < 0.05, rel


def test_full_size_keys_shapes_and_count():
    with torch.device("meta"):
        m = M.AsymmDiT(M.DIT_PRESETS["10B"])
    assert len(check_full_size_keys(m, os.path.join(FIX, "mochi_dit_keys.json"), 10_027_677_744)) == 879
    assert M.swiglu_width(3072) == 8192 and M.swiglu_width(1536) == 4096


@pytest.mark.parametrize("lengths", [[5, 11], [16, 16], [0, 0], [8, 8]])
def test_text_rounded_up_for_compile_gives_the_same_result(pair, lengths):
    model, _ = pair
    c = model.cfg
    x, y, mask = inputs(c, 2, 2, 4, 6, lengths)
    sigma = torch.tensor([0.6, 0.3])
    with torch.no_grad():
        a = model(x, sigma, y, mask)
        model.text_multiple = 8  # 11 -> 16, 5 -> 8, 16 stays; padded rows are masked out
        try:
            n = max(lengths)  # the features cut to the longest prompt (as a cached batch is): shorter than the rounding
            b = model(x, sigma, y[:, :n], mask[:, :n])
        finally:
            model.text_multiple = 1
    assert (a - b).abs().max() <= 1e-5
