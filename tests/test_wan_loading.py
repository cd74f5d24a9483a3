"""Every DiT layout the README promises loads to the same model; a wrong checkpoint fails naming the keys."""
import dataclasses
import json

import pytest
import torch
from safetensors.torch import save_file

import train_wan as W
from tests.checks import fp8_scaled
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


def save_diffusers(m, folder):
    """Write the WanModel `m` as diffusers' WanTransformer3DModel folder (config.json + safetensors), through
    diffusers' own key conversion."""
    from diffusers import WanTransformer3DModel
    from diffusers.loaders.single_file_utils import convert_wan_transformer_to_diffusers
    c = m.cfg
    ref = WanTransformer3DModel(patch_size=c.patch_size, num_attention_heads=c.num_heads,
                                attention_head_dim=c.dim // c.num_heads, in_channels=c.in_dim, out_channels=c.out_dim,
                                text_dim=c.text_dim, freq_dim=c.freq_dim, ffn_dim=c.ffn_dim, num_layers=c.num_layers,
                                eps=c.eps)
    ref.load_state_dict(convert_wan_transformer_to_diffusers(dict(m.state_dict())), strict=True)
    ref.save_pretrained(str(folder))


def test_diffusers_folder(tmp_path):
    m = tiny_dit()
    save_diffusers(m, tmp_path / "transformer")
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


def make_diffusers_a14b(root, boundary_ratio=0.6):
    """A Wan2.2-T2V-A14B-Diffusers root: transformer/ (the high-noise expert, diffusers' pipeline_wan.py runs it at
    t >= boundary_ratio * 1000), transformer_2/ (low noise), model_index.json with the boundary. -> (high, low)."""
    high, low = tiny_dit(1), tiny_dit(2)
    save_diffusers(high, root / "transformer")
    save_diffusers(low, root / "transformer_2")
    index = {"_class_name": "WanPipeline", "transformer": ["diffusers", "WanTransformer3DModel"],
             "transformer_2": ["diffusers", "WanTransformer3DModel"]}
    if boundary_ratio is not None:
        index["boundary_ratio"] = boundary_ratio
    (root / "model_index.json").write_text(json.dumps(index))
    return high, low


def test_diffusers_a14b_root_is_two_experts(tmp_path):
    """transformer/ is the high-noise expert, transformer_2/ the low-noise one, the boundary is model_index.json's
    boundary_ratio: as --ckpt_dir or --dit_path, in every place main() asks (experts, --expert, boundary, config,
    weights, check_args); one model (load_dit) is refused naming both folders, never silently transformer/."""
    high, low = make_diffusers_a14b(tmp_path)
    with pytest.raises(FileNotFoundError, match="transformer or .*transformer_2 .the high-, the low-noise one"):
        W.load_dit(str(tmp_path))
    both = {"high": str(tmp_path / "transformer"), "low": str(tmp_path / "transformer_2")}
    for flag in ("ckpt_dir", "dit_path"):
        args = W.Args(mode="bench", **{flag: str(tmp_path)})
        assert W.expert_folders(args) == both
        assert W.expert_folders(dataclasses.replace(args, expert="low")) == {"low": both["low"]}
        cfg = W.dit_config(args)
        assert cfg.model_type == "t2v" and cfg.dim == high.cfg.dim
        assert W.boundary_of(args, cfg) == 0.6
        assert W.boundary_of(dataclasses.replace(args, boundary=0.7), cfg) == 0.7
        W.check_args(dataclasses.replace(args, expert="high", sample_guidance_high=4.0))  # A14B-only flags pass
        for e, m in (("high", high), ("low", low)):
            sd = W.read_dit_weights(args, cfg, 0, torch.float32, both[e])
            want = m.state_dict()
            assert set(sd) == set(want) and all(torch.equal(sd[k], want[k]) for k in want), e
    (tmp_path / "model_index.json").unlink()  # no boundary_ratio: upstream's own for the model type
    assert W.boundary_of(W.Args(ckpt_dir=str(tmp_path)), cfg) == 0.875


@pytest.mark.parametrize("prefix", ["", "model.diffusion_model."])
def test_comfyui_fp8_scaled_file(tmp_path, prefix):
    m = tiny_dit()
    tensors, want = fp8_scaled(m.state_dict(), prefix)
    f = str(tmp_path / "wan2.1_t2v_tiny_fp8_scaled.safetensors")
    save_file(tensors, f)
    assert not torch.equal(want["blocks.0.self_attn.q.weight"], m.state_dict()["blocks.0.self_attn.q.weight"])
    got = W.load_dit(f, dtype=torch.float32).state_dict()
    assert set(got) == set(want) and all(torch.equal(got[k], want[k]) for k in want)
    # a LoRA's read: the blocks dequantized in fp32 and then cast to bf16, the rest fp32 as in the file
    cfg, sd = W.read_dit_checkpoint(f, torch.bfloat16, root_dtype=torch.float32)
    assert torch.equal(sd["blocks.1.ffn.0.weight"], want["blocks.1.ffn.0.weight"].to(torch.bfloat16))
    head = sd["head.head.weight"]
    assert head.dtype == torch.float32 and torch.equal(head, want["head.head.weight"])
    # the flag check reads the config off the same keys (header only): no KeyError, the model's shapes
    assert cfg == W.read_dit_config(f) and cfg.dim == m.cfg.dim and cfg.num_layers == m.cfg.num_layers
    W.check_args(W.Args(mode="bench", dit_path=f))


def test_a_file_that_is_no_wan_dit_is_one_clear_line(tmp_path):
    f = str(tmp_path / "not_wan.safetensors")
    save_file({"double_blocks.0.img_attn.qkv.weight": torch.zeros(2, 2)}, f)
    with pytest.raises(W.UserError, match=r"not_wan.safetensors: .*no tensor patch_embedding.weight .*Wan DiT"):
        W.check_args(W.Args(mode="bench", dit_path=f))


def test_a_lora_run_reads_the_root_weights_in_fp32(tmp_path):
    """--lora_rank with a bf16 compute dtype: the blocks' frozen base is bf16, the embeddings and the head (fp32
    parameters in the model) keep the file's fp32 values bit for bit, through read_dit_weights and build_dit."""
    from tests.procs import gloo_world_of_one
    m = tiny_dit()
    f = str(tmp_path / "dit.safetensors")
    save_file({k: v.contiguous() for k, v in m.state_dict().items()}, f)
    want = m.state_dict()
    root = [k for k in want if not k.startswith("blocks.")]
    assert {"time_embedding.0.weight", "time_projection.1.weight", "head.head.weight", "text_embedding.0.weight",
            "patch_embedding.weight", "head.modulation"} <= set(root)
    assert not torch.equal(want["time_embedding.0.weight"].to(torch.bfloat16).float(), want["time_embedding.0.weight"])
    args = W.Args(preset="tiny", dit_path=f, lora_rank=4)
    cfg = W.read_dit_config(f)
    sd = W.read_dit_weights(args, cfg, 0, torch.bfloat16)
    assert all(sd[k].dtype == torch.float32 and torch.equal(sd[k], want[k]) for k in root)
    assert sd["blocks.0.self_attn.q.weight"].dtype == torch.bfloat16
    with gloo_world_of_one():
        model = W.build_dit(args, cfg, sd, torch.device("cpu"), torch.bfloat16)
        got = {k: (v.full_tensor() if hasattr(v, "full_tensor") else v) for k, v in model.state_dict().items()}
    assert all(got[k].dtype == torch.float32 and torch.equal(got[k], want[k]) for k in root)
    assert torch.equal(got["blocks.0.ffn.0.weight"], want["blocks.0.ffn.0.weight"].to(torch.bfloat16))
