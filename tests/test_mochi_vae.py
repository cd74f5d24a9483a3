"""The Mochi VAE: the decoder against golden tensors from the official code (tests/fixtures/
make_mochi_vae_golden.py; diffusers decodes differently), the encoder against the same golden run and against
diffusers' AutoencoderKLMochi (whose encoder matches upstream's), full-size keys, shapes and parameter counts on the
meta device against fixtures of the official keys, and the frame/latent arithmetic."""
import hashlib
import os

import pytest
import torch
from safetensors.torch import load_file

import train_mochi as M
from tests.checks import check_full_size_keys

FIX = os.path.join(os.path.dirname(__file__), "fixtures")
TINY = M.VAE_PRESETS["tiny"]


def golden_weight(key, shape):
    """The golden run's weight for `key` (prefixed decoder./encoder.), from a generator seeded by the key itself, so
    the generator script and this test agree whatever order each model lists its parameters in. Norm gains near 1,
    small biases, other weights ~ N(0, 1/fan_in)."""
    g = torch.Generator().manual_seed(int(hashlib.sha256(key.encode()).hexdigest()[:8], 16))
    r = torch.randn(tuple(shape), generator=g)
    is_norm = "norm" in key or ".stack.0." in key or ".stack.3." in key
    if len(shape) == 1:
        return 1 + 0.2 * r if is_norm and key.endswith("weight") else 0.05 * r
    return r * (torch.Size(shape)[1:].numel() ** -0.5)


def tiny_vae():
    vae = M.MochiVAE(TINY)
    with torch.no_grad():
        for name, p in vae.named_parameters():
            p.copy_(golden_weight(name, p.shape))
    return vae.eval().requires_grad_(False)


@pytest.fixture(scope="module")
def vae():
    return tiny_vae()


@pytest.fixture(scope="module")
def golden():
    return load_file(os.path.join(FIX, "mochi_vae_golden.safetensors"))


def test_decoder_matches_upstream(vae, golden):
    with torch.no_grad():
        out = vae.decoder(golden["z"])
    assert out.shape == golden["video_out"].shape == (1, 3, 13, 16, 24)
    err = (out - golden["video_out"]).abs().max().item()
    print(f"decoder vs upstream: max diff {err:.2e}, mean |x| {out.abs().mean():.3f}")
    assert err <= 1e-5, err
    # decode() un-normalises first: the DiT's latents (z - mean) / std give the same video, clamped
    mean, std = vae._stats("cpu")
    with torch.no_grad():
        v = vae.decode((golden["z"] - mean) / std)
    assert (v - golden["video_out"].clamp(-1, 1)).abs().max() <= 1e-5


def test_encoder_matches_upstream(vae, golden):
    with torch.no_grad():
        mu, logvar = vae.encoder(M.add_fourier_features(golden["video"]))
        z = vae.encode(golden["video"])
    err = max((mu - golden["mean"]).abs().max().item(), (logvar - golden["logvar"]).abs().max().item())
    print(f"encoder vs upstream: max diff {err:.2e}")
    assert err <= 1e-5, err
    mean, std = vae._stats("cpu")
    assert z.shape == (1, 12, 3, 2, 3)
    assert (z - (golden["mean"] - mean) / std).abs().max() <= 1e-5


def to_diffusers_encoder(sd, cfg):
    """Our (= official) encoder keys -> diffusers' MochiEncoder3D keys (written here from the two key lists)."""
    n0, n_last = cfg.num_res_blocks[0], cfg.num_res_blocks[-1]
    n_down = len(cfg.mult) - 1
    out = {}

    def resblock(src, dst, j):  # a ResBlock (+ its attention) at src -> index j of the diffusers block dst
        for a, b in (("stack.0", "norm1.norm_layer"), ("stack.2", "conv1.conv"), ("stack.3", "norm2.norm_layer"),
                     ("stack.5", "conv2.conv"), ("attn_block.norm", f"norms.{j}.norm_layer")):
            for s in ("weight", "bias"):
                if f"{src}.{a}.{s}" in sd:
                    out[f"{dst}.{'' if a.startswith('attn') else f'resnets.{j}.'}{b}.{s}"] = sd[f"{src}.{a}.{s}"]
        if f"{src}.attn_block.attn.qkv.weight" in sd:
            for name, w in zip(("to_q", "to_k", "to_v"), sd[f"{src}.attn_block.attn.qkv.weight"].chunk(3)):
                out[f"{dst}.attentions.{j}.{name}.weight"] = w
            for s in ("weight", "bias"):
                out[f"{dst}.attentions.{j}.to_out.0.{s}"] = sd[f"{src}.attn_block.attn.out.{s}"]

    out["proj_in.weight"], out["proj_in.bias"] = sd["layers.0.weight"], sd["layers.0.bias"]
    for j in range(n0):
        resblock(f"layers.{1 + j}", "block_in", j)
    for i in range(n_down):
        src = f"layers.{1 + n0 + i}.layers"
        for s in ("weight", "bias"):
            out[f"down_blocks.{i}.conv_in.conv.{s}"] = sd[f"{src}.0.{s}"]
        for j in range(cfg.num_res_blocks[1 + i]):
            resblock(f"{src}.{1 + j}", f"down_blocks.{i}", j)
    for j in range(n_last):
        resblock(f"layers.{1 + n0 + n_down + j}", "block_out", j)
    out["norm_out.norm_layer.weight"] = sd["output_norm.weight"]
    out["norm_out.norm_layer.bias"] = sd["output_norm.bias"]
    out["proj_out.weight"] = sd["output_proj.weight"]
    return out


@pytest.mark.parametrize("frames", [1, 13])
def test_encoder_matches_diffusers(vae, frames):
    from diffusers import AutoencoderKLMochi
    c = TINY
    ref = AutoencoderKLMochi(encoder_block_out_channels=tuple(c.enc_base * m for m in c.mult),
                             decoder_block_out_channels=tuple(c.dec_base * m for m in c.mult),
                             layers_per_block=c.num_res_blocks, add_attention_block=c.enc_attention).eval()
    ref.encoder.load_state_dict(to_diffusers_encoder(vae.encoder.state_dict(), c), strict=True)
    x = torch.rand(2, 3, frames, 16, 24, generator=torch.Generator().manual_seed(3)) * 2 - 1
    with torch.no_grad():
        ours = vae.encoder(M.add_fourier_features(x))[0]
        theirs = ref.encode(x).latent_dist.mode()
    assert ours.shape == theirs.shape == (2, 12, (frames - 1) // 6 + 1, 2, 3)
    err = (ours - theirs).abs().max().item()
    print(f"encoder vs diffusers, {frames} frames: max diff {err:.2e}")
    assert err <= 1e-5, err


def test_causal_in_time(vae):
    # encoding the first 7 frames gives the first 2 latents of encoding all 13; decoding the first 2 latents gives
    # the first 7 frames of decoding all 3
    x = torch.rand(1, 3, 13, 16, 16, generator=torch.Generator().manual_seed(4)) * 2 - 1
    z = torch.randn(1, 12, 3, 2, 2, generator=torch.Generator().manual_seed(5))
    with torch.no_grad():
        assert (vae.encode(x[:, :, :7]) - vae.encode(x)[:, :, :2]).abs().max() <= 1e-5
        assert (vae.decode(z[:, :, :2]) - vae.decode(z)[:, :, :7]).abs().max() <= 1e-5


@pytest.mark.parametrize("part,n_params", [("encoder", 97_222_016), ("decoder", 362_526_595)])
def test_full_size_keys_shapes_and_count(part, n_params):
    with torch.device("meta"):
        m = getattr(M.MochiVAE(M.VAE_PRESETS["official"]), part)
    check_full_size_keys(m, os.path.join(FIX, f"mochi_vae_{part}_keys.json"), n_params)


def test_tiled_decode_matches_upstream(vae, golden):
    # upstream's apply_tiled (what its single-GPU cli decodes with: 4 x 2 tiles, overlap 8), here 2 x 2, overlap 2
    with torch.no_grad():
        out = M.decode_tiled(vae.decoder, golden["z_big"], 2, 2, 2)
    assert out.shape == golden["tiled_out"].shape == (1, 3, 7, 32, 48)
    err = (out - golden["tiled_out"]).abs().max().item()
    print(f"tiled decoder vs upstream: max diff {err:.2e}")
    assert err <= 1e-5, err
    with torch.no_grad():
        whole = vae.decoder(golden["z_big"])
    assert (out - whole).abs().max() > 1e-3  # the tiles' seams are blended, not the same function
    mean, std = vae._stats("cpu")
    with torch.no_grad():
        v = vae.decode((golden["z_big"] - mean) / std, tiles=(2, 2), overlap=2)
    assert (v - golden["tiled_out"].clamp(-1, 1)).abs().max() <= 1e-5
