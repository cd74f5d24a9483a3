"""Every DiT and VAE layout the loaders accept gives the same model; the architecture comes off the shapes; a wrong
file fails naming the keys."""
import dataclasses
import json

import pytest
import torch
from safetensors.torch import save_file

import train_hunyuan as H
from tests.test_hunyuan_dit import inputs, tiny_dit
from tests.test_hunyuan_vae import tiny_vae


def same_outputs(a, b):
    x = inputs(a.cfg)
    with torch.no_grad():
        return torch.equal(a(*x), b(*x))


@pytest.mark.parametrize("where", ["file", "transformers", "model_folder", "ckpts"])
def test_official_pt_layouts(tmp_path, where):
    m = tiny_dit()
    d = tmp_path / "ckpts" / "hunyuan-video-t2v-720p" / "transformers"
    d.mkdir(parents=True)
    # the official file: a DeepSpeed-style dict with the weights under "module"
    torch.save({"module": m.state_dict()}, str(d / H.DIT_FILE))
    path = {"file": d / H.DIT_FILE, "transformers": d, "model_folder": d.parent, "ckpts": d.parent.parent}[where]
    loaded = H.load_dit(str(path))
    assert loaded.cfg == m.cfg  # every field read off the shapes, the refiner's 4x MLP included
    assert same_outputs(m, loaded)


@pytest.mark.parametrize("prefix", ["", "model.diffusion_model.", "diffusion_model.", "transformer."])
def test_single_safetensors_bf16(tmp_path, prefix):
    m = tiny_dit()
    f = tmp_path / "hunyuan_video_720_cfgdistill_bf16.safetensors"
    save_file({prefix + k: v.to(torch.bfloat16).contiguous() for k, v in m.state_dict().items()}, str(f))
    loaded = H.load_dit(str(f))
    assert loaded.cfg == m.cfg
    ref = {k: v.to(torch.bfloat16).float() for k, v in m.state_dict().items()}
    got = loaded.state_dict()
    assert all(torch.equal(got[k], ref[k]) for k in ref)
    assert H.load_dit(str(f), dtype=torch.bfloat16).img_in.proj.weight.dtype == torch.bfloat16


def test_config_without_guidance_and_other_depths(tmp_path):
    cfg = dataclasses.replace(H.DIT_PRESETS["tiny"], guidance_embed=False, mm_double_blocks_depth=1,
                              mm_single_blocks_depth=3, mlp_dim=128)
    with torch.device("meta"):
        m = H.HunyuanVideoDiT(cfg)
    assert H.dit_config_from(m.state_dict()) == cfg
    with torch.device("meta"):
        full = H.HunyuanVideoDiT(H.DIT_PRESETS["13B"])
    assert H.dit_config_from(full.state_dict()) == H.DIT_PRESETS["13B"]


def test_wrong_checkpoint_names_the_keys(tmp_path):
    m = tiny_dit()
    sd = m.state_dict()
    sd["double_blocks.0.img_attn.qkv.weight"] = sd.pop("double_blocks.0.img_attn_qkv.weight")  # ComfyUI-internal
    torch.save({"module": sd}, str(tmp_path / H.DIT_FILE))
    with pytest.raises(KeyError, match="img_attn_qkv.weight.*unexpected.*img_attn.qkv.weight"):
        H.load_dit(str(tmp_path))
    with pytest.raises(FileNotFoundError, match=H.DIT_FILE):
        H.load_dit(str(tmp_path / "nothing_here"))


def test_diffusers_dit_is_refused_in_one_line(tmp_path):
    """diffusers' HunyuanVideoTransformer3DModel layout (x_embedder.*, transformer_blocks.N.*), as its own
    save_pretrained names it: a UserError saying so and what loads, not dit_config_from's KeyError on img_in."""
    from common.args import UserError
    from tests.test_hunyuan_dit import diffusers_twin
    d = tmp_path / "transformer"
    diffusers_twin(tiny_dit()).save_pretrained(str(d), safe_serialization=True)
    f = d / "diffusion_pytorch_model.safetensors"
    for read in (H.read_dit_config, H.load_dit):
        with pytest.raises(UserError, match="diffusers-format HunyuanVideo transformer.*official key names"):
            read(str(f))
    for where in (d, tmp_path):  # its folder, or the pipeline folder above it
        with pytest.raises(FileNotFoundError, match="a diffusers-format folder.*not supported"):
            H.load_dit(str(where))
    save_file({"blocks.0.self_attn.q.weight": torch.zeros(2, 2)}, str(tmp_path / "wan.safetensors"))
    with pytest.raises(UserError, match="not a HunyuanVideo DiT"):
        H.read_dit_config(str(tmp_path / "wan.safetensors"))


@pytest.mark.parametrize("layout", ["plain", "state_dict", "vae_prefix"])
def test_vae_pt_layouts(tmp_path, layout):
    m = tiny_vae()
    sd = m.state_dict()
    obj = {"plain": sd, "state_dict": {"state_dict": sd},
           "vae_prefix": {"state_dict": {"vae." + k: v for k, v in sd.items()}}}[layout]
    torch.save(obj, str(tmp_path / H.VAE_FILE))
    c = m.cfg  # the official config.json's fields (and some we ignore)
    (tmp_path / "config.json").write_text(json.dumps(dict(
        _class_name="AutoencoderKLCausal3D", block_out_channels=list(c.block_out_channels),
        layers_per_block=c.layers_per_block, latent_channels=c.latent_channels, norm_num_groups=c.norm_num_groups,
        scaling_factor=c.scaling_factor, time_compression_ratio=4, in_channels=3, out_channels=3)))
    loaded = H.load_vae(str(tmp_path))
    assert loaded.cfg == c
    v = torch.rand(1, 3, 5, 16, 16) * 2 - 1
    with torch.no_grad():
        assert torch.equal(loaded.encode(v), m.encode(v))
    assert H.load_vae(str(tmp_path / H.VAE_FILE)).cfg == c


def test_vae_without_config_is_the_official_one(tmp_path):
    torch.save(tiny_vae().state_dict(), str(tmp_path / H.VAE_FILE))
    with pytest.raises(ValueError, match="shape mismatch"):  # tiny weights, 884-16c-hy config
        H.load_vae(str(tmp_path))


def test_official_fp8_file(tmp_path):
    """mp_rank_00_model_states_fp8.pt: the block Linears in float8_e4m3fn, a scale per module in _fp8_map.pt; the
    weights come back as upstream computes with them: fp8.to(bf16) * scale.to(bf16)."""
    m = tiny_dit()
    sd, scales = {}, {}
    for k, v in m.state_dict().items():
        mod = k[: -len(".weight")]
        if k.endswith(".weight") and ("double_blocks" in k or "single_blocks" in k) and v.dim() == 2:
            scales[mod] = v.abs().max() / 448.0  # upstream's per-tensor scale: max |w| / the e4m3 max
            v = (v / scales[mod]).to(torch.float8_e4m3fn)
        sd[k] = v
    d = tmp_path / "transformers"
    d.mkdir()
    torch.save({"module": sd}, str(d / "mp_rank_00_model_states_fp8.pt"))
    torch.save(scales, str(d / "mp_rank_00_model_states_fp8_map.pt"))
    loaded = H.load_dit(str(tmp_path))  # the folder above transformers/, which holds only the fp8 file
    got = loaded.state_dict()
    k = "double_blocks.0.img_attn_qkv.weight"
    want = sd[k].to(torch.bfloat16) * scales[k[:-7]].to(torch.bfloat16)
    assert torch.equal(got[k], want.float())
    assert torch.equal(got["double_blocks.0.img_attn_qkv.bias"], m.state_dict()["double_blocks.0.img_attn_qkv.bias"])
    assert (got[k] - m.state_dict()[k]).abs().max() < 0.1 * m.state_dict()[k].abs().max()  # fp8 rounding only
