"""train_hunyuan.py's memory flags on the tiny HunyuanVideo in bf16 on CPU: --offload 1 gives bitwise the loss and
the adapters' gradients of the plain model (through build_dit, the code main() runs) and the same log through main();
--base_dtype float8 stays within float8's tolerance; a LoRA run through main() trains with each flag (and both);
the flags are refused, in one line, where they do not apply. The procedure: tests/checks.py (every script's); the
mechanisms themselves: tests/test_common_memory.py."""
import pytest
import torch

import train_hunyuan as H
from tests import checks
from tests.procs import script_runner
from tests.test_hunyuan_dit import tiny_dit
from tests.test_hunyuan_main import CLIP, make_official_folder

LORA = ["--lora_rank", "4", "--lr", "5e-2", "--ac", "1", "--timestep_sampling", "uniform"]

hy = script_runner("train_hunyuan.py")


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    return checks.memory_folder(tmp_path_factory, hy, "ckpts", make_official_folder, CLIP)


# ---------------------------------------------------------------------------------------------- the model API

def loss(model, args, x0, eps, t, g):
    """The flow loss on a padded prompt (its mask) and the guidance the run trains with."""
    cfg = H.DIT_PRESETS["tiny"]
    text = (torch.randn(2, 6, cfg.text_states_dim, generator=g), torch.tensor([[1] * 6, [1] * 3 + [0] * 3]),
            torch.randn(2, cfg.text_states_dim_2, generator=g))
    return H.flow_loss(model, x0, text, t, eps, H.train_guidance(model, args, 2, "cpu"))


@pytest.fixture(scope="module")
def weights():
    sd = {k: v.to(torch.bfloat16) for k, v in tiny_dit().state_dict().items()}  # a LoRA's base: read in bf16
    return checks.memory_weights(H, H.HunyuanVideoDiT, sd)


def test_offload_is_bitwise_and_float8_within_tolerance_through_build_dit(weights):
    """float8 against the plain bf16 model, measured: the loss moves by 4e-5 relative (the tiny model's loss is
    mostly the target's own variance), all the adapters' gradients together by 4.4%, the worst single adapter by
    12% (its gradient is small). Pinned at about 2x: 1e-3, 0.1 and 0.25."""
    checks.check_offload_bitwise_and_float8_within_tolerance(H, loss, weights, (16, 2, 4, 4), 2 * (2 * 8 + 2 * 2),
                                                             1e-3, 0.1, 0.25)


# ---------------------------------------------------------------------------------------------- main()

def test_lora_runs_through_main_with_each_flag(folder, tmp_path):
    """10 steps of LoRA on the tiny official-layout folder in bf16, plain and with each flag: --offload 1 logs the
    plain run's losses and gradient norms exactly (also with float8); float8 within 2% of the plain losses; the
    loss falls in every run (the plain run, measured: 1.20 over steps 1-3, 1.06 over steps 8-10)."""
    checks.check_lora_runs_through_main_with_each_flag(hy, checks.lora_flags(folder, CLIP, LORA), tmp_path)


def test_resume_with_both_flags_continues_exactly(folder, tmp_path):
    checks.check_resume_with_both_flags_continues_exactly(hy, checks.lora_flags(folder, CLIP, LORA), tmp_path)


@pytest.mark.parametrize("weights_from", ["ckpt_dir", "random"])  # random: BENCHMARKS.md's 13B rows, at tiny size
def test_bench_with_both_flags(folder, weights_from):
    src = folder["model"] if weights_from == "ckpt_dir" else ["--preset", "tiny"]
    checks.check_bench_with_both_flags(hy, src, CLIP, "float8 base: 26 frozen Linear")


@pytest.mark.parametrize("flags, says", checks.MEMORY_USER_ERRORS)
def test_user_errors(folder, tmp_path, flags, says):
    checks.check_memory_user_error(hy, folder, CLIP, flags, says, tmp_path)


# slow: the default run keeps Wan's (common/memory.check_world, the same check in every script)
@pytest.mark.slow
def test_refused_with_two_processes(folder, tmp_path):
    checks.check_refused_with_two_processes(hy, checks.lora_flags(folder, CLIP, LORA), tmp_path)
