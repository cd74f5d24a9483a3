"""train_hunyuan.py as a user runs it (subprocesses, the toy preset): the loss falls on 1 and 2 processes and the
two agree in losses AND gradient norms, LoRA trains only the adapters, an interrupted run resumes exactly (also on
another number of processes), compile + activation checkpointing keep the math, the validation loss is fixed,
--mode sample applies a LoRA with true CFG, --sp 2 on 2 processes equals 1 process."""
import pytest

from tests import checks
from tests.procs import toy_runner

run = toy_runner("train_hunyuan.py")


def test_one_and_two_processes_agree_and_loss_falls(toy, tmp_path):
    """Global 8, micro 4: one process accumulates 2 micro-batches, two processes none; losses and gradient norms
    agree per step (a wrong accumulation scale would show in the gradient norm)."""
    checks.check_one_and_two_processes_agree(run, toy, tmp_path, "--timestep_sampling", "uniform", falls=0.95)


# slow: the default run keeps Wan's (the same LoRA layers' freezing in every script's build_dit)
@pytest.mark.slow
def test_lora_trains_only_the_adapters(toy, tmp_path):
    # the from-scratch init zeroes every modulation (each block starts as the identity): fine-tune a briefly
    # trained toy DiT, loaded back from its own export
    sd = checks.check_lora_trains_only_the_adapters(run, toy, tmp_path, "--lr", "1e-2")
    assert all(k.startswith(("diffusion_model.double_blocks.", "diffusion_model.single_blocks."))
               and (".lora_A." in k or ".lora_B." in k) for k in sd), list(sd)[:5]


def test_interrupted_run_resumes_exactly(toy, tmp_path):
    """SIGTERM in the middle of an accumulated step (8 micro-batches a step): the step in flight is dropped, the last
    whole step is checkpointed (EMA included), and --resume 1 continues bit for bit as the uninterrupted run."""
    checks.check_interrupted_run_resumes_exactly(run, toy, tmp_path)


# slow (55 s on CI): the default run keeps Wan's compile test (tests/test_wan_train.py: --compile 1 --ac 2
# --ac_interval 2, the same common/fsdp.py wrapping, here over two block lists)
@pytest.mark.slow
def test_compile_and_activation_checkpointing_keep_the_math_and_the_keys(toy, tmp_path):
    """--compile 1 --ac 1 (both block lists wrapped, compiled and sharded) give the plain run's losses, and the
    exported keys carry no wrapper names."""
    keys = checks.check_compile_and_ac_keep_the_math(run, toy, tmp_path)
    assert "double_blocks.0.img_attn_qkv.weight" in keys and "single_blocks.1.linear1.weight" in keys


# slow: the default run keeps Wan's (tests/test_wan_train.py), the same DCP resharding
@pytest.mark.slow
def test_resume_across_world_sizes(toy, tmp_path):
    """1 process to step 3, then 2 from there: weights, optimizer and data position carry over, and the losses and
    gradient norms equal an uninterrupted 1-process run."""
    checks.check_resume_across_world_sizes(run, toy, tmp_path, pairs=((1, 2),), steps=5)


def test_sample_mode_with_true_cfg_and_lora(toy, tmp_path):
    """--mode sample on the toy (no guidance embedding: true CFG against the empty prompt, the toy's default) with an
    exported LoRA: an mp4 of the right size and frame count."""
    p = checks.check_sample_mode_with_lora(run, toy, tmp_path, "--sample_guidance", "3", "--sample_negative", "",
                                           base_flags=("--lr", "1e-2"))
    assert "sample ->" in p.stdout


def test_validation_loss_is_fixed_and_logged(toy, tmp_path):
    checks.check_validation_loss_is_fixed(run, toy, tmp_path)  # lr 0: same weights, same clips, sigmas and noise


# slow: the default run keeps Wan's through main() and this model's split against whole (tests/test_hunyuan_sp.py)
@pytest.mark.slow
def test_sequence_parallel_equals_one_process(toy, tmp_path):
    """--sp 2 on 2 processes = 1 process, per step (losses and gradient norms), at 12 x 12 pixels: 3 x 3 patches x 5
    frames = 45 video tokens a clip, odd, so the split pads a token and masks it in the joint attention."""
    checks.check_sequence_parallel_agrees(run, toy, tmp_path, "--timestep_sampling", "uniform", "--height", "12",
                                          "--width", "12")
