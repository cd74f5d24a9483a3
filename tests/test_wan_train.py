"""train_wan.py as a user runs it (subprocesses): the loss falls on 1 and 2 processes, the two agree, LoRA trains
only the adapters, an interrupted run resumes exactly, a crashed checkpoint write is harmless, the toy model learns."""
import os

import pytest

from tests import checks
from tests.procs import losses, run_script, toy_runner
run = toy_runner("train_wan.py")


def test_one_and_two_processes_agree_and_loss_falls(toy, tmp_path):
    """Same samples, noise and sigmas on 1 and 2 processes: the losses AND the gradient norms agree per step. With
    global 8 and micro 4, one process accumulates 2 micro-batches and two processes none, so a wrong accumulation
    scale (the / accum) shows in the gradient norm even where Adam would hide it in the loss."""
    checks.check_one_and_two_processes_agree(run, toy, tmp_path, "--timestep_sampling", "uniform")


def test_toy_preset_runs_under_torchrun_as_it_is(toy, tmp_path):
    """`torchrun --nproc_per_node=2 train_wan.py --preset toy`: its batch flags work on any number of processes."""
    p = run_script("train_wan.py", ["--preset", "toy", "--data", toy["data"], "--cache_dir", toy["cache"],
                                    "--out_dir", tmp_path / "t", "--max_steps", "1", "--sample_prompts", ""], nproc=2)
    assert "batch=16 (micro 8 x 2 ranks x 1 accumulation)" in p.stdout
    assert os.path.exists(tmp_path / "t" / "model.safetensors")


def test_lora_trains_only_the_adapters(toy, tmp_path):
    # a from-scratch toy DiT has a zero head (upstream init), which would block every gradient into the blocks:
    # fine-tune a briefly trained one, loaded back from its own export (official keys + its config in the header)
    sd = checks.check_lora_trains_only_the_adapters(run, toy, tmp_path)
    assert all(k.startswith("diffusion_model.blocks.") for k in sd)


def test_interrupted_run_resumes_exactly(toy, tmp_path):
    """SIGTERM in the middle of an accumulated step (8 micro-batches a step): the step in flight is dropped, the last
    whole step is checkpointed (EMA included), and --resume 1 continues bit for bit as the uninterrupted run."""
    checks.check_interrupted_run_resumes_exactly(run, toy, tmp_path)


# slow: the (replicas, shards) mesh itself is tests/test_common.py's (2 gloo processes), in the default run
@pytest.mark.slow
def test_replicated_shards_agree_and_resume_fully_sharded(toy, tmp_path):
    checks.check_replicated_shards_agree_and_resume(run, toy, tmp_path)


def test_resume_across_world_sizes(toy, tmp_path):
    """1 process to step 3, then 2 from there (and 2 -> 1): weights, optimizer and data position carry over, and the
    losses and gradient norms equal an uninterrupted 1-process run (each step's samples do not depend on the
    number of processes)."""
    checks.check_resume_across_world_sizes(run, toy, tmp_path, pairs=((1, 2), (2, 1)), steps=6)


def test_run_folder_is_never_another_runs(toy, tmp_path):
    """A second run in the same folder is refused; --resume 1 with other settings is refused naming them; --resume 1
    in an empty folder says so and starts fresh."""
    checks.check_run_folder_is_never_another_runs(run, toy, tmp_path, ["--seed", "1", "--global_batch", "4"],
                                                  ["seed was 0, now 1", "global_batch was 8, now 4"])
    p = run(toy, tmp_path / "fresh", "--max_steps", "1", "--resume", "1")
    assert "no checkpoint in" in p.stdout and "starting from step 0" in p.stdout
    assert sorted(losses(tmp_path / "fresh")) == [1]


def test_validation_loss_is_fixed_and_logged(toy, tmp_path):
    # two runs: same clips, sigmas and noise every time; lr 0: the weights did not move, so the fixed-noise
    # validation loss cannot either
    checks.check_validation_loss_is_fixed(run, toy, tmp_path, runs=2)


# slow: the default run samples with and without a LoRA in tests/test_wan_main.py, and benches there too
@pytest.mark.slow
def test_sample_mode_with_lora_and_bench(toy, tmp_path):
    """--mode sample applies an exported LoRA and writes an mp4 that decodes to the right size and frame count;
    --mode bench prints its figures."""
    checks.check_sample_mode_with_lora(run, toy, tmp_path, "--sample_solver", "unipc")
    checks.check_bench(run, toy, tmp_path / "b", tokens_per_frame=2 * 2)  # the toy DiT's 8x8 patches


def test_compile_and_activation_checkpointing_keep_the_math_and_the_keys(toy, tmp_path):
    """--compile 1 --ac 2 --ac_interval 2 (blocks 0 and 2 checkpointed, their inputs parked, 1 and 3 keeping their
    activations: both ways of compiling a block) give the same losses as the plain run, and the exported keys carry
    no wrapper names."""
    keys = checks.check_compile_and_ac_keep_the_math(run, toy, tmp_path, "--ac_interval", "2")
    assert "blocks.0.self_attn.q.weight" in keys


def test_sequence_parallel_equals_one_process(toy, tmp_path):
    """--sp 2 on 2 processes = 1 process, per step (losses and gradient norms), at 24 x 24 pixels: 45 tokens a clip,
    odd, so the split pads a token and masks it in attention."""
    checks.check_sequence_parallel_agrees(run, toy, tmp_path, "--timestep_sampling", "uniform", "--height", "24",
                                          "--width", "24")
