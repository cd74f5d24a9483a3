"""train_wan.py's memory flags on the tiny Wan DiT in bf16 on CPU: --offload 1 gives bitwise the loss and the
adapters' gradients of the plain model (through build_dit, the code main() runs) and the same log through main();
--base_dtype float8 stays within float8's tolerance; a LoRA run through main() trains with each flag (and both);
Wan 2.2 A14B: both experts get them, and a resumed run with both flags continues exactly; the flags are refused, in
one line, where they do not apply. The procedure: tests/checks.py (every script's); the mechanisms
themselves: tests/test_common_memory.py."""
import os

import pytest
import torch

import train_wan as W
from common.log import read_log
from tests import checks
from tests.helpers import make_official_folder, tiny_dit
from tests.procs import script_runner
from tests.test_wan22_a14b import ROUTE, make_a14b

# 32x32 pixels, 5 frames at 16 fps -> latents 16 x 2 x 4 x 4 -> 8 tokens (tests/test_wan_main.py's clip)
CLIP = ["--height", "32", "--width", "32", "--frames", "5", "--fps", "16", "--log_every", "1", "--warmup_steps", "1",
        "--global_batch", "2", "--micro_batch", "1", "--dtype", "bf16"]
LORA = ["--lora_rank", "4", "--lr", "5e-2", "--ac", "1", "--timestep_sampling", "uniform"]
FLOAT8 = "float8 base: 20 frozen Linear"  # the tiny DiT's 2 blocks x 10; an A14B prints it once per expert

wan = script_runner("train_wan.py")


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    return checks.memory_folder(tmp_path_factory, wan, "Wan2.1-T2V-tiny", make_official_folder, CLIP)


@pytest.fixture(scope="module")
def a14b(tmp_path_factory):
    return checks.memory_folder(tmp_path_factory, wan, "Wan2.2-T2V-A14B-tiny", make_a14b, CLIP)


# ---------------------------------------------------------------------------------------------- the model API

def loss(model, args, x0, eps, t, g):
    return W.flow_loss(model, x0, torch.randn(2, 6, W.DIT_PRESETS["tiny"].text_dim, generator=g), t, eps)


@pytest.fixture(scope="module")
def weights():
    sd = {k: v.to(torch.bfloat16) for k, v in tiny_dit().state_dict().items()}  # a LoRA's base: read in bf16
    return checks.memory_weights(W, W.WanModel, sd)


def test_offload_is_bitwise_and_float8_within_tolerance_through_build_dit(weights):
    """float8 against the plain bf16 model, measured: the loss moves by 1.4e-4 relative, all the adapters'
    gradients together by 3.9%, the worst single adapter by 7.8%. Pinned at about 2x: 3e-4, 0.08 and 0.16. Both
    flags with --ac 2 (the 81-frame recipe) too give bitwise float8 alone."""
    checks.check_offload_bitwise_and_float8_within_tolerance(W, loss, weights, (16, 2, 4, 4), 2 * 2 * 10,
                                                             3e-4, 0.08, 0.16, {"ac": 2})


# ---------------------------------------------------------------------------------------------- main()

# slow: 40 main() steps, and the resume below; the default run keeps both procedures through HunyuanVideo's
# tests, this script's main() with both flags (the bench tests) and each flag alone through build_dit (above)
@pytest.mark.slow
def test_lora_runs_through_main_with_each_flag(folder, tmp_path):
    """10 steps of LoRA on the tiny official-layout folder in bf16, plain and with each flag: --offload 1 logs the
    plain run's losses and gradient norms exactly (also with float8); float8 within 2% of the plain losses; the
    loss falls in every run."""
    checks.check_lora_runs_through_main_with_each_flag(wan, checks.lora_flags(folder, CLIP, LORA), tmp_path, FLOAT8)


# slow: see above; HunyuanVideo's resume with both flags stays in the default run
@pytest.mark.slow
def test_a14b_resume_with_both_flags_continues_exactly(a14b, tmp_path):
    """Wan 2.2 A14B, both experts (routed by step, boundary 0.5): each expert's blocks get the float8 base and the
    streamer (two lines each); 2 steps + a checkpoint, then on to 4 with --resume 1, equal the uninterrupted 4 steps
    (the checkpoint holds the adapters and AdamW only; the float8 base is made again from --ckpt_dir); both experts
    trained; and --offload 1 alone logs what the plain run logs."""
    common = [*checks.lora_flags(a14b, CLIP, LORA), *ROUTE]
    p, logs = checks.check_resume_with_both_flags_continues_exactly(wan, common, tmp_path, ("loss", "grad_norm",
                                                                                           "expert"))
    assert p.stdout.count(FLOAT8) == 2 and p.stdout.count("offload: ") == 2, p.stdout[-2000:]
    assert {r[2] for r in logs[0]} == {"high", "low"}, logs
    for d in ("whole", "resumed"):
        assert sorted(f for f in os.listdir(tmp_path / d) if f.endswith(".safetensors")) == [
            "lora_high_noise.safetensors", "lora_low_noise.safetensors"]
    for name, flags in (("plain", []), ("offload", ["--offload", "1"])):
        wan(*common, "--ckpt_every", "2", *flags, "--max_steps", "4", "--out_dir", str(tmp_path / name))
    plain, off = ([(r["loss"], r["grad_norm"]) for r in read_log(tmp_path / d) if "loss" in r] for d in ("plain",
                                                                                                         "offload"))
    assert plain == off and len(plain) == 4


@pytest.mark.parametrize("weights_from", ["ckpt_dir", "random"])  # random: the 14B benches' path, at tiny size
def test_bench_with_both_flags(folder, weights_from):
    src = folder["model"] if weights_from == "ckpt_dir" else ["--preset", "tiny"]
    checks.check_bench_with_both_flags(wan, src, CLIP, FLOAT8)


@pytest.mark.parametrize("flags, says", [
    *checks.MEMORY_USER_ERRORS,
    (["--mode", "sample", "--sample_prompts", "a", "--offload", "1"], "--offload 1 is for LoRA training (--mode train "
     "or bench); --mode sample runs without it"),
])
def test_user_errors(folder, tmp_path, flags, says):
    checks.check_memory_user_error(wan, folder, CLIP, flags, says, tmp_path)


def test_refused_with_two_processes(folder, tmp_path):
    checks.check_refused_with_two_processes(wan, checks.lora_flags(folder, CLIP, LORA), tmp_path)
