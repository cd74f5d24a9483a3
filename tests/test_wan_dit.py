"""The DiT against diffusers' WanTransformer3DModel (an independent implementation), loaded from OUR state dict
through diffusers' own key conversion. Also full-size key/shape checks on the meta device."""
import os

import pytest
import torch

import train_wan as W
from tests.checks import check_full_size_keys
from tests.helpers import tiny_dit as tiny_model

FIX = os.path.join(os.path.dirname(__file__), "fixtures")


def diffusers_twin(model):
    from diffusers import WanTransformer3DModel
    from diffusers.loaders.single_file_utils import convert_wan_transformer_to_diffusers
    c = model.cfg
    ref = WanTransformer3DModel(patch_size=c.patch_size, num_attention_heads=c.num_heads,
                                attention_head_dim=c.dim // c.num_heads, in_channels=c.in_dim,
                                out_channels=c.out_dim, text_dim=c.text_dim, freq_dim=c.freq_dim,
                                ffn_dim=c.ffn_dim, num_layers=c.num_layers, eps=c.eps)
    sd = convert_wan_transformer_to_diffusers({k: v.clone() for k, v in model.state_dict().items()})
    missing, unexpected = ref.load_state_dict(sd, strict=True)
    return ref.eval()


@pytest.mark.parametrize("frames,h,w", [(1, 8, 12), (3, 6, 10), (5, 4, 8)])
def test_dit_matches_diffusers(frames, h, w):
    model = tiny_model()
    ref = diffusers_twin(model)
    torch.manual_seed(1)
    c = model.cfg
    x = torch.randn(2, c.in_dim, frames, h, w)
    t = torch.tensor([999.0, 17.5])
    ctx = torch.randn(2, c.text_len, c.text_dim)
    ctx[1, 5:] = 0  # a shorter prompt: trimmed-then-zero-padded as upstream feeds it
    with torch.no_grad():
        ours = model(x, t, ctx)
        theirs = ref(x, t, ctx, return_dict=False)[0]
    assert ours.shape == (2, c.out_dim, frames, h, w)
    err = (ours - theirs).abs().max().item()
    assert err <= 1e-5, err


def test_context_shorter_than_text_len_is_zero_padded():
    model = tiny_model()
    c = model.cfg
    x, t = torch.randn(1, c.in_dim, 1, 4, 4), torch.tensor([500.0])
    ctx = torch.randn(1, 5, c.text_dim)
    with torch.no_grad():
        a = model(x, t, ctx)
        b = model(x, t, torch.cat([ctx, torch.zeros(1, c.text_len - 5, c.text_dim)], 1))
    assert torch.equal(a, b)


def test_rope_split_matches_official_table():
    # upstream builds one complex table of 64 columns from three rope_params(1024, 44/42/42) pieces; the angle
    # of token (f, i, j) is [T[f, :22], H[i, 22:43], W[j, 43:]] of that table. Rebuild it independently here.
    d = 128
    def params(n, dim):
        return torch.outer(torch.arange(n, dtype=torch.float64),
                           1.0 / torch.pow(10000, torch.arange(0, dim, 2, dtype=torch.float64) / dim))
    T, H, Wt = params(1024, 44), params(1024, 42), params(1024, 42)
    f, h, w = 3, 4, 5
    ang = W.rope_angles(f, h, w, d, "cpu").view(f, h, w, 64)
    for fi, hi, wi in [(0, 0, 0), (2, 3, 4), (1, 2, 0)]:
        want = torch.cat([T[fi], H[hi], Wt[wi]])
        assert torch.allclose(ang[fi, hi, wi], want)


@pytest.mark.parametrize("preset,n_params", [("1.3B", 1_418_996_800), ("14B", 14_288_491_584)])
def test_full_size_keys_and_shapes(preset, n_params):
    with torch.device("meta"):
        m = W.WanModel(W.DIT_PRESETS[preset])
    check_full_size_keys(m, os.path.join(FIX, f"wan21_t2v_{preset}_keys.json"), n_params)
