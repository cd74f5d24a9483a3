"""The Wan 2.2 VAE (TI2V-5B's, 48 channels, stride 4 x 16 x 16) against diffusers' AutoencoderKLWan in its 2.2
configuration (an independent implementation), loaded from OUR state dict through the official -> diffusers key map
below; causality of the chunked encode/decode; full-size keys and shapes on the meta device against a fixture made
from diffusers' full-size 2.2 model (tests/fixtures/make_wan22_vae_keys.py); load_vae telling 2.2 from 2.1 by the
weights; bf16 on CPU."""
import os
import re

import pytest
import torch
from safetensors.torch import save_file

from tests.test_wan_vae import (check_causal, check_full_size, check_loads_back, check_matches_diffusers,
                                  check_names_bad_keys, randomise, video)
from train_wan import VAE22_PRESETS, VAE_PRESETS, Wan22VAE, WanVAE, load_vae

FIX = os.path.join(os.path.dirname(__file__), "fixtures")
TINY = VAE22_PRESETS["tiny"]


def tiny_vae(seed=0):
    torch.manual_seed(seed)
    return randomise(Wan22VAE(TINY))


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


@pytest.mark.parametrize("frames", [1, 5, 9])
def test_vae22_matches_diffusers(pair, frames):
    check_matches_diffusers(*pair, frames, B=2, H=32, W=48)


def test_vae22_is_causal():
    check_causal(tiny_vae(), 32, 48)


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
    official = check_full_size(model, "wan22_vae_keys.json", SPEC_KEYS, 704_688_668, 149_627_776, 555_049_228)
    assert len(official) == 196
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
    loaded = check_loads_back(model, d / name, video(1, 5, 32, 16))  # no config: version and widths from the file
    assert isinstance(loaded, Wan22VAE) and loaded.cfg == TINY


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
    check_names_bad_keys(saved[0], tmp_path, "decoder.upsamples.0.upsamples.3.time_conv.weight", say="Wan 2.2 VAE: ")


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
