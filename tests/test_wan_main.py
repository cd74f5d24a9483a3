"""The real (non-toy) path of train_wan.py's main(), in --dtype bf16 on CPU, through a tiny test-made folder in the
official Wan2.1-T2V-* layout: the VAE and umT5 encode into the cache (--mode cache), a full fine-tune trains and
resumes, a LoRA trains on it, --mode sample decodes through the VAE with and without the LoRA, bench runs in bf16.
Plus the flag checks a new user meets first: one clear line and exit code 2, before any work."""
import json
import os

import pytest
import torch

import train_wan as W
from common.log import read_log
from tests.helpers import TINY_DIT, TINY_T5, TINY_VAE_DIM, make_official_folder
from tests.procs import run_script
# 32x32 pixels, 5 frames at 16 fps -> latents 16 x 2 x 4 x 4 -> 8 tokens
CLIP = ["--height", "32", "--width", "32", "--frames", "5", "--fps", "16", "--log_every", "1", "--warmup_steps", "1",
        "--global_batch", "4", "--micro_batch", "2", "--dtype", "bf16", "--lr", "1e-3"]


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    from data.toy import make_toy_dataset
    d = tmp_path_factory.mktemp("official")
    make_official_folder(str(d / "Wan2.1-T2V-tiny"))
    make_toy_dataset(str(d / "clips"), n=8, size=32, frames=9)
    return {"ckpt": str(d / "Wan2.1-T2V-tiny"), "data": str(d / "clips"), "cache": str(d / "cache"), "root": d}


def wan(*flags, check=True):
    return run_script("train_wan.py", flags, check=check)


def test_the_loaders_read_the_sizes_off_the_files(folder):
    dit = W.load_dit(folder["ckpt"])
    assert (dit.cfg.dim, dit.cfg.num_layers, dit.cfg.text_dim) == (TINY_DIT["dim"], TINY_DIT["num_layers"], 32)
    vae = W.load_vae(folder["ckpt"])
    assert vae.cfg.dim == TINY_VAE_DIM and vae.cfg.z_dim == 16
    te = W.load_text_encoder(folder["ckpt"], dtype=torch.float32)
    cfg = te.model.blocks[0].attn
    assert te.model.token_embedding.weight.shape[1] == TINY_T5["dim"] and cfg.num_heads == TINY_T5["num_heads"]
    ctx = te.encode(["a red circle moving left"])
    assert ctx.shape == (1, 512, 32) and ctx[0, 6:].abs().sum() == 0 and ctx[0, :6].abs().sum() > 0  # 5 words + EOS


def test_cache_train_resume_sample_export_lora_in_bf16(folder, tmp_path):
    common = ["--ckpt_dir", folder["ckpt"], "--data", folder["data"], "--cache_dir", folder["cache"], *CLIP]
    p = wan("--mode", "cache", *common)
    files = [f for f in os.listdir(folder["cache"]) if f.endswith(".safetensors")]
    assert len(files) == 8, (files, p.stdout[-2000:])
    from data.cache import load_entry
    t, meta = load_entry(os.path.join(folder["cache"], files[0]))
    assert t["latents"].shape == (16, 2, 4, 4) and t["text"].shape[1] == 32 and t["text"].shape[0] <= 12

    # full fine-tune, 4 steps with a checkpoint at 2; then the same run to 6 with --resume 1
    out = tmp_path / "full"
    p = wan(*common, "--out_dir", str(out), "--max_steps", "4", "--ckpt_every", "2", "--sample_prompts",
            "a red circle moving left", "--sample_steps", "2")
    assert "encoding" not in p.stderr and "0 encoded" not in p.stdout  # everything came from the cache
    log = read_log(out)
    assert [r["step"] for r in log if "loss" in r] == [1, 2, 3, 4]
    assert all(r["loss"] == r["loss"] and r["grad_norm"] > 0 for r in log if "loss" in r)  # finite, learning
    sd = W.read_dit_checkpoint(str(out / "model.safetensors"))[1]
    assert "blocks.0.self_attn.q.weight" in sd and sd["blocks.0.self_attn.q.weight"].dtype == torch.bfloat16
    wan(*common, "--out_dir", str(out), "--max_steps", "6", "--ckpt_every", "2", "--resume", "1")
    assert [r["step"] for r in read_log(out) if "loss" in r] == [1, 2, 3, 4, 5, 6]
    assert sorted(os.listdir(out / "checkpoints")) == ["step_00000002", "step_00000004", "step_00000006"]

    # a final sample was decoded by the VAE: 5 frames of 32x32
    from data.video import probe
    info = probe(str(out / "samples" / "step_00000004_0.mp4"))
    assert (info["frames"], info["height"], info["width"]) == (5, 32, 32)

    # LoRA on the fine-tuned DiT, bf16 base
    lora = tmp_path / "lora"
    wan(*common, "--out_dir", str(lora), "--max_steps", "3", "--lora_rank", "4", "--lr", "5e-2",
        "--dit_path", str(out / "model.safetensors"))
    lsd, rank, alpha = W.read_lora(str(lora / "lora.safetensors"))
    assert rank == 4 and max(v.abs().max().item() for k, v in lsd.items() if ".lora_B." in k) > 0

    # --mode sample with and without the LoRA: the LoRA must change the video
    s = ["--mode", "sample", "--ckpt_dir", folder["ckpt"], "--dit_path", str(out / "model.safetensors"),
         "--sample_prompts", "a blue square moving up", "--sample_steps", "3", "--height", "32", "--width", "32",
         "--frames", "5", "--dtype", "bf16", "--cache_dir", folder["cache"]]
    wan(*s, "--out_dir", str(tmp_path / "s0"))
    wan(*s, "--out_dir", str(tmp_path / "s1"), "--lora", str(lora / "lora.safetensors"))
    from data.video import read_clip
    a = read_clip(str(tmp_path / "s0" / "samples" / "step_00000000_0.mp4"), 0, 5, 16, (32, 32))
    b = read_clip(str(tmp_path / "s1" / "samples" / "step_00000000_0.mp4"), 0, 5, 16, (32, 32))
    assert (a - b).abs().mean() > 0.01, (a - b).abs().mean()
    assert not os.path.exists(tmp_path / "s0" / "args.json")  # sampling leaves no run files behind


def test_bench_in_bf16(folder):
    for extra in ([], ["--lora_rank", "4"]):
        p = wan("--mode", "bench", "--ckpt_dir", folder["ckpt"], *CLIP, "--bench_steps", "1", *extra)
        res = json.loads([line for line in p.stdout.splitlines() if line.startswith("{")][-1])
        assert res["dtype"] == "torch.bfloat16" and res["step_s"] > 0 and res["loss"] == res["loss"]
        assert res["tokens"] == 2 * 8


@pytest.mark.parametrize("flags, says", [
    (["--height", "30"], "--height 30 --width 32: both must be positive multiples of 16"),
    (["--lora_rank", "-1"], "--lora_rank -1 must be >= 0"),
    (["--preset", "7B"], "--preset '7B': expected one of 1.3B, 14B, tiny, toy"),
    (["--preset", "1.3B", "--ckpt_dir", ""], "--mode train needs --ckpt_dir"),
    (["--frames", "6"], "--frames 6: must be 1 + 4k"),
    (["--mode", "sample", "--preset", "toy", "--sample_prompts", "a", "--ckpt_dir", ""], "--mode sample needs trained weights"),
    (["--global_batch", "3"], "--global_batch 3 must be a multiple of --micro_batch x processes = 2 x 1"),
])
def test_user_errors_are_one_line_before_any_work(folder, tmp_path, flags, says):
    base = ["--ckpt_dir", folder["ckpt"], "--data", folder["data"], "--out_dir", str(tmp_path / "o"), *CLIP]
    p = wan(*base, *flags, check=False)
    assert p.returncode == 2, (p.stdout, p.stderr)
    lines = p.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: ") and says in lines[0], p.stderr
    assert "Traceback" not in p.stderr and not os.path.exists(tmp_path / "o")
