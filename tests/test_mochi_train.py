"""train_mochi.py as a user runs it (subprocesses, the toy preset): the loss falls on 1 and 2 processes and the two
agree (losses AND gradient norms), LoRA trains only the adapters, an interrupted run resumes exactly, the run folder
is never another run's, the validation loss is fixed, --mode sample applies a LoRA, --mode bench runs."""
import pytest

from tests import checks
from tests.procs import toy_runner

run = toy_runner("train_mochi.py")


def test_one_and_two_processes_agree_and_loss_falls(toy, tmp_path):
    """Same samples, noise, sigmas and caption dropout on 1 and 2 processes: losses and gradient norms agree per
    step (one process accumulates 2 micro-batches, two none: a wrong accumulation scale shows in the norm)."""
    checks.check_one_and_two_processes_agree(run, toy, tmp_path, "--caption_dropout", "0.3")


# slow: the default run keeps Wan's (the same LoRA layers' freezing in every script's build_dit)
@pytest.mark.slow
def test_lora_trains_only_the_adapters(toy, tmp_path):
    sd = checks.check_lora_trains_only_the_adapters(run, toy, tmp_path)
    assert all(k.startswith("diffusion_model.blocks.") for k in sd)
    mods = {k.rsplit(".lora_", 1)[0].rsplit(".alpha", 1)[0].split(".", 3)[3] for k in sd}
    assert mods == {"attn.qkv_x", "attn.qkv_y", "attn.proj_x", "attn.proj_y"}


def test_interrupted_run_resumes_exactly(toy, tmp_path):
    """SIGTERM in the middle of an accumulated step: the step in flight is dropped, the last whole step is
    checkpointed (EMA included), and --resume 1 continues bit for bit as the uninterrupted run."""
    checks.check_interrupted_run_resumes_exactly(run, toy, tmp_path)


# slow: the default run keeps Wan's run-folder test (common/run.py) and validation tests
@pytest.mark.slow
def test_run_folder_is_never_another_runs_and_validation_is_fixed(toy, tmp_path):
    checks.check_run_folder_is_never_another_runs(run, toy, tmp_path, ["--seed", "1"], ["seed was 0, now 1"])
    checks.check_validation_loss_is_fixed(run, toy, tmp_path)  # lr 0: fixed clips, sigmas and noise, same number


# slow: the default run samples with and without a LoRA in tests/test_mochi_main.py, and benches there too
@pytest.mark.slow
def test_sample_mode_with_lora_and_bench(toy, tmp_path):
    checks.check_sample_mode_with_lora(run, toy, tmp_path)
    checks.check_bench(run, toy, tmp_path / "b")


# slow (inductor's CPU compile): the default run keeps Wan's (--ac 2 --ac_interval 2), the same parallelize path
@pytest.mark.slow
def test_compile_and_activation_checkpointing_keep_the_math_and_the_keys(toy, tmp_path):
    """--compile 1 --ac 1 give the same losses as the plain run, and the exported keys carry no wrapper names."""
    keys = checks.check_compile_and_ac_keep_the_math(run, toy, tmp_path)
    assert "blocks.0.attn.qkv_x.weight" in keys and "blocks.0.attn.q_norm_x.weight" in keys


# slow: the default run keeps Wan's through main() and this model's split against whole (tests/test_mochi_sp.py)
@pytest.mark.slow
def test_sequence_parallel_equals_one_process(toy, tmp_path):
    """--sp 2 on 2 processes = 1 process, per step (losses and gradient norms), at 12 x 12 pixels: 45 tokens a clip,
    odd, so the split pads a token and masks it in the joint attention; caption dropout puts empty prompts (no text
    tokens) beside real ones, so the text keys are masked too."""
    checks.check_sequence_parallel_agrees(run, toy, tmp_path, "--caption_dropout", "0.3", "--height", "12",
                                          "--width", "12")
