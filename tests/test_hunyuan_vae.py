"""The causal 3-D VAE against diffusers' AutoencoderKLHunyuanVideo (tiling and frame-wise processing off, which is
upstream's plain encode/decode), loaded from OUR state dict with no renames; full-size keys on meta."""
import os

import pytest
import torch

import train_hunyuan as H
from tests.checks import check_full_size_keys

FIX = os.path.join(os.path.dirname(__file__), "fixtures")


def tiny_vae(seed=0):
    torch.manual_seed(seed)
    m = H.HunyuanVAE(H.VAE_PRESETS["tiny"])
    with torch.no_grad():  # every weight random, gains near 1
        for n, p in m.named_parameters():
            if "norm" in n and n.endswith("weight"):
                p.copy_(1 + 0.1 * torch.randn_like(p))
            elif n.endswith("bias"):
                p.copy_(0.05 * torch.randn_like(p))
            else:
                p.copy_(torch.randn_like(p) * 0.7 * p[0].numel() ** -0.5)
    return m.eval()


def diffusers_twin(model):
    from diffusers import AutoencoderKLHunyuanVideo
    c = model.cfg
    ref = AutoencoderKLHunyuanVideo(latent_channels=c.latent_channels, block_out_channels=c.block_out_channels,
                                    layers_per_block=c.layers_per_block, norm_num_groups=c.norm_num_groups,
                                    scaling_factor=c.scaling_factor)
    ref.load_state_dict(model.state_dict(), strict=True)  # diffusers keeps the official VAE keys
    ref.use_framewise_encoding = ref.use_framewise_decoding = False
    ref.use_tiling = False
    return ref.eval()


@pytest.mark.parametrize("T,h,w", [(1, 16, 24), (9, 16, 16)])
def test_vae_matches_diffusers(T, h, w):
    model = tiny_vae()
    ref = diffusers_twin(model)
    g = torch.Generator().manual_seed(1)
    video = torch.rand(2, 3, T, h, w, generator=g) * 2 - 1
    with torch.no_grad():
        lat = model.encode(video)
        dist = ref.encode(video).latent_dist
        want = dist.mean * H.VAE_SCALE
        assert lat.shape == (2, 16, (T - 1) // 4 + 1, h // 8, w // 8)
        err = (lat - want).abs().max().item()
        assert err <= 1e-5, err
        mean, std = model.posterior(video)
        assert (std - dist.std).abs().max() <= 1e-5
        z = torch.randn(lat.shape, generator=g)
        out = model.decode(z)
        ref_out = ref.decode(z / H.VAE_SCALE).sample.clamp(-1, 1)
    assert out.shape == (2, 3, T, h, w)
    err = (out - ref_out).abs().max().item()
    assert err <= 1e-5, err


def test_sampled_latent_is_mean_plus_std_noise():
    model = tiny_vae()
    video = torch.rand(1, 3, 5, 16, 16) * 2 - 1
    with torch.no_grad():
        mean, std = model.posterior(video)
        a = model.encode(video, generator=torch.Generator().manual_seed(3), sample=True)
    eps = torch.randn(mean.shape, generator=torch.Generator().manual_seed(3))
    assert torch.allclose(a, (mean + std * eps) * H.VAE_SCALE)


def test_not_strictly_causal_through_groupnorm():
    # the convs are causal, but every GroupNorm takes its statistics over all frames (upstream too): changing the
    # last frame moves latent frame 0 a little, and the last latent frame most
    model = tiny_vae()
    v = torch.rand(1, 3, 9, 16, 16) * 2 - 1
    v2 = v.clone()
    v2[:, :, -1] = torch.rand_like(v2[:, :, -1])
    with torch.no_grad():
        a, b = model.encode(v), model.encode(v2)
    d = (a - b).abs().amax(dim=(0, 1, 3, 4))
    assert a.shape[2] == 3 and 0 < d[0] < d[-1]


def test_full_size_keys_and_shapes():
    with torch.device("meta"):
        m = H.HunyuanVAE(H.VAE_PRESETS["884-16c-hy"])
    assert len(check_full_size_keys(m, os.path.join(FIX, "hunyuan_vae_keys.json"), 246_478_803)) == 248


def test_tiling_matches_diffusers_tiled_path():
    """Spatial tiling (off on a bare HunyuanVAE; --vae_tiling sets it) against diffusers' tiled_encode /
    tiled_decode at the same tile and stride (small ones here: 32 px tiles every 24 px, upstream's 1/4 overlap)."""
    model = tiny_vae()
    ref = diffusers_twin(model)
    ref.enable_tiling(tile_sample_min_height=32, tile_sample_min_width=32, tile_sample_stride_height=24,
                      tile_sample_stride_width=24)
    model.tiling = (32, 24)
    g = torch.Generator().manual_seed(2)
    video = torch.rand(1, 3, 5, 56, 40, generator=g) * 2 - 1
    with torch.no_grad():
        lat = model.encode(video)
        want = ref.encode(video).latent_dist.mean * H.VAE_SCALE
        assert lat.shape == (1, 16, 2, 7, 5)
        assert (lat - want).abs().max() <= 1e-5
        z = torch.randn(1, 16, 2, 7, 5, generator=g)
        out = model.decode(z)
        ref_out = ref.decode(z / H.VAE_SCALE).sample.clamp(-1, 1)
        assert out.shape == (1, 3, 5, 56, 40) and (out - ref_out).abs().max() <= 1e-5
        model.tiling = None
        assert (model.encode(video) - lat).abs().max() > 1e-4  # tiling is not exact: only above a tile for that
