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
from tests import checks
from tests.procs import script_runner
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
    return checks.official_folder(tmp_path_factory, "ckpts", make_official_folder)


hy = script_runner("train_hunyuan.py")


def test_cache_train_resume_sample_export_lora_in_bf16(folder, tmp_path):
    common = ["--ckpt_dir", folder["ckpt"], "--data", folder["data"], "--cache_dir", folder["cache"], *CLIP]
    t, meta = checks.check_cache(hy, common, folder["cache"])
    # 16 latent channels, 2 latent frames of 4x4; the caption's valid Llama tokens (its words + <|eot_id|>), CLIP pooled
    assert t["latents"].shape == (16, 2, 4, 4) and t["text.pooled"].shape == (24,)
    assert t["text.states"].shape[1] == 32 and t["text.states"].shape[0] == len(meta["caption"].split()) + 1

    # full fine-tune, 4 steps with a checkpoint at 2; then the same run to 6 with --resume 1
    out = tmp_path / "full"
    checks.check_train_from_cache(hy, common, out, "--caption_dropout", "0.5")
    sd = H.read_dit_checkpoint(str(out / "model.safetensors"))[1]
    assert sd["double_blocks.0.img_attn_qkv.weight"].dtype == torch.bfloat16 and "guidance_in.mlp.0.weight" in sd
    checks.check_resume_to_6(hy, common, out, 5, "--caption_dropout", "0.5")  # step-4 sample: 5 frames of 32x32

    # LoRA on the fine-tuned DiT, bf16 base
    lora = tmp_path / "lora"
    lsd = checks.check_lora_on_export(hy, common, lora, str(out / "model.safetensors"), H.read_lora)
    assert all(k.startswith(("double_blocks.", "single_blocks.")) for k in lsd)

    # --mode sample with and without the LoRA: the LoRA must change the video
    s = checks.sample_flags(["--ckpt_dir", folder["ckpt"]], str(out / "model.safetensors"), folder["cache"], 5)
    checks.check_lora_changes_the_sample(hy, s, tmp_path, lora / "lora.safetensors", 5, 24)


def test_bench_in_bf16(folder):
    checks.check_bench_in_bf16(hy, folder["ckpt"], CLIP, 2 * 8)


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
    checks.check_user_error(hy, [*base, *flags], says, tmp_path / "o")
