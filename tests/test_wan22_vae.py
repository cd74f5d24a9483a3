"""The Wan 2.2 VAE (TI2V-5B's, 48 channels, stride 4 x 16 x 16) against diffusers' AutoencoderKLWan in its 2.2
configuration (an independent implementation), loaded from OUR state dict through the official -> diffusers key map
below; causality of the chunked encode/decode; full-size keys and shapes on the meta device against a fixture made
from diffusers' full-size 2.2 model (tests/fixtures/make_wan22_vae_keys.py); load_vae telling 2.2 from 2.1 by the
weights; bf16 on CPU."""
import json
import os
import re

import pytest
import torch
from safetensors.torch import save_file

from train_wan import VAE22_PRESETS, VAE_PRESETS, Wan22VAE, WanVAE, load_vae

FIX = os.path.join(os.path.dirname(__file__), "fixtures")
TINY = VAE22_PRESETS["tiny"]


def tiny_vae(seed=0):
    torch.manual_seed(seed)
    model = Wan22VAE(TINY)
    # randomise everything (gamma too) so that a swapped or ignored tensor shows up; N(0, 0.25/fan_in) keeps activations
    # O(1) so the decoded video is mostly inside the [-1, 1] clamp
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("gamma"):
                p.uniform_(0.5, 1.5)
            elif name.endswith("bias"):
                p.normal_(0, 0.1)
            else:
                p.normal_(0, 0.5 * p[0].numel() ** -0.5)
    return model.eval().requires_grad_(False)


# Official Wan2.2_VAE.pth key -> diffusers AutoencoderKLWan(is_residual=True) key. diffusers 0.42.1 ships no loader for
# the 2.2 file (single_file_utils only converts 2.1), so the map lives here; it follows convert_vae_22 in diffusers'
# scripts/convert_wan_to_diffusers.py: stage i, block j -> down_blocks.i.resnets.j / down_blocks.i.downsampler (and
# up_blocks.i.resnets.j / up_blocks.i.upsampler), middle -> mid_block, head -> norm_out / conv_out.
RES = {"residual.0": "norm1", "residual.2": "conv1", "residual.3": "norm2", "residual.6": "conv2",
       "shortcut": "conv_shortcut"}


def official_to_diffusers(key):
    top = {"conv1.weight": "quant_conv.weight", "conv1.bias": "quant_conv.bias",
           "conv2.weight": "post_quant_conv.weight", "conv2.bias": "post_quant_conv.bias"}
    if key in top:
        return top[key]
    side, rest = key.split(".", 1)
    rest = re.sub(r"^conv1\.", "conv_in.", rest)
    rest = re.sub(r"^head\.0\.", "norm_out.", rest)
    rest = re.sub(r"^head\.2\.", "conv_out.", rest)
    rest = re.sub(r"^middle\.1\.", "mid_block.attentions.0.", rest)
    rest = re.sub(r"^middle\.([02])\.", lambda m: f"mid_block.resnets.{int(m[1]) // 2}.", rest)
    m = re.match(r"^(down|up)samples\.(\d+)\.(?:down|up)samples\.(\d+)\.(.*)$", rest)
    if m:
        kind, i, j, tail = m.groups()
        if tail.startswith(("resample.", "time_conv.")):
            rest = f"{kind}_blocks.{i}.{kind}sampler.{tail}"
        else:
            rest = f"{kind}_blocks.{i}.resnets.{j}.{tail}"
    for a, b in RES.items():
        rest = re.sub(rf"\.{re.escape(a)}\.", f".{b}.", rest)
    return f"{side}.{rest}"


def diffusers_twin(model):
    from diffusers import AutoencoderKLWan
    c = model.cfg
    ref = AutoencoderKLWan(base_dim=c.dim, decoder_base_dim=c.dec_dim, z_dim=c.z_dim, dim_mult=list(c.dim_mult),
                           num_res_blocks=c.num_res_blocks, attn_scales=[],
                           temperal_downsample=list(c.temperal_downsample), dropout=0.0, is_residual=True,
                           in_channels=12, out_channels=12, patch_size=2, scale_factor_spatial=16,
                           scale_factor_temporal=4, latents_mean=list(c.latents_mean), latents_std=list(c.latents_std))
    sd = {official_to_diffusers(k): v.clone() for k, v in model.state_dict().items()}
    # diffusers' 1x1x1 convs are causal 3-D convs: same weight shapes as our nn.Conv3d
    ref.load_state_dict(sd, strict=True)  # raises on any missing or unexpected key
    return ref.eval()


@pytest.fixture(scope="module")
def pair():
    model = tiny_vae()
    return model, diffusers_twin(model)


def video(B, F, H, W, seed=1):
    g = torch.Generator().manual_seed(seed)
    return torch.rand(B, 3, F, H, W, generator=g) * 2 - 1


@pytest.mark.parametrize("frames", [1, 5, 9])
def test_vae22_matches_diffusers(pair, frames):
    model, ref = pair
    B, H, W = 2, 32, 48  # H != W catches a swapped reshape
    x = video(B, frames, H, W)
    mean = torch.tensor(model.cfg.latents_mean).view(1, -1, 1, 1, 1)
    std = torch.tensor(model.cfg.latents_std).view(1, -1, 1, 1, 1)
    T = (frames - 1) // 4 + 1
    with torch.no_grad():
        z = model.encode(x)
        z_ref = (ref.encode(x).latent_dist.mode() - mean) / std
        assert z.shape == z_ref.shape == (B, 48, T, H // 16, W // 16)
        enc_err = (z - z_ref).abs().max().item()

        # decode independent latents, not just our own output, so a decoder bug can't hide behind the encoder
        zin = torch.randn(B, 48, T, H // 16, W // 16, generator=torch.Generator().manual_seed(2))
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


def test_vae22_is_causal():
    # the first latent frame depends only on the first video frame, latents 0-1 only on frames 0-4; and back
    model = tiny_vae()
    x = video(2, 9, 32, 48)
    with torch.no_grad():
        z9 = model.encode(x)                 # 3 latents
        z5 = model.encode(x[:, :, :5])       # 2 latents
        z1 = model.encode(x[:, :, :1])       # 1 latent
        y = x.clone()
        y[:, :, 1:] = video(2, 8, 32, 48, seed=7)  # other frames after the first
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


def test_vae22_rejects_bad_shapes():
    model = tiny_vae()
    with pytest.raises(AssertionError, match="1\\+4k"):
        model.encode(video(1, 8, 32, 32))
    with pytest.raises(AssertionError, match="16m"):
        model.encode(video(1, 5, 24, 32))  # a multiple of 8 is enough for 2.1, not for 2.2


def test_vae_stride_and_channels():
    # what the training script reads off either VAE instead of assuming Wan 2.1
    with torch.device("meta"):
        v22, v21 = Wan22VAE(VAE22_PRESETS["2.2"]), WanVAE(VAE_PRESETS["2.1"])
    assert (v22.z_dim, v22.stride) == (48, (4, 16, 16))
    assert (v21.z_dim, v21.stride) == (16, (4, 8, 8))
    assert (tiny_vae().z_dim, tiny_vae().stride) == (48, (4, 16, 16))


# Spec §2.2 facts, independent of the fixture (which came from diffusers' full-size 2.2 model, and was checked against
# upstream's vae2_2.py by the generator's --check)
SPEC_KEYS = {
    "encoder.conv1.weight": (160, 12, 3, 3, 3),
    "encoder.head.2.weight": (96, 640, 3, 3, 3),
    "conv1.weight": (96, 96, 1, 1, 1),
    "conv2.weight": (48, 48, 1, 1, 1),
    "decoder.conv1.weight": (1024, 48, 3, 3, 3),
    "decoder.head.2.weight": (12, 256, 3, 3, 3),
}


def test_full_size_keys_and_shapes_on_meta():
    with torch.device("meta"):
        model = Wan22VAE(VAE22_PRESETS["2.2"])
    ours = {k: list(v.shape) for k, v in model.state_dict().items()}
    with open(os.path.join(FIX, "wan22_vae_keys.json")) as f:
        official = json.load(f)
    assert len(official) == 196
    assert ours == official
    assert list(ours) == list(official)  # same order too, so a state_dict dump diffs cleanly against the official one
    for k, shape in SPEC_KEYS.items():
        assert tuple(official[k]) == shape, k
    assert sum(p.numel() for p in model.parameters()) == 704_688_668
    assert sum(p.numel() for n, p in model.named_parameters() if n.startswith("encoder.")) == 149_627_776
    assert sum(p.numel() for n, p in model.named_parameters() if n.startswith("decoder.")) == 555_049_228
    # the 2.2 layout: stage modules with their residual blocks and resamplers nested inside
    assert "encoder.downsamples.1.downsamples.2.time_conv.weight" in official
    assert "decoder.upsamples.0.upsamples.3.time_conv.weight" in official
    assert official["decoder.upsamples.2.upsamples.3.resample.1.weight"] == [512, 512, 3, 3]  # keeps C (2.1 halves)


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    model = tiny_vae(seed=3)
    d = tmp_path_factory.mktemp("vae22")
    sd = model.state_dict()
    torch.save(sd, d / "vae.pth")
    save_file(sd, str(d / "vae.safetensors"))
    os.makedirs(d / "ti2v")
    torch.save(sd, d / "ti2v" / "Wan2.2_VAE.pth")  # TI2V-5B's folder layout
    torch.save(sd, d / "Wan2.1_VAE.pth")           # a 2.2 file under the 2.1 name: the weights decide, not the name
    return model, d


@pytest.mark.parametrize("name", ["vae.pth", "vae.safetensors", "ti2v", "Wan2.1_VAE.pth"])
def test_load_vae22_round_trip(saved, name):
    model, d = saved
    loaded = load_vae(str(d / name))  # no config: the version and the widths come from the file
    assert isinstance(loaded, Wan22VAE) and loaded.cfg == TINY
    assert not loaded.training and not any(p.requires_grad for p in loaded.parameters())
    x = video(1, 5, 32, 16)
    with torch.no_grad():
        z, z_loaded = model.encode(x), loaded.encode(x)
        v, v_loaded = model.decode(z), loaded.decode(z)
    assert torch.equal(z, z_loaded)
    assert torch.equal(v, v_loaded)


def test_load_vae_still_reads_wan21(tmp_path):
    torch.manual_seed(0)
    m21 = WanVAE(VAE_PRESETS["tiny"]).eval()
    os.makedirs(tmp_path / "t2v")
    torch.save(m21.state_dict(), tmp_path / "t2v" / "Wan2.1_VAE.pth")
    torch.save(m21.state_dict(), tmp_path / "Wan2.2_VAE.pth")  # a 2.1 file under the 2.2 name
    for p in (tmp_path / "t2v", tmp_path / "Wan2.2_VAE.pth"):
        loaded = load_vae(str(p))
        assert type(loaded) is WanVAE and loaded.cfg == VAE_PRESETS["tiny"]
        assert (loaded.z_dim, loaded.stride) == (16, (4, 8, 8))
        x = video(1, 5, 16, 16)
        with torch.no_grad():
            assert torch.equal(loaded.encode(x), m21.encode(x))


def test_load_vae_folder_with_both_files_is_ambiguous(saved, tmp_path):
    model, _ = saved
    torch.save(model.state_dict(), tmp_path / "Wan2.2_VAE.pth")
    torch.save(WanVAE(VAE_PRESETS["tiny"]).state_dict(), tmp_path / "Wan2.1_VAE.pth")
    with pytest.raises(ValueError, match="both"):
        load_vae(str(tmp_path))


def test_load_vae22_bf16(saved):
    model, d = saved
    loaded = load_vae(str(d / "vae.safetensors"), dtype=torch.bfloat16)
    assert all(p.dtype == torch.bfloat16 for p in loaded.parameters())
    x = video(1, 5, 32, 16)
    with torch.no_grad():
        z, z16 = model.encode(x), loaded.encode(x)
        v, v16 = model.decode(z), loaded.decode(z)
    assert z16.dtype == torch.float32 and v16.dtype == torch.float32  # fp32 out whatever the weights are
    assert z16.shape == z.shape and v16.shape == v.shape == x.shape
    enc_rel = ((z - z16).abs().max() / z.abs().max()).item()
    dec_rel = ((v - v16).abs().max() / v.abs().max()).item()
    print(f"bf16 vs fp32: encode rel max diff {enc_rel:.2e}, decode {dec_rel:.2e}")
    assert enc_rel < 0.1 and dec_rel < 0.1


def test_load_vae22_names_missing_and_unexpected_keys(saved, tmp_path):
    model, _ = saved
    sd = dict(model.state_dict())
    del sd["decoder.upsamples.0.upsamples.3.time_conv.weight"]
    torch.save(sd, tmp_path / "missing.pth")
    with pytest.raises(ValueError, match="Wan 2.2 VAE: 1 missing keys.*decoder\\.upsamples\\.0\\.upsamples\\.3\\."
                                         "time_conv\\.weight"):
        load_vae(str(tmp_path / "missing.pth"))

    sd = dict(model.state_dict())
    sd["encoder.extra.weight"] = torch.zeros(1)
    save_file(sd, str(tmp_path / "extra.safetensors"))
    with pytest.raises(ValueError, match="1 unexpected keys.*encoder\\.extra\\.weight"):
        load_vae(str(tmp_path / "extra.safetensors"))


def test_load_vae_wrong_version_asked(saved, tmp_path):
    _, d = saved
    with pytest.raises(ValueError, match="Wan 2.1 VAE.*looks like the Wan 2.2 VAE"):
        load_vae(str(d / "vae.pth"), config=VAE_PRESETS["tiny"])
    torch.save(WanVAE(VAE_PRESETS["tiny"]).state_dict(), tmp_path / "v21.pth")
    with pytest.raises(ValueError, match="Wan 2.2 VAE.*looks like the Wan 2.1 VAE"):
        load_vae(str(tmp_path / "v21.pth"), config=TINY)
    with pytest.raises(RuntimeError, match="size mismatch for encoder.conv1.weight"):
        load_vae(str(d / "vae.pth"), config=VAE22_PRESETS["2.2"])  # right keys, tiny shapes, asked for full size


def test_load_vae22_rejects_diffusers_format(saved, tmp_path):
    model, _ = saved
    save_file({official_to_diffusers(k): v for k, v in model.state_dict().items()}, str(tmp_path / "d.safetensors"))
    with pytest.raises(ValueError, match="diffusers-format"):
        load_vae(str(tmp_path / "d.safetensors"))
