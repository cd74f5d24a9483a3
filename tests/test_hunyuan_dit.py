"""The HunyuanVideo DiT against diffusers' HunyuanVideoTransformer3DModel (an independent implementation), loaded
from OUR state dict through diffusers' own key conversion, at tiny configs with every weight random and padded
text. Also the full-size key names, shapes and parameter count on the meta device against the official list."""
import os

import pytest
import torch
import torch.nn.functional as F

import train_hunyuan as H
from tests.checks import check_full_size_keys

FIX = os.path.join(os.path.dirname(__file__), "fixtures")


def tiny_dit(seed=0, preset="tiny", **over):
    """A tiny DiT whose every parameter is random (the from-scratch init zeroes the modulations and the head; a
    parity test must not let a zero hide a bug)."""
    import dataclasses
    torch.manual_seed(seed)
    m = H.HunyuanVideoDiT(dataclasses.replace(H.DIT_PRESETS[preset], **over))
    m.init_weights()
    with torch.no_grad():
        for p in m.parameters():
            p.add_(torch.randn_like(p) * 0.05)
    return m.eval()


def diffusers_twin(model):
    """diffusers' model with our weights, renamed by diffusers' converter. The converter hard-codes hidden 3072 when
    it splits the single blocks' linear1, so those two tensors are split here (q, k, v, mlp) before it runs."""
    from diffusers import HunyuanVideoTransformer3DModel
    from diffusers.loaders.single_file_utils import convert_hunyuan_video_transformer_to_diffusers
    c = model.cfg
    C = c.hidden_size
    ref = HunyuanVideoTransformer3DModel(
        in_channels=c.in_channels, out_channels=c.out_channels, num_attention_heads=c.heads_num,
        attention_head_dim=C // c.heads_num, num_layers=c.mm_double_blocks_depth,
        num_single_layers=c.mm_single_blocks_depth, num_refiner_layers=c.refiner_depth, mlp_ratio=c.mlp_dim / C,
        patch_size=c.patch_size[1], patch_size_t=c.patch_size[0], guidance_embeds=c.guidance_embed,
        text_embed_dim=c.text_states_dim, pooled_projection_dim=c.text_states_dim_2, rope_theta=c.rope_theta,
        rope_axes_dim=tuple(c.rope_dim_list))
    assert c.refiner_mlp_dim == 4 * C  # diffusers builds its refiner with the default ratio 4, as upstream
    sd = {k: v.clone() for k, v in model.state_dict().items()}
    single = {}
    for i in range(c.mm_single_blocks_depth):
        for kind in ("weight", "bias"):
            q, k, v, mlp = sd.pop(f"single_blocks.{i}.linear1.{kind}").split([C, C, C, c.mlp_dim])
            p = f"single_transformer_blocks.{i}."
            single.update({p + f"attn.to_q.{kind}": q, p + f"attn.to_k.{kind}": k, p + f"attn.to_v.{kind}": v,
                           p + f"proj_mlp.{kind}": mlp})
    sd = convert_hunyuan_video_transformer_to_diffusers(sd)
    sd.update(single)
    ref.load_state_dict(sd, strict=True)
    return ref.eval()


def inputs(cfg, B=2, T=3, Hh=6, Ww=10, L=12, seed=1):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(B, cfg.in_channels, T, Hh, Ww, generator=g)
    t = torch.tensor([999.0, 17.5][:B])
    text = torch.randn(B, L, cfg.text_states_dim, generator=g)
    mask = torch.ones(B, L, dtype=torch.long)
    mask[1:, 5:] = 0  # a shorter prompt, right-padded
    vec = torch.randn(B, cfg.text_states_dim_2, generator=g)
    guidance = torch.tensor([6000.0, 1000.0][:B])
    return x, t, text, mask, vec, guidance


@pytest.mark.parametrize("T,h,w", [(1, 8, 12), (3, 6, 10), (2, 4, 4)])
def test_dit_matches_diffusers(T, h, w):
    model = tiny_dit()
    ref = diffusers_twin(model)
    x, t, text, mask, vec, g = inputs(model.cfg, T=T, Hh=h, Ww=w)
    with torch.no_grad():
        ours = model(x, t, text, mask, vec, g)
        theirs = ref(x, t, text, mask, vec, g, return_dict=False)[0]
    assert ours.shape == (2, 16, T, h, w)
    err = (ours - theirs).abs().max().item()
    assert err <= 1e-5, err
    assert ours.abs().mean() > 0.1  # not a trivially small output


def test_dit_without_guidance_matches_diffusers():
    model = tiny_dit(guidance_embed=False)
    assert model.guidance_in is None
    ref = diffusers_twin(model)
    x, t, text, mask, vec, _ = inputs(model.cfg)
    with torch.no_grad():
        err = (model(x, t, text, mask, vec) - ref(x, t, text, mask, vec, None, return_dict=False)[0]).abs().max()
    assert err <= 1e-5, err


def test_padded_text_is_ignored():
    # the padded text positions can hold anything (upstream's varlen segments never read them)
    model = tiny_dit()
    x, t, text, mask, vec, g = inputs(model.cfg)
    other = text.clone()
    other[1, 5:] = torch.randn_like(other[1, 5:]) * 10
    with torch.no_grad():
        a, b = model(x, t, text, mask, vec, g), model(x, t, other, mask, vec, g)
        # and a prompt trimmed to its true length gives the same video as the padded batch row
        c = model(x[1:], t[1:], text[1:, :5], mask[1:, :5], vec[1:], g[1:])
    assert torch.equal(a, b)
    assert (a[1:] - c).abs().max() <= 1e-5


@pytest.mark.parametrize("multiple", [1, 8])
def test_text_cut_to_the_longest_prompt_and_unmasked_when_all_equal(monkeypatch, multiple):
    # a batch of equal prompts (batch 1 always) reaches the joint attention with no mask (SDPA may then take its
    # flash kernel); padding them to 256 or rounding up for --compile (then masked) changes no output
    model = tiny_dit()
    model.text_multiple = multiple
    x, t, text, mask, vec, g = inputs(model.cfg)
    masks = []
    real = H.attention
    monkeypatch.setattr(H, "attention", lambda q, k, v, m=None: masks.append(m) or real(q, k, v, m))
    with torch.no_grad():
        alone = model(x[1:], t[1:], text[1:, :5], mask[1:, :5], vec[1:], g[1:])  # its 5 real tokens only
        joint = masks[model.cfg.refiner_depth:]  # the refiner's own masks come first
        assert len(joint) == len(model.double_blocks) + len(model.single_blocks)
        assert all(m is None for m in joint) == (multiple == 1)
        long = torch.zeros(1, 256, text.shape[2])
        long[:, :5] = text[1:, :5]
        padded = model(x[1:], t[1:], long, F.pad(mask[1:, :5], (0, 251)), vec[1:], g[1:])
        both = model(x, t, text, mask, vec, g)  # unequal lengths: masked
    assert torch.equal(alone, padded) if multiple == 1 else (alone - padded).abs().max() <= 1e-6
    assert (both[1:] - alone).abs().max() <= 1e-5
    assert masks[-1] is not None


def test_refiner_mlp_is_4x_hidden():
    # upstream builds SingleTokenRefiner without the blocks' mlp ratio: the refiner is 4 x hidden whatever the blocks
    m = tiny_dit()
    assert m.cfg.mlp_dim != 4 * m.cfg.hidden_size
    assert m.txt_in.individual_token_refiner.blocks[0].mlp.fc1.weight.shape == (4 * 64, 64)
    assert m.double_blocks[0].img_mlp.fc1.weight.shape == (m.cfg.mlp_dim, 64)


def test_rope_split_is_upstreams():
    assert H.rope_dims(128) == (16, 56, 56) == H.DIT_PRESETS["13B"].rope_dim_list
    # angle of the first h pair at grid (0, 1, 0) is 1 * 256^0 = 1; the w part of the last token grows with w
    cos, sin = H.rope_tables(2, 3, 4, (16, 56, 56), 256.0, "cpu")
    assert cos.shape == (24, 128)
    tok = 0 * 12 + 1 * 4 + 0  # t=0, h=1, w=0
    assert torch.allclose(cos[tok, 16:18], torch.cos(torch.ones(2)))
    assert torch.allclose(cos[tok, :16], torch.ones(16)) and torch.allclose(cos[tok, 72:], torch.ones(56))


def _meta(cfg):
    with torch.device("meta"):
        return H.HunyuanVideoDiT(cfg)


def test_full_size_keys_and_shapes():
    want = check_full_size_keys(_meta(H.DIT_PRESETS["13B"]), os.path.join(FIX, "hunyuan_t2v_13B_keys.json"),
                                12_821_012_544)
    assert len(want) == 856
    import dataclasses
    m = _meta(dataclasses.replace(H.DIT_PRESETS["13B"], guidance_embed=False))
    assert sum(p.numel() for p in m.parameters()) == 12_810_782_784


def test_count_flops_matches_the_flop_counter():
    # torch's counter counts every Linear and Conv but not the masked SDPA on CPU: that term is added here
    from torch.utils.flop_counter import FlopCounterMode
    m = tiny_dit()
    c = m.cfg
    x, t, text, mask, vec, g = inputs(c, B=1, T=2, Hh=8, Ww=8, L=12)
    with torch.no_grad(), FlopCounterMode(display=False) as fc:
        m(x, t, text, mask, vec, g)
    S = 2 * 4 * 4 + 12
    attention = 4 * S * S * c.hidden_size * (c.mm_double_blocks_depth + c.mm_single_blocks_depth)
    attention += 4 * 12 * 12 * c.hidden_size * c.refiner_depth
    assert H.count_flops(c, 2, 8, 8, text_len=12) == fc.get_total_flops() + attention


def test_bf16_weights_run_and_stay_close():
    # the blocks' Linears in bf16 (what FSDP mixed precision or a bf16 LoRA base gives), the streams in fp32
    m = tiny_dit()
    b = tiny_dit().to(torch.bfloat16)
    x = inputs(m.cfg)
    with torch.no_grad():
        a, c = m(*x), b(*x)
    assert c.dtype == torch.float32 and torch.isfinite(c).all()
    rel = ((a - c).norm() / a.norm()).item()
    assert rel < 2e-2, rel
