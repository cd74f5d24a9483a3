"""The Wan 2.1 VAE against diffusers' AutoencoderKLWan (an independent implementation), loaded from OUR state dict
through diffusers' own key conversion; causality of the chunked encode/decode; full-size keys and shapes on the meta
device against a fixture dumped from the official code; load_vae round trips and its error messages."""
import json
import os
import re

import pytest
import torch
from safetensors.torch import save_file

from train_wan import VAE_PRESETS, WanVAE, load_vae

FIX = os.path.join(os.path.dirname(__file__), "fixtures")
TINY = VAE_PRESETS["tiny"]


def randomise(model):
    """Every tensor of a VAE random: default init leaves gamma = 1 and small biases, so a swapped or ignored tensor
    would not show. Weights ~ N(0, 0.25/fan_in) keep activations O(1), so the decoded video is almost all inside the
    [-1, 1] clamp. -> the model, in eval mode, frozen."""
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("gamma"):
                p.uniform_(0.5, 1.5)
            elif name.endswith("bias"):
                p.normal_(0, 0.1)
            else:
                p.normal_(0, 0.5 * p[0].numel() ** -0.5)
    return model.eval().requires_grad_(False)


def tiny_vae(seed=0):
    torch.manual_seed(seed)
    return randomise(WanVAE(TINY))


def diffusers_twin(model):
    from diffusers import AutoencoderKLWan
    from diffusers.loaders.single_file_utils import convert_wan_vae_to_diffusers
    c = model.cfg
    ref = AutoencoderKLWan(base_dim=c.dim, z_dim=c.z_dim, dim_mult=list(c.dim_mult), num_res_blocks=c.num_res_blocks,
                           attn_scales=[], temperal_downsample=list(c.temperal_downsample), dropout=0.0,
                           latents_mean=list(c.latents_mean), latents_std=list(c.latents_std))
    sd = convert_wan_vae_to_diffusers({k: v.clone() for k, v in model.state_dict().items()})
    ref.load_state_dict(sd, strict=True)  # raises on any missing or unexpected key
    return ref.eval()


@pytest.fixture(scope="module")
def pair():
    model = tiny_vae()
    return model, diffusers_twin(model)


def video(B, F, H, W, seed=1):
    g = torch.Generator().manual_seed(seed)
    return torch.rand(B, 3, F, H, W, generator=g) * 2 - 1


def check_matches_diffusers(model, ref, frames, B, H, W):
    """Our encode (posterior mean, normalised) and decode against diffusers' on the same weights, <= 1e-5 fp32.
    Used for the Wan 2.1 VAE here and the Wan 2.2 one in test_wan22_vae.py; H != W catches a swapped reshape."""
    x = video(B, frames, H, W)
    mean = torch.tensor(model.cfg.latents_mean).view(1, -1, 1, 1, 1)
    std = torch.tensor(model.cfg.latents_std).view(1, -1, 1, 1, 1)
    st, sh, sw = model.stride
    lat = (B, model.z_dim, (frames - 1) // st + 1, H // sh, W // sw)
    with torch.no_grad():
        z = model.encode(x)
        z_ref = (ref.encode(x).latent_dist.mode() - mean) / std
        assert z.shape == z_ref.shape == lat
        enc_err = (z - z_ref).abs().max().item()

        # decode independent latents, not just our own output, so a decoder bug can't hide behind the encoder
        zin = torch.randn(*lat, generator=torch.Generator().manual_seed(2))
        v = model.decode(zin)
        v_ref = ref.decode(zin * std + mean).sample.clamp(-1, 1)
        assert v.shape == v_ref.shape == (B, 3, frames, H, W)
        dec_err = (v - v_ref).abs().max().item()
    print(f"frames={frames}: encode max diff {enc_err:.2e}, decode max diff {dec_err:.2e}")
    assert enc_err <= 1e-5, enc_err
    assert dec_err <= 1e-5, dec_err
    # the comparison means something only if the clamp didn't flatten the output, and the batch items differ
    assert (v.abs() < 1).float().mean() > 0.9
    assert not torch.allclose(z[0], z[1]) and not torch.allclose(v[0], v[1])


@pytest.mark.parametrize("frames", [1, 9])
def test_vae_matches_diffusers(pair, frames):
    check_matches_diffusers(*pair, frames, B=2, H=16, W=24)


def check_causal(model, H, W):
    """The first latent frame depends only on the first video frame, latents 0-1 only on frames 0-4; and back for
    decode; and the later latents do depend on the earlier frames (the chunk cache carries them)."""
    x = video(2, 9, H, W)
    with torch.no_grad():
        z9 = model.encode(x)                 # 3 latents
        z5 = model.encode(x[:, :, :5])       # 2 latents
        z1 = model.encode(x[:, :, :1])       # 1 latent
        y = x.clone()
        y[:, :, 1:] = video(2, 8, H, W, seed=7)  # other frames after the first
        z9_other = model.encode(y)
        enc_err = max((z5 - z9[:, :, :2]).abs().max().item(), (z1 - z9[:, :, :1]).abs().max().item(),
                      (z9_other[:, :, 0] - z9[:, :, 0]).abs().max().item())
        v3 = model.decode(z9)                # 9 frames
        v2 = model.decode(z9[:, :, :2])      # 5 frames
        v1 = model.decode(z9[:, :, :1])      # 1 frame
        dec_err = max((v2 - v3[:, :, :5]).abs().max().item(), (v1 - v3[:, :, :1]).abs().max().item())
    assert z1.shape[2] == 1 and z5.shape[2] == 2 and v1.shape[2] == 1 and v2.shape[2] == 5
    print(f"causality: encode max diff {enc_err:.2e}, decode max diff {dec_err:.2e}")
    assert enc_err <= 1e-5, enc_err
    assert dec_err <= 1e-5, dec_err
    # and the later latents do depend on what came before (otherwise the test above proves nothing about the cache)
    assert (z9_other[:, :, 1:] - z9[:, :, 1:]).abs().max() > 1e-3
    with torch.no_grad():
        z_alone = model.encode(torch.cat([x[:, :, :1], x[:, :, 5:9]], dim=2))
    assert (z_alone[:, :, 1] - z9[:, :, 2]).abs().max() > 1e-3


def test_vae_is_causal():
    check_causal(tiny_vae(), 16, 24)


def test_vae_rejects_bad_frame_count():
    model = tiny_vae()
    with pytest.raises(AssertionError, match="1\\+4k"):
        model.encode(video(1, 8, 16, 16))


# Spec §2.1 example keys and shapes (independent of the fixture, which came from the official code)
SPEC_KEYS = {
    "encoder.conv1.weight": (96, 3, 3, 3, 3),
    "encoder.downsamples.0.residual.0.gamma": (96, 1, 1, 1),
    "encoder.downsamples.0.residual.2.weight": (96, 96, 3, 3, 3),
    "encoder.downsamples.2.resample.1.weight": (96, 96, 3, 3),
    "encoder.downsamples.3.shortcut.weight": (192, 96, 1, 1, 1),
    "encoder.downsamples.5.time_conv.weight": (192, 192, 3, 1, 1),
    "encoder.middle.1.norm.gamma": (384, 1, 1),
    "encoder.middle.1.to_qkv.weight": (1152, 384, 1, 1),
    "encoder.middle.1.proj.weight": (384, 384, 1, 1),
    "encoder.head.2.weight": (32, 384, 3, 3, 3),
    "conv1.weight": (32, 32, 1, 1, 1),
    "conv2.weight": (16, 16, 1, 1, 1),
    "decoder.conv1.weight": (384, 16, 3, 3, 3),
    "decoder.upsamples.3.resample.1.weight": (192, 384, 3, 3),
    "decoder.upsamples.3.time_conv.weight": (768, 384, 3, 1, 1),
    "decoder.upsamples.11.resample.1.weight": (96, 192, 3, 3),
    "decoder.head.2.weight": (3, 96, 3, 3, 3),
}


def check_full_size(model, fixture, spec_keys, n_params, n_encoder, n_decoder):
    """A full-size VAE built on meta: its keys, their order and shapes equal the fixture's (dumped from the official
    code, or from diffusers' model renamed back), the spec's shapes hold in the fixture, and the parameter counts are
    the spec's. Used for Wan 2.1 here and Wan 2.2 in test_wan22_vae.py. -> the fixture."""
    ours = {k: list(v.shape) for k, v in model.state_dict().items()}
    with open(os.path.join(FIX, fixture)) as f:
        official = json.load(f)
    assert ours == official
    assert list(ours) == list(official)  # same order too, so a state_dict dump diffs cleanly against the official one
    for k, shape in spec_keys.items():
        assert tuple(official[k]) == shape, k
    count = lambda prefix: sum(p.numel() for n, p in model.named_parameters() if n.startswith(prefix))  # noqa: E731
    assert (count(""), count("encoder."), count("decoder.")) == (n_params, n_encoder, n_decoder)
    return official


def test_full_size_keys_and_shapes_on_meta():
    with torch.device("meta"):
        model = WanVAE(VAE_PRESETS["2.1"])
    official = check_full_size(model, "wan21_vae_keys.json", SPEC_KEYS, 126_892_531, 53_595_872, 73_295_331)
    assert len(official) == 194 and "encoder.head.0.gamma" in official


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    model = tiny_vae(seed=3)
    d = tmp_path_factory.mktemp("vae")
    sd = model.state_dict()
    torch.save(sd, d / "vae.pth")
    save_file(sd, str(d / "vae.safetensors"))
    os.makedirs(d / "ckpt")
    torch.save(sd, d / "ckpt" / "Wan2.1_VAE.pth")
    return model, d


def check_loads_back(model, path, x, **kw):
    """load_vae(path, **kw) gives a frozen eval-mode VAE whose encode and decode of x equal `model`'s bit for bit.
    -> the loaded VAE."""
    loaded = load_vae(str(path), **kw)
    assert not loaded.training and not any(p.requires_grad for p in loaded.parameters())
    with torch.no_grad():
        z, z_loaded = model.encode(x), loaded.encode(x)
        v, v_loaded = model.decode(z), loaded.decode(z)
    assert torch.equal(z, z_loaded)
    assert torch.equal(v, v_loaded)
    return loaded


@pytest.mark.parametrize("name", ["vae.pth", "vae.safetensors", "ckpt"])
def test_load_vae_round_trip(saved, name):
    model, d = saved
    check_loads_back(model, d / name, video(1, 5, 8, 16), config=TINY)


def test_load_vae_bf16(saved):
    model, d = saved
    loaded = load_vae(str(d / "vae.safetensors"), dtype=torch.bfloat16, config=TINY)
    assert all(p.dtype == torch.bfloat16 for p in loaded.parameters())
    x = video(1, 5, 8, 16)
    with torch.no_grad():
        z, z16 = model.encode(x), loaded.encode(x)
    assert z16.dtype == torch.float32  # latents come back in fp32 whatever the weights are
    assert (z - z16).abs().max() < 0.1 * z.abs().max()


def check_names_bad_keys(model, tmp_path, missing, say="", **kw):
    """A file without the key `missing` and one with an extra key: load_vae names each ("<say>N missing keys: ...")."""
    sd = dict(model.state_dict())
    del sd[missing]
    torch.save(sd, tmp_path / "missing.pth")
    with pytest.raises(ValueError, match=f"{say}1 missing keys.*{re.escape(missing)}"):
        load_vae(str(tmp_path / "missing.pth"), **kw)
    sd = dict(model.state_dict())
    sd["encoder.extra.weight"] = torch.zeros(1)
    save_file(sd, str(tmp_path / "extra.safetensors"))
    with pytest.raises(ValueError, match="1 unexpected keys.*encoder\\.extra\\.weight"):
        load_vae(str(tmp_path / "extra.safetensors"), **kw)


def test_load_vae_names_missing_and_unexpected_keys(saved, tmp_path):
    check_names_bad_keys(saved[0], tmp_path, "decoder.upsamples.3.time_conv.weight", config=TINY)


def test_load_vae_reads_its_width_off_the_file_and_rejects_wrong_shapes(saved):
    _, d = saved
    assert load_vae(str(d / "vae.pth")).cfg == TINY  # no config given: dim and z_dim come from the weights
    with pytest.raises(RuntimeError, match="size mismatch for encoder.conv1.weight"):
        load_vae(str(d / "vae.pth"), config=VAE_PRESETS["2.1"])  # right keys, tiny shapes, asked for full size


def test_load_vae_rejects_diffusers_format(saved, tmp_path):
    from diffusers.loaders.single_file_utils import convert_wan_vae_to_diffusers
    model, _ = saved
    save_file(convert_wan_vae_to_diffusers(dict(model.state_dict())), str(tmp_path / "diffusers.safetensors"))
    with pytest.raises(ValueError, match="diffusers-format"):
        load_vae(str(tmp_path / "diffusers.safetensors"), config=TINY)
