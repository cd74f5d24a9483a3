"""The real (non-toy) path of train_wan.py's main(), in --dtype bf16 on CPU, through a tiny test-made folder in the
official Wan2.1-T2V-* layout: the VAE and umT5 encode into the cache (--mode cache), a full fine-tune trains and
resumes, a LoRA trains on it, --mode sample decodes through the VAE with and without the LoRA, bench runs in bf16.
Plus the flag checks a new user meets first: one clear line and exit code 2, before any work."""
import pytest
import torch

import train_wan as W
from tests import checks
from tests.helpers import TINY_DIT, TINY_T5, TINY_VAE_DIM, make_official_folder
from tests.procs import script_runner
# 32x32 pixels, 5 frames at 16 fps -> latents 16 x 2 x 4 x 4 -> 8 tokens
CLIP = ["--height", "32", "--width", "32", "--frames", "5", "--fps", "16", "--log_every", "1", "--warmup_steps", "1",
        "--global_batch", "4", "--micro_batch", "2", "--dtype", "bf16", "--lr", "1e-3"]


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    return checks.official_folder(tmp_path_factory, "Wan2.1-T2V-tiny", make_official_folder)


wan = script_runner("train_wan.py")


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
    t, meta = checks.check_cache(wan, common, folder["cache"])
    assert t["latents"].shape == (16, 2, 4, 4) and t["text"].shape[1] == 32 and t["text"].shape[0] <= 12

    # full fine-tune, 4 steps with a checkpoint at 2; then the same run to 6 with --resume 1
    out = tmp_path / "full"
    checks.check_train_from_cache(wan, common, out)
    sd = W.read_dit_checkpoint(str(out / "model.safetensors"))[1]
    assert "blocks.0.self_attn.q.weight" in sd and sd["blocks.0.self_attn.q.weight"].dtype == torch.bfloat16
    # resumed to 6; the step-4 sample was decoded by the VAE: 5 frames of 32x32
    checks.check_resume_to_6(wan, common, out, 5)

    # LoRA on the fine-tuned DiT, bf16 base
    lora = tmp_path / "lora"
    checks.check_lora_on_export(wan, common, lora, str(out / "model.safetensors"), W.read_lora)

    # --mode sample with and without the LoRA: the LoRA must change the video
    s = checks.sample_flags(["--ckpt_dir", folder["ckpt"]], str(out / "model.safetensors"), folder["cache"], 5)
    checks.check_lora_changes_the_sample(wan, s, tmp_path, lora / "lora.safetensors", 5, 16)

    # --init_lora / --base_lora with that LoRA, on the same base
    checks.check_init_and_base_lora(wan, [*common, "--dit_path", str(out / "model.safetensors")], tmp_path,
                                    lora / "lora.safetensors", W.read_lora)


def test_bench_in_bf16(folder):
    checks.check_bench_in_bf16(wan, folder["ckpt"], CLIP, 2 * 8)


@pytest.mark.parametrize("flags, says", [
    (["--height", "30"], "--height 30 --width 32: both must be positive multiples of 16"),
    (["--lora_rank", "-1"], "--lora_rank -1 must be >= 0"),
    (["--ac", "3"], "--ac 3: expected 0, 1 (checkpoint every block) or 2"),
    (["--preset", "7B"], "--preset '7B': expected one of 1.3B, 14B, tiny, toy"),
    (["--preset", "1.3B", "--ckpt_dir", ""], "--mode train needs --ckpt_dir"),
    (["--frames", "6"], "--frames 6: must be 1 + 4k"),
    (["--mode", "sample", "--preset", "toy", "--sample_prompts", "a", "--ckpt_dir", ""], "--mode sample needs trained weights"),
    (["--global_batch", "3"], "--global_batch 3 must be a multiple of --micro_batch x processes = 2 x 1"),
    (["--sp", "0"], "--sp 0 must be >= 1"),
    (["--sp", "2"], "--sp 2 must divide the number of processes (1)"),
])
def test_user_errors_are_one_line_before_any_work(folder, tmp_path, flags, says):
    base = ["--ckpt_dir", folder["ckpt"], "--data", folder["data"], "--out_dir", str(tmp_path / "o"), *CLIP]
    checks.check_user_error(wan, [*base, *flags], says, tmp_path / "o")
