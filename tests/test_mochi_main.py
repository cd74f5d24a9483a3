"""The real (non-toy) path of train_mochi.py's main(), in --dtype bf16 on CPU, through a tiny test-made folder in the
genmo/mochi-1-preview layout (dit.safetensors, encoder.safetensors, decoder.safetensors, text_encoder/ +
tokenizer/): the VAE encoder and T5 fill the cache (--mode cache), a full fine-tune trains and resumes, samples
decode through the VAE decoder, a LoRA trains on the export and changes --mode sample's video, bench runs in bf16.
Plus the flag checks: one clear line and exit code 2, before any work."""
import json
import os

import pytest
import torch
from safetensors.torch import save_file

import train_mochi as M
from tests.procs import run_script
from tests.test_mochi_vae import golden_weight

# 32x32 pixels, 7 frames at 30 fps -> latents 12 x 2 x 4 x 4 -> 8 tokens
CLIP = ["--height", "32", "--width", "32", "--frames", "7", "--fps", "30", "--log_every", "1", "--warmup_steps", "1",
        "--global_batch", "4", "--micro_batch", "2", "--dtype", "bf16", "--lr", "1e-3"]
TINY_DIT = M.MochiConfig(dim_x=64, dim_y=32, num_heads=2, depth=2, ffn_x=128, ffn_y=64, t5_dim=32)
TINY_T5 = dict(dim=32, d_kv=8, num_heads=4, d_ff=64, num_layers=2)


def _randomise(model, seed):
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("norm.weight") or "norm_" in name or "layer_norm" in name:
                p.copy_(1 + 0.1 * torch.randn(p.shape, generator=g))
            elif p.dim() == 1:
                p.copy_(0.05 * torch.randn(p.shape, generator=g))
            else:
                p.copy_(torch.randn(p.shape, generator=g) * (0.5 * p[0].numel() ** -0.5))
    return model


def make_official_folder(root, seed=0):
    """dit.safetensors, encoder.safetensors, decoder.safetensors, text_encoder/model.safetensors and
    tokenizer/tokenizer.json (a word-level T5-style vocabulary: pad 0, eos 1, unk 2), all tiny and random."""
    import tokenizers
    from data.toy import BACKGROUNDS, COLORS, DIRECTIONS, SHAPES
    os.makedirs(os.path.join(root, "tokenizer"), exist_ok=True)
    os.makedirs(os.path.join(root, "text_encoder"), exist_ok=True)
    words = sorted({*COLORS, *SHAPES, *DIRECTIONS, *BACKGROUNDS, "a", "moving", "on", "background"})
    vocab = {"<pad>": 0, "</s>": 1, "<unk>": 2, **{w: i + 3 for i, w in enumerate(words)}}
    tok = tokenizers.Tokenizer(tokenizers.models.WordLevel(vocab, unk_token="<unk>"))
    tok.normalizer = tokenizers.normalizers.Lowercase()
    tok.pre_tokenizer = tokenizers.pre_tokenizers.Whitespace()
    tok.save(os.path.join(root, "tokenizer", "tokenizer.json"))
    t5 = _randomise(M.T5Encoder(M.T5Config(vocab=len(vocab) + 5, **TINY_T5)), seed)
    save_file({k: v.contiguous() for k, v in t5.state_dict().items()}, os.path.join(root, "text_encoder",
                                                                                    "model.safetensors"))
    vae = M.MochiVAE(M.VAE_PRESETS["tiny"])
    with torch.no_grad():
        for name, p in vae.named_parameters():
            p.copy_(golden_weight(name, p.shape))
    save_file({k: v.contiguous() for k, v in vae.encoder.state_dict().items()}, os.path.join(root, M.ENCODER_FILE))
    save_file({k: v.contiguous() for k, v in vae.decoder.state_dict().items()}, os.path.join(root, M.DECODER_FILE))
    dit = _randomise(M.AsymmDiT(TINY_DIT), seed + 2)
    save_file({k: v.contiguous() for k, v in dit.state_dict().items()}, os.path.join(root, M.DIT_FILE))
    return root


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    from data.toy import make_toy_dataset
    d = tmp_path_factory.mktemp("official")
    make_official_folder(str(d / "mochi-1-preview-tiny"))
    make_toy_dataset(str(d / "clips"), n=8, size=32, frames=9)
    return {"ckpt": str(d / "mochi-1-preview-tiny"), "data": str(d / "clips"), "cache": str(d / "cache")}


def mochi(*flags, check=True):
    return run_script("train_mochi.py", flags, check=check)


def test_the_loaders_read_the_sizes_off_the_files(folder):
    dit = M.load_dit(folder["ckpt"])
    assert dit.cfg == TINY_DIT
    assert M.load_vae(folder["ckpt"]).cfg == M.VAE_PRESETS["tiny"]
    te = M.load_text_encoder(folder["ckpt"])
    y, mask = te.encode(["a red circle moving left", ""])
    assert y.shape == (2, 256, 32) and mask[0].sum() == 6 and not mask[1].any()  # 5 words + EOS; "" -> nothing


def test_cache_train_resume_sample_export_lora_in_bf16(folder, tmp_path):
    common = ["--ckpt_dir", folder["ckpt"], "--data", folder["data"], "--cache_dir", folder["cache"], *CLIP]
    p = mochi("--mode", "cache", *common)
    files = [f for f in os.listdir(folder["cache"]) if f.endswith(".safetensors")]
    assert len(files) == 8, (files, p.stdout[-2000:])
    from data.cache import load_entry
    t, _ = load_entry(os.path.join(folder["cache"], files[0]))
    assert t["latents"].shape == (12, 2, 4, 4) and t["text"].shape[1] == 32 and 2 <= t["text"].shape[0] <= 12

    out = tmp_path / "full"
    p = mochi(*common, "--out_dir", str(out), "--max_steps", "4", "--ckpt_every", "2", "--sample_prompts",
              "a red circle moving left", "--sample_steps", "2")
    assert "0 encoded" not in p.stdout  # everything came from the cache
    from common.log import read_log
    log = [r for r in read_log(out) if "loss" in r]
    assert [r["step"] for r in log] == [1, 2, 3, 4] and all(r["loss"] == r["loss"] and r["grad_norm"] > 0 for r in log)
    cfg, sd = M.read_dit_checkpoint(str(out / "model.safetensors"))
    assert cfg == TINY_DIT and sd["blocks.0.attn.qkv_x.weight"].dtype == torch.bfloat16
    assert sd["pos_frequencies"].dtype == torch.float32 and sd["blocks.0.attn.q_norm_x.weight"].dtype == torch.float32
    mochi(*common, "--out_dir", str(out), "--max_steps", "6", "--ckpt_every", "2", "--resume", "1")
    assert [r["step"] for r in read_log(out) if "loss" in r] == [1, 2, 3, 4, 5, 6]
    from data.video import probe
    info = probe(str(out / "samples" / "step_00000004_0.mp4"))
    assert (info["frames"], info["height"], info["width"]) == (7, 32, 32)

    lora = tmp_path / "lora"
    mochi(*common, "--out_dir", str(lora), "--max_steps", "3", "--lora_rank", "4", "--lr", "5e-2",
          "--dit_path", str(out / "model.safetensors"))
    lsd, rank, _ = M.read_lora(str(lora / "lora.safetensors"))
    assert rank == 4 and max(v.abs().max().item() for k, v in lsd.items() if ".lora_B." in k) > 0

    s = ["--mode", "sample", "--ckpt_dir", folder["ckpt"], "--dit_path", str(out / "model.safetensors"),
         "--sample_prompts", "a blue square moving up", "--sample_steps", "3", "--height", "32", "--width", "32",
         "--frames", "7", "--dtype", "bf16", "--cache_dir", folder["cache"]]
    mochi(*s, "--out_dir", str(tmp_path / "s0"))
    mochi(*s, "--out_dir", str(tmp_path / "s1"), "--lora", str(lora / "lora.safetensors"))
    from data.video import read_clip
    a = read_clip(str(tmp_path / "s0" / "samples" / "step_00000000_0.mp4"), 0, 7, 30, (32, 32))
    b = read_clip(str(tmp_path / "s1" / "samples" / "step_00000000_0.mp4"), 0, 7, 30, (32, 32))
    assert (a - b).abs().mean() > 0.01, (a - b).abs().mean()
    assert not os.path.exists(tmp_path / "s0" / "args.json")


def test_bench_in_bf16(folder):
    for extra in ([], ["--lora_rank", "4"]):
        p = mochi("--mode", "bench", "--ckpt_dir", folder["ckpt"], *CLIP, "--bench_steps", "1", *extra)
        res = json.loads([line for line in p.stdout.splitlines() if line.startswith("{")][-1])
        assert res["dtype"] == "torch.bfloat16" and res["step_s"] > 0 and res["loss"] == res["loss"]
        assert res["tokens"] == 2 * 8


@pytest.mark.parametrize("flags, says", [
    (["--height", "30"], "--height 30 --width 32: both must be positive multiples of 16"),
    (["--lora_rank", "-1"], "--lora_rank -1 must be >= 0"),
    (["--preset", "7B"], "--preset '7B': expected one of 10B, tiny, toy"),
    (["--preset", "10B", "--ckpt_dir", ""], "--mode train needs --ckpt_dir"),
    (["--frames", "5"], "--frames 5: must be 1 + 6k"),
    (["--global_batch", "3"], "--global_batch 3 must be a multiple of --micro_batch x processes = 2 x 1"),
])
def test_user_errors_are_one_line_before_any_work(folder, tmp_path, flags, says):
    base = ["--ckpt_dir", folder["ckpt"], "--data", folder["data"], "--out_dir", str(tmp_path / "o"), *CLIP]
    p = mochi(*base, *flags, check=False)
    assert p.returncode == 2, (p.stdout, p.stderr)
    lines = p.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: ") and says in lines[0], p.stderr
    assert "Traceback" not in p.stderr and not os.path.exists(tmp_path / "o")
