"""The real (non-toy) path of train_mochi.py's main(), in --dtype bf16 on CPU, through a tiny test-made folder in the
genmo/mochi-1-preview layout (dit.safetensors, encoder.safetensors, decoder.safetensors, text_encoder/ +
tokenizer/): the VAE encoder and T5 fill the cache (--mode cache), a full fine-tune trains and resumes, samples
decode through the VAE decoder, a LoRA trains on the export and changes --mode sample's video, bench runs in bf16.
Plus the flag checks: one clear line and exit code 2, before any work."""
import os

import pytest
import torch
from safetensors.torch import save_file

import train_mochi as M
from common import lora_file
from tests import checks
from tests.procs import script_runner
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
    return checks.official_folder(tmp_path_factory, "mochi-1-preview-tiny", make_official_folder)


mochi = script_runner("train_mochi.py")


def test_the_loaders_read_the_sizes_off_the_files(folder):
    dit = M.load_dit(folder["ckpt"])
    assert dit.cfg == TINY_DIT
    assert M.load_vae(folder["ckpt"]).cfg == M.VAE_PRESETS["tiny"]
    te = M.load_text_encoder(folder["ckpt"])
    y, mask = te.encode(["a red circle moving left", ""])
    assert y.shape == (2, 256, 32) and mask[0].sum() == 6 and not mask[1].any()  # 5 words + EOS; "" -> nothing


def test_cache_train_resume_sample_export_lora_in_bf16(folder, tmp_path):
    common = ["--ckpt_dir", folder["ckpt"], "--data", folder["data"], "--cache_dir", folder["cache"], *CLIP]
    t, _ = checks.check_cache(mochi, common, folder["cache"])
    assert t["latents"].shape == (12, 2, 4, 4) and t["text"].shape[1] == 32 and 2 <= t["text"].shape[0] <= 12

    out = tmp_path / "full"
    checks.check_train_from_cache(mochi, common, out)
    cfg, sd = M.read_dit_checkpoint(str(out / "model.safetensors"))
    assert cfg == TINY_DIT and sd["blocks.0.attn.qkv_x.weight"].dtype == torch.bfloat16
    assert sd["pos_frequencies"].dtype == torch.float32 and sd["blocks.0.attn.q_norm_x.weight"].dtype == torch.float32
    checks.check_resume_to_6(mochi, common, out, 7)

    lora = tmp_path / "lora"
    checks.check_lora_on_export(mochi, common, lora, str(out / "model.safetensors"), M.read_lora)

    s = checks.sample_flags(["--ckpt_dir", folder["ckpt"]], str(out / "model.safetensors"), folder["cache"], 7)
    checks.check_lora_changes_the_sample(mochi, s, tmp_path, lora / "lora.safetensors", 7, 30)

    # --init_lora / --base_lora with that LoRA, on the same base
    checks.check_init_and_base_lora(mochi, [*common, "--dit_path", str(out / "model.safetensors")], tmp_path,
                                    lora / "lora.safetensors", M.read_lora)


def test_bench_in_bf16(folder):
    checks.check_bench_in_bf16(mochi, folder["ckpt"], CLIP, 2 * 8)


@pytest.mark.parametrize("flags, says", [
    (["--height", "30"], "--height 30 --width 32: both must be positive multiples of 16"),
    (["--lora_rank", "-1"], "--lora_rank -1 must be >= 0"),
    (["--preset", "7B"], "--preset '7B': expected one of 10B, tiny, toy"),
    (["--preset", "10B", "--ckpt_dir", ""], "--mode train needs --ckpt_dir"),
    (["--frames", "5"], "--frames 5: must be 1 + 6k"),
    (["--global_batch", "3"], "--global_batch 3 must be a multiple of --micro_batch x processes = 2 x 1"),
    (["--sp", "0"], "--sp 0 must be >= 1"),
    (["--sp", "2"], "--sp 2 must divide the number of processes (1)"),
    (["--timestep_sampling", "shift"], "--timestep_sampling shift with --shift 1 is plain uniform: give --shift N "
     "(musubi's `shift` is --timestep_sampling logit_normal --shift N here)"),
    (["--mode", "sample", "--init_lora", "LORA", "--sample_prompts", "a"], "--init_lora starts a training run's "
     "adapter from a file; to sample with one use --lora"),
    (["--init_lora", "LORA", "--lora_rank", "8"], "rank 4, alpha 4.0, targets attn.proj_x,attn.proj_y,attn.qkv_x,"
     "attn.qkv_y; leave --lora_rank, --lora_alpha and --lora_targets out or give the file's"),
    (["--base_lora", "x=LORA"], "x= names a part of the model: this model has no parts"),
    (["--base_lora", "LORA", "--mode", "bench"], "--base_lora merges a LoRA into the base of a training or sampling "
     "run"),
    (["--base_lora", "nowhere.safetensors:0.5"], "--base_lora nowhere.safetensors: no such file"),
    (["--ckpt_dir", "", "--preset", "tiny", "--init_lora", "LORA"], "--init_lora and --base_lora need base weights"),
    (["--mode", "sample", "--sample_prompts", "a", "--lora", "BAD.pt"], "BAD.pt: not a readable LoRA .pt file"),
    (["--init_lora", "BAD.safetensors"], "BAD.safetensors: not a readable .safetensors file"),
])
def test_user_errors_are_one_line_before_any_work(folder, tmp_path, flags, says):
    base = ["--ckpt_dir", folder["ckpt"], "--data", folder["data"], "--out_dir", str(tmp_path / "o"), *CLIP]
    lora = str(tmp_path / "lora.safetensors")  # LORA in the flags: a rank-4 LoRA file of the tiny DiT
    model = M.add_lora(M.AsymmDiT(TINY_DIT), 4, 4)
    lora_file.write_lora(lora, M.lora_init_state(model, 0), 4)
    for ext in ("pt", "safetensors"):  # BAD.*: garbage, as a download cut short
        (tmp_path / f"BAD.{ext}").write_bytes(b"garbage")
    flags = [f.replace("LORA", lora).replace("BAD.", str(tmp_path / "BAD.")) for f in flags]
    checks.check_user_error(mochi, [*base, *flags], says, tmp_path / "o")


def test_shift_sampling_with_a_shift_passes_the_checks():
    from common.args import parse
    M.check_args(parse(M.Args, ["--mode", "bench", "--preset", "tiny", "--timestep_sampling", "shift", "--shift", "3"]))


def test_other_layouts_are_one_line_before_any_work(folder, tmp_path):
    """A DiT file that is not Mochi's, a diffusers-format DiT file without its folder, a folder without the DiT
    (--dit_path / --ckpt_dir), or a diffusers-format LoRA (--lora) stops in check_args, before the process group
    or any work: one line naming the reason, exit 2, no run folder."""
    out = tmp_path / "o"
    save_file({"blocks.0.self_attn.q.weight": torch.zeros(2, 2)}, str(tmp_path / "wan.safetensors"))
    save_file({"transformer_blocks.0.attn1.to_q.weight": torch.zeros(2, 2)}, str(tmp_path / "diffusers.safetensors"))
    save_file({"transformer.transformer_blocks.0.attn1.to_q.lora_A.weight": torch.zeros(4, 64),
               "transformer.transformer_blocks.0.attn1.to_q.lora_B.weight": torch.zeros(64, 4)},
              str(tmp_path / "lora.safetensors"))
    bench = ["--mode", "bench", "--out_dir", out]
    checks.check_user_error(mochi, [*bench, "--dit_path", tmp_path / "wan.safetensors"], "not a Mochi DiT", out)
    checks.check_user_error(mochi, [*bench, "--dit_path", tmp_path / "diffusers.safetensors"],
                            "diffusers-format MochiTransformer3DModel weights without their config.json", out)
    checks.check_user_error(mochi, [*bench, "--ckpt_dir", tmp_path], "expected a folder with dit.safetensors", out)
    checks.check_user_error(mochi, ["--mode", "sample", "--ckpt_dir", folder["ckpt"], "--lora",
                                    tmp_path / "lora.safetensors", "--sample_prompts", "a", "--out_dir", out],
                            "diffusers-format LoRA (transformer_blocks.N.attn1.to_q...): not supported", out)
