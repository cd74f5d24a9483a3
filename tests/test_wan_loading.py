"""Every DiT layout the README promises loads to the same model; a wrong checkpoint fails naming the keys."""
import dataclasses
import json

import pytest
import torch
from safetensors.torch import save_file

import train_wan as W
from tests.helpers import dit_inputs, tiny_dit


def official_config(cfg):
    return dict(_class_name="WanModel", model_type="t2v", dim=cfg.dim, ffn_dim=cfg.ffn_dim, num_heads=cfg.num_heads,
                num_layers=cfg.num_layers, in_dim=cfg.in_dim, out_dim=cfg.out_dim, text_len=cfg.text_len,
                freq_dim=cfg.freq_dim, eps=cfg.eps, text_dim=cfg.text_dim)


def same_outputs(a, b):
    x, t, ctx = dit_inputs(a.cfg)
    with torch.no_grad():
        return torch.equal(a(x, t, ctx), b(x, t, ctx))


def test_official_single_and_sharded(tmp_path):
    m = tiny_dit()
    sd = {k: v.contiguous() for k, v in m.state_dict().items()}
    single = tmp_path / "single"
    single.mkdir()
    (single / "config.json").write_text(json.dumps(official_config(m.cfg)))
    save_file(sd, str(single / "diffusion_pytorch_model.safetensors"))
    assert same_outputs(m, W.load_dit(str(single)))

    sharded = tmp_path / "sharded"
    sharded.mkdir()
    (sharded / "config.json").write_text(json.dumps(official_config(m.cfg)))
    keys = sorted(sd)
    parts = [keys[: len(keys) // 2], keys[len(keys) // 2:]]
    wmap = {}
    for i, ks in enumerate(parts):
        name = f"diffusion_pytorch_model-0000{i + 1}-of-00002.safetensors"
        save_file({k: sd[k] for k in ks}, str(sharded / name))
        wmap.update({k: name for k in ks})
    (sharded / "diffusion_pytorch_model.safetensors.index.json").write_text(json.dumps({"weight_map": wmap}))
    loaded = W.load_dit(str(sharded))
    assert loaded.cfg == m.cfg
    assert same_outputs(m, loaded)


@pytest.mark.parametrize("prefix", ["", "model.diffusion_model.", "diffusion_model."])
def test_comfyui_single_file(tmp_path, prefix):
    m = tiny_dit()
    f = tmp_path / "wan2.1_t2v_tiny_bf16.safetensors"
    save_file({prefix + k: v.to(torch.bfloat16).contiguous() for k, v in m.state_dict().items()}, str(f))
    loaded = W.load_dit(str(f))  # config inferred from shapes (head_dim 128 is assumed: the tiny heads are 32)
    assert loaded.cfg.dim == m.cfg.dim and loaded.cfg.num_layers == m.cfg.num_layers
    assert loaded.cfg.ffn_dim == m.cfg.ffn_dim and loaded.cfg.text_dim == m.cfg.text_dim
    ref = {k: v.to(torch.bfloat16).float() for k, v in m.state_dict().items()}
    got = W.load_dit(str(f), dtype=torch.float32).state_dict()
    assert all(torch.equal(got[k], ref[k]) for k in ref)


def test_diffusers_folder(tmp_path):
    from diffusers import WanTransformer3DModel
    from diffusers.loaders.single_file_utils import convert_wan_transformer_to_diffusers
    m = tiny_dit()
    c = m.cfg
    ref = WanTransformer3DModel(patch_size=c.patch_size, num_attention_heads=c.num_heads,
                                attention_head_dim=c.dim // c.num_heads, in_channels=c.in_dim, out_channels=c.out_dim,
                                text_dim=c.text_dim, freq_dim=c.freq_dim, ffn_dim=c.ffn_dim, num_layers=c.num_layers)
    ref.load_state_dict(convert_wan_transformer_to_diffusers(dict(m.state_dict())), strict=True)
    ref.save_pretrained(str(tmp_path / "transformer"))
    for path in (tmp_path, tmp_path / "transformer"):  # the repo root and the transformer/ folder
        loaded = W.load_dit(str(path))
        # diffusers has no text_len (its pipeline pads to 512, as the official config says); the tiny one is 16
        assert loaded.cfg.text_len == 512
        loaded.cfg = dataclasses.replace(loaded.cfg, text_len=m.cfg.text_len)
        assert loaded.cfg == m.cfg
        assert same_outputs(m, loaded)


def test_wrong_checkpoint_names_the_keys(tmp_path):
    m = tiny_dit()
    sd = {k: v.contiguous() for k, v in m.state_dict().items()}
    sd.pop("blocks.1.cross_attn.norm_k.weight")
    sd["blocks.0.self_attn.extra.weight"] = torch.zeros(3)
    (tmp_path / "config.json").write_text(json.dumps(official_config(m.cfg)))
    save_file(sd, str(tmp_path / "diffusion_pytorch_model.safetensors"))
    with pytest.raises(KeyError, match="blocks.1.cross_attn.norm_k.weight") as e:
        W.load_dit(str(tmp_path))
    assert "blocks.0.self_attn.extra.weight" in str(e.value)


def test_i2v_config_is_refused(tmp_path):
    m = tiny_dit()
    cfg = official_config(m.cfg)
    cfg["model_type"] = "i2v"
    (tmp_path / "config.json").write_text(json.dumps(cfg))
    save_file({k: v.contiguous() for k, v in m.state_dict().items()},
              str(tmp_path / "diffusion_pytorch_model.safetensors"))
    with pytest.raises(ValueError, match="i2v"):
        W.load_dit(str(tmp_path))
