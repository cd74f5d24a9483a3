"""The 0.9.5+ causal VAE against diffusers' AutoencoderKLLTXVideo at a tiny config with every weight random (encode
and the timestep-conditioned decode), through diffusers' own 0.9.5 key table; the per-channel statistics; the
full-size keys, shapes and parameter count on the meta device."""
import os

import torch

import train_ltx as L
from tests.checks import check_full_size_keys

FIX = os.path.join(os.path.dirname(__file__), "fixtures")

# the 0.9.5+ block list at 1/16 of the width and one residual block per group
TINY_ENC = [["res_x", {"num_layers": 1}], ["compress_space_res", {"multiplier": 2}], ["res_x", {"num_layers": 1}],
            ["compress_time_res", {"multiplier": 2}], ["res_x", {"num_layers": 1}],
            ["compress_all_res", {"multiplier": 2}], ["res_x", {"num_layers": 1}],
            ["compress_all_res", {"multiplier": 2}], ["res_x", {"num_layers": 2}]]
TINY_DEC = [["res_x", {"num_layers": 1, "inject_noise": False}], ["compress_all", {"residual": True, "multiplier": 2}],
            ["res_x", {"num_layers": 2, "inject_noise": False}], ["compress_all", {"residual": True, "multiplier": 2}],
            ["res_x", {"num_layers": 1, "inject_noise": False}], ["compress_all", {"residual": True, "multiplier": 2}],
            ["res_x", {"num_layers": 1, "inject_noise": False}]]
TINY = dict(encoder_blocks=TINY_ENC, decoder_blocks=TINY_DEC, latent_channels=8, encoder_base_channels=8,
            decoder_base_channels=8)

# diffusers' VAE_095_RENAME_DICT and common renames (loaders/single_file_utils.py), applied in its order; its own
# function only picks this table when conv_out is 2048 wide (the released size), so the test applies it directly
DF_095 = [("up_blocks.0", "mid_block"), ("up_blocks.1", "up_blocks.0.upsamplers.0"), ("up_blocks.2", "up_blocks.0"),
          ("up_blocks.3", "up_blocks.1.upsamplers.0"), ("up_blocks.4", "up_blocks.1"),
          ("up_blocks.5", "up_blocks.2.upsamplers.0"), ("up_blocks.6", "up_blocks.2"),
          ("up_blocks.7", "up_blocks.3.upsamplers.0"), ("up_blocks.8", "up_blocks.3"),
          ("down_blocks.0", "down_blocks.0"), ("down_blocks.1", "down_blocks.0.downsamplers.0"),
          ("down_blocks.2", "down_blocks.1"), ("down_blocks.3", "down_blocks.1.downsamplers.0"),
          ("down_blocks.4", "down_blocks.2"), ("down_blocks.5", "down_blocks.2.downsamplers.0"),
          ("down_blocks.6", "down_blocks.3"), ("down_blocks.7", "down_blocks.3.downsamplers.0"),
          ("down_blocks.8", "mid_block"), ("res_blocks", "resnets"), ("last_time_embedder", "time_embedder"),
          ("last_scale_shift_table", "scale_shift_table"),
          ("per_channel_statistics.mean-of-means", "latents_mean"),
          ("per_channel_statistics.std-of-means", "latents_std")]


def tiny_vae(seed=0):
    torch.manual_seed(seed)
    m = L.CausalVideoAutoencoder(L.VAEConfig(**TINY))
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in m.named_parameters():
            if name.endswith("timestep_scale_multiplier"):
                p.fill_(640.0)  # not the init's 1000: the checkpoint's own value must be the one used
            elif p.dim() == 1 or "scale_shift_table" in name:
                p.copy_(0.2 * torch.randn(p.shape, generator=g))
            else:
                p.copy_(torch.randn(p.shape, generator=g) * (1.2 * p[0].numel() ** -0.5))
        s = m.per_channel_statistics
        getattr(s, "mean-of-means").copy_(0.3 * torch.randn(8, generator=g))
        getattr(s, "std-of-means").copy_(0.5 + torch.rand(8, generator=g))
    return m.eval()


def diffusers_twin(model):
    from diffusers import AutoencoderKLLTXVideo
    ref = AutoencoderKLLTXVideo(
        in_channels=3, out_channels=3, latent_channels=8, block_out_channels=(8, 16, 32, 64, 128),
        down_block_types=("LTXVideo095DownBlock3D",) * 4, decoder_block_out_channels=(16, 32, 64),
        layers_per_block=(1, 1, 1, 1, 2), decoder_layers_per_block=(1, 2, 1, 1), spatio_temporal_scaling=(True,) * 4,
        decoder_spatio_temporal_scaling=(True,) * 3, decoder_inject_noise=(False,) * 4,
        downsample_type=("spatial", "temporal", "spatiotemporal", "spatiotemporal"), upsample_residual=(True,) * 3,
        upsample_factor=(2, 2, 2), timestep_conditioning=True, patch_size=4, patch_size_t=1, encoder_causal=True,
        decoder_causal=False)
    sd = {}
    for k, v in model.state_dict().items():
        for a, b in DF_095:
            k = k.replace(a, b)
        sd[k] = v.clone()
    ref.load_state_dict(sd, strict=True)
    return ref.eval()


def test_vae_matches_diffusers():
    vae = tiny_vae()
    ref = diffusers_twin(vae)
    g = torch.Generator().manual_seed(1)
    video = torch.rand(2, 3, 9, 64, 96, generator=g) * 2 - 1  # non-square, 2 latent frames
    with torch.no_grad():
        z = vae.encode(video)
        mu = ref.encode(video).latent_dist.mode()
        mean, std = ref.latents_mean.view(1, -1, 1, 1, 1), ref.latents_std.view(1, -1, 1, 1, 1)
        z_ref = (mu - mean) / std
        assert z.shape == (2, 8, 2, 2, 3)
        err_enc = (z - z_ref).abs().max().item()
        out = vae.decode(z, timestep=0.05, clamp=False)
        out_ref = ref.decode(z * std + mean, temb=torch.tensor([0.05, 0.05]), return_dict=False)[0]
        assert out.shape == (2, 3, 9, 64, 96)
        err_dec = (out - out_ref).abs().max().item()
    assert err_enc <= 1e-5 * max(1, z_ref.abs().max().item()), err_enc
    assert err_dec <= 1e-5 * max(1, out_ref.abs().max().item()), err_dec
    # the decoder timestep matters (so the comparison above exercised the conditioning)
    with torch.no_grad():
        assert (vae.decode(z, timestep=0.5, clamp=False) - out).abs().max() > 1e-3


def test_encoder_is_causal():
    vae = tiny_vae()
    g = torch.Generator().manual_seed(2)
    video = torch.rand(1, 3, 17, 32, 32, generator=g) * 2 - 1
    with torch.no_grad():
        full = vae.encode(video)
        first = vae.encode(video[:, :, :1])
        nine = vae.encode(video[:, :, :9])
    assert full.shape[2] == 3
    assert torch.allclose(full[:, :, :1], first, atol=1e-5)
    assert torch.allclose(full[:, :, :2], nine, atol=1e-5)


def test_decode_noise_flag():
    vae = tiny_vae()
    z = torch.randn(1, 8, 1, 1, 2)
    with torch.no_grad():
        a = vae.decode(z)
        b = vae.decode(z, noise_scale=0.025, generator=torch.Generator().manual_seed(0))
        c = vae.decode(z, noise_scale=0.025, generator=torch.Generator().manual_seed(0))
    assert a.shape == (1, 3, 1, 32, 64) and a.abs().max() <= 1
    assert torch.equal(b, c) and not torch.equal(a, b)


def test_decode_noise_is_added_to_the_normalised_latents():
    # LTX-Video's pipeline mixes the decode noise into the DiT's (normalised) latents and only then undoes the
    # per-channel statistics (pipeline_ltx_video.py, then vae_decode -> un_normalize_latents); diffusers' LTXPipeline
    # denormalises first, which scales the noise by std-of-means and shrinks the means too. tiny_vae has std != 1.
    vae = tiny_vae()
    z = torch.randn(1, 8, 2, 1, 2, generator=torch.Generator().manual_seed(1))
    s = 0.3
    eps = torch.randn(z.shape, generator=torch.Generator().manual_seed(7))
    with torch.no_grad():
        got = vae.decode(z, noise_scale=s, generator=torch.Generator().manual_seed(7), clamp=False)
        want = vae.decode((1 - s) * z + s * eps, clamp=False)
    assert torch.allclose(got, want, atol=1e-5), (got - want).abs().max()


def test_full_size_keys_shapes_and_count():
    with torch.device("meta"):
        m = L.CausalVideoAutoencoder(L.VAEConfig())
    check_full_size_keys(m, os.path.join(FIX, "ltx_vae_keys.json"), 1_246_913_522)


def test_full_size_shapes_on_meta():
    # the released layout end to end without memory: 17 frames of 64x96 <-> latents 3 x 2 x 3 of 128 channels
    with torch.device("meta"):
        vae = L.CausalVideoAutoencoder(L.VAEConfig())
        z = vae.encoder(torch.zeros(1, 3, 17, 64, 96))
        y = vae.decoder(torch.zeros(1, 128, 3, 2, 3), torch.zeros(1))
    assert z.shape == (1, 128, 3, 2, 3) and y.shape == (1, 3, 17, 64, 96)
