"""The real (non-toy) path of train_hunyuan.py's main(), in --dtype bf16 on CPU, through a tiny test-made folder in
upstream's ckpts/ layout (hunyuan-video-t2v-720p/transformers/mp_rank_00_model_states.pt, .../vae/pytorch_model.pt +
config.json, text_encoder/, text_encoder_2/): the VAE and both text encoders encode into the cache (--mode cache),
a full fine-tune trains and resumes, a LoRA trains on its export, --mode sample decodes through the VAE with and
without the LoRA, bench runs. Plus the flag checks: one clear line and exit code 2, before any work."""
import json
import os

import pytest
import torch

import train_hunyuan as H
from common.log import read_log
from tests.procs import run_script
from tests.test_hunyuan_dit import tiny_dit
from tests.test_hunyuan_text import make_clip_folder, make_llama_folder
from tests.test_hunyuan_vae import tiny_vae

# 32x32 pixels, 5 frames at 24 fps -> latents 16 x 2 x 4 x 4 -> 8 video tokens
CLIP = ["--height", "32", "--width", "32", "--frames", "5", "--fps", "24", "--log_every", "1", "--warmup_steps", "1",
        "--global_batch", "4", "--micro_batch", "2", "--dtype", "bf16", "--lr", "1e-3"]


def make_official_folder(root):
    from data.toy import BACKGROUNDS, COLORS, DIRECTIONS, SHAPES
    words = [" ".join([*COLORS, *SHAPES, *DIRECTIONS, *BACKGROUNDS, "a", "moving", "on", "background"])]
    model = os.path.join(root, "hunyuan-video-t2v-720p")
    os.makedirs(os.path.join(model, "transformers"))
    os.makedirs(os.path.join(model, "vae"))
    dit = tiny_dit()  # text widths 32 (the Llama) and 24 (CLIP)
    torch.save({"module": dit.state_dict()}, os.path.join(model, "transformers", H.DIT_FILE))
    vae = tiny_vae()
    torch.save(vae.state_dict(), os.path.join(model, "vae", H.VAE_FILE))
    c = vae.cfg
    with open(os.path.join(model, "vae", "config.json"), "w") as f:
        json.dump(dict(_class_name="AutoencoderKLCausal3D", block_out_channels=list(c.block_out_channels),
                       layers_per_block=c.layers_per_block, latent_channels=16, norm_num_groups=c.norm_num_groups,
                       scaling_factor=c.scaling_factor), f)
    make_llama_folder(os.path.join(root, "text_encoder"), layers=3, hidden=32, texts=words)
    make_clip_folder(os.path.join(root, "text_encoder_2"), hidden=24, texts=words)
    return root


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    from data.toy import make_toy_dataset
    d = tmp_path_factory.mktemp("official")
    make_official_folder(str(d / "ckpts"))
    make_toy_dataset(str(d / "clips"), n=8, size=32, frames=9)
    return {"ckpt": str(d / "ckpts"), "data": str(d / "clips"), "cache": str(d / "cache"), "root": d}


def hy(*flags, check=True):
    return run_script("train_hunyuan.py", flags, check=check)


def test_cache_train_resume_sample_export_lora_in_bf16(folder, tmp_path):
    common = ["--ckpt_dir", folder["ckpt"], "--data", folder["data"], "--cache_dir", folder["cache"], *CLIP]
    p = hy("--mode", "cache", *common)
    files = [f for f in os.listdir(folder["cache"]) if f.endswith(".safetensors")]
    assert len(files) == 8, (files, p.stdout[-2000:])
    from data.cache import load_entry
    t, meta = load_entry(os.path.join(folder["cache"], files[0]))
    # 16 latent channels, 2 latent frames of 4x4; the caption's valid Llama tokens (its words + <|eot_id|>), CLIP pooled
    assert t["latents"].shape == (16, 2, 4, 4) and t["text.pooled"].shape == (24,)
    assert t["text.states"].shape[1] == 32 and t["text.states"].shape[0] == len(meta["caption"].split()) + 1

    # full fine-tune, 4 steps with a checkpoint at 2; then the same run to 6 with --resume 1
    out = tmp_path / "full"
    p = hy(*common, "--out_dir", str(out), "--max_steps", "4", "--ckpt_every", "2", "--sample_prompts",
           "a red circle moving left", "--sample_steps", "2", "--caption_dropout", "0.5")
    assert "encoding" not in p.stderr  # the clips came from the cache
    log = read_log(out)
    assert [r["step"] for r in log if "loss" in r] == [1, 2, 3, 4]
    assert all(r["loss"] == r["loss"] and r["grad_norm"] > 0 for r in log if "loss" in r)  # finite, learning
    sd = H.read_dit_checkpoint(str(out / "model.safetensors"))[1]
    assert sd["double_blocks.0.img_attn_qkv.weight"].dtype == torch.bfloat16 and "guidance_in.mlp.0.weight" in sd
    hy(*common, "--out_dir", str(out), "--max_steps", "6", "--ckpt_every", "2", "--resume", "1",
       "--caption_dropout", "0.5")
    assert [r["step"] for r in read_log(out) if "loss" in r] == [1, 2, 3, 4, 5, 6]
    assert sorted(os.listdir(out / "checkpoints")) == ["step_00000002", "step_00000004", "step_00000006"]
    from data.video import probe
    info = probe(str(out / "samples" / "step_00000004_0.mp4"))  # decoded by the VAE: 5 frames of 32x32
    assert (info["frames"], info["height"], info["width"]) == (5, 32, 32)

    # LoRA on the fine-tuned DiT, bf16 base
    lora = tmp_path / "lora"
    hy(*common, "--out_dir", str(lora), "--max_steps", "3", "--lora_rank", "4", "--lr", "5e-2",
       "--dit_path", str(out / "model.safetensors"))
    lsd, rank, alpha = H.read_lora(str(lora / "lora.safetensors"))
    assert rank == 4 and max(v.abs().max().item() for k, v in lsd.items() if ".lora_B." in k) > 0
    assert all(k.startswith(("double_blocks.", "single_blocks.")) for k in lsd)

    # --mode sample with and without the LoRA: the LoRA must change the video
    s = ["--mode", "sample", "--ckpt_dir", folder["ckpt"], "--dit_path", str(out / "model.safetensors"),
         "--sample_prompts", "a blue square moving up", "--sample_steps", "3", "--height", "32", "--width", "32",
         "--frames", "5", "--dtype", "bf16", "--cache_dir", folder["cache"]]
    hy(*s, "--out_dir", str(tmp_path / "s0"))
    hy(*s, "--out_dir", str(tmp_path / "s1"), "--lora", str(lora / "lora.safetensors"))
    from data.video import read_clip
    a = read_clip(str(tmp_path / "s0" / "samples" / "step_00000000_0.mp4"), 0, 5, 24, (32, 32))
    b = read_clip(str(tmp_path / "s1" / "samples" / "step_00000000_0.mp4"), 0, 5, 24, (32, 32))
    assert (a - b).abs().mean() > 0.01, (a - b).abs().mean()
    assert not os.path.exists(tmp_path / "s0" / "args.json")  # sampling leaves no run files behind


def test_bench_in_bf16(folder):
    for extra in ([], ["--lora_rank", "4"]):
        p = hy("--mode", "bench", "--ckpt_dir", folder["ckpt"], *CLIP, "--bench_steps", "1", *extra)
        res = json.loads([line for line in p.stdout.splitlines() if line.startswith("{")][-1])
        assert res["dtype"] == "torch.bfloat16" and res["step_s"] > 0 and res["loss"] == res["loss"]
        assert res["tokens"] == 2 * 8


@pytest.mark.parametrize("flags, says", [
    (["--height", "30"], "--height 30 --width 32: both must be positive multiples of 16"),
    (["--lora_rank", "-1"], "--lora_rank -1 must be >= 0"),
    (["--preset", "7B"], "--preset '7B': expected one of 13B, tiny, toy"),
    (["--preset", "13B", "--ckpt_dir", ""], "--mode train needs --ckpt_dir"),
    (["--frames", "6"], "--frames 6: must be 1 + 4k"),
    (["--global_batch", "3"], "--global_batch 3 must be a multiple of --micro_batch x processes = 2 x 1"),
])
def test_user_errors_are_one_line_before_any_work(folder, tmp_path, flags, says):
    base = ["--ckpt_dir", folder["ckpt"], "--data", folder["data"], "--out_dir", str(tmp_path / "o"), *CLIP]
    p = hy(*base, *flags, check=False)
    assert p.returncode == 2, (p.stdout, p.stderr)
    lines = p.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: ") and says in lines[0], p.stderr
    assert "Traceback" not in p.stderr and not os.path.exists(tmp_path / "o")
