"""train_wan.py as a user runs it (subprocesses): the loss falls on 1 and 2 processes, the two agree, LoRA trains
only the adapters, an interrupted run resumes exactly, a crashed checkpoint write is harmless, the toy model learns."""
import json
import os
import signal
import subprocess
import time

from common.log import read_log
from tests.procs import ROOT, SMALL, close, env, losses, records, run_script, script_cmd, toy_runner
run = toy_runner("train_wan.py")


def test_one_and_two_processes_agree_and_loss_falls(toy, tmp_path):
    """Same samples, noise and sigmas on 1 and 2 processes: the losses AND the gradient norms agree per step. With
    global 8 and micro 4, one process accumulates 2 micro-batches and two processes none, so a wrong accumulation
    scale (the / accum) shows in the gradient norm even where Adam would hide it in the loss."""
    run(toy, tmp_path / "p1", "--max_steps", "8", "--timestep_sampling", "uniform")
    run(toy, tmp_path / "p2", "--max_steps", "8", "--timestep_sampling", "uniform", nproc=2)
    a, b = records(tmp_path / "p1"), records(tmp_path / "p2")
    assert sorted(a) == sorted(b) == list(range(1, 9))
    for s in range(1, 9):  # equal up to float summation order
        assert close(a[s]["loss"], b[s]["loss"]), (s, a[s], b[s])
        assert close(a[s]["grad_norm"], b[s]["grad_norm"], 1e-3), (s, a[s], b[s])
    assert sum(a[s]["loss"] for s in (7, 8)) < sum(a[s]["loss"] for s in (1, 2)) * 0.9, a


def test_toy_preset_runs_under_torchrun_as_it_is(toy, tmp_path):
    """`torchrun --nproc_per_node=2 train_wan.py --preset toy`: its batch flags work on any number of processes."""
    p = run_script("train_wan.py", ["--preset", "toy", "--data", toy["data"], "--cache_dir", toy["cache"],
                                    "--out_dir", tmp_path / "t", "--max_steps", "1", "--sample_prompts", ""], nproc=2)
    assert "batch=16 (micro 8 x 2 ranks x 1 accumulation)" in p.stdout
    assert os.path.exists(tmp_path / "t" / "model.safetensors")


def test_lora_trains_only_the_adapters(toy, tmp_path):
    from safetensors.torch import load_file
    # a from-scratch toy DiT has a zero head (upstream init), which would block every gradient into the blocks:
    # fine-tune a briefly trained one, loaded back from its own export (official keys + its config in the header)
    run(toy, tmp_path / "base", "--max_steps", "3")
    out = tmp_path / "lora"
    run(toy, out, "--max_steps", "4", "--lora_rank", "4", "--lr", "1e-2", "--ckpt_every", "1", "--keep", "2",
        "--dit_path", str(tmp_path / "base" / "model.safetensors"), "--dtype", "bf16")
    assert sorted(os.listdir(out / "checkpoints")) == ["step_00000003", "step_00000004"]  # --keep 2
    sd = load_file(str(out / "lora.safetensors"))
    assert sd and all(".lora_A." in k or ".lora_B." in k or k.endswith(".alpha") for k in sd), list(sd)[:5]
    assert all(k.startswith("diffusion_model.blocks.") for k in sd)
    # B starts at zero: after training it is not, so the adapters learned
    assert max(v.abs().max().item() for k, v in sd.items() if ".lora_B." in k) > 0
    # the checkpoint holds the trainable tensors only (the frozen base comes from --ckpt_dir on resume)
    import torch.distributed.checkpoint as dcp
    meta = dcp.FileSystemReader(str(out / "checkpoints" / "step_00000004")).read_metadata()
    model_keys = [k for k in meta.state_dict_metadata if k.startswith("model.")]
    assert model_keys and all(".lora_" in k for k in model_keys), model_keys[:5]


def test_interrupted_run_resumes_exactly(toy, tmp_path):
    """SIGTERM in the middle of an accumulated step (8 micro-batches a step): the step in flight is dropped, the last
    whole step is checkpointed (EMA included), and --resume 1 continues bit for bit as the uninterrupted run."""
    flags = ["--micro_batch", "1", "--ema", "0.9", "--ema_export", "1", "--ckpt_every", "100"]
    full, cut = tmp_path / "full", tmp_path / "cut"
    run(toy, full, "--max_steps", "8", *flags)
    cmd = script_cmd("train_wan.py", [*SMALL, "--data", toy["data"], "--cache_dir", toy["cache"], "--out_dir", str(cut),
                                      "--max_steps", "8", *flags])
    p = subprocess.Popen(cmd, cwd=ROOT, env=env(), stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    t0 = time.time()
    while time.time() - t0 < 300 and p.poll() is None:
        if os.path.exists(cut / "log.jsonl") and len(losses(cut)) >= 2:
            break
        time.sleep(0.02)
    p.send_signal(signal.SIGTERM)
    stdout, _ = p.communicate(timeout=300)
    assert p.returncode == 0, stdout[-3000:]
    done = sorted(os.listdir(cut / "checkpoints"))
    assert len(done) == 1 and not done[0].endswith(".tmp"), done
    k = int(done[0].split("_")[1])
    assert 2 <= k < 8, (k, stdout[-2000:])
    assert f"stopped by a signal in step {k + 1} (before micro-batch" in stdout and "of 8)" in stdout, stdout[-2000:]
    # a crash in the middle of a later checkpoint write leaves a .tmp folder behind: it must be ignored
    os.makedirs(cut / "checkpoints" / "step_00000099.tmp")
    (cut / "checkpoints" / "step_00000099.tmp" / "junk").write_text("half a checkpoint")
    run(toy, cut, "--max_steps", "8", "--resume", "1", *flags)
    a, b = losses(full), losses(cut)
    assert sorted(b) == list(range(1, 9))  # log.jsonl reads as one run: the redone steps are not there twice
    for s in range(k + 1, 9):
        assert a[s] == b[s], (s, a[s], b[s])  # exact: same weights, optimizer state, data position and noise
    # the exported EMA weights too: the average was checkpointed and restored
    from safetensors.torch import load_file
    wa, wb = load_file(str(full / "model.safetensors")), load_file(str(cut / "model.safetensors"))
    assert wa.keys() == wb.keys() and all(wa[k].equal(wb[k]) for k in wa)


def test_resume_across_world_sizes(toy, tmp_path):
    """1 process to step 3, then 2 from there (and 2 -> 1): weights, optimizer and data position carry over, and the
    losses and gradient norms equal an uninterrupted 1-process run (each step's samples do not depend on the
    number of processes)."""
    run(toy, tmp_path / "one", "--max_steps", "6")
    a = records(tmp_path / "one")
    for first, then in ((1, 2), (2, 1)):
        out = tmp_path / f"{first}to{then}"
        run(toy, out, "--max_steps", "3", "--ckpt_every", "3", nproc=first)
        run(toy, out, "--max_steps", "6", "--resume", "1", nproc=then)
        b = records(out)
        for s in range(4, 7):
            assert close(a[s]["loss"], b[s]["loss"]) and close(a[s]["grad_norm"], b[s]["grad_norm"], 1e-3), \
                (first, then, s, a[s], b[s])


def test_run_folder_is_never_another_runs(toy, tmp_path):
    """A second run in the same folder is refused; --resume 1 with other settings is refused naming them; --resume 1
    in an empty folder says so and starts fresh."""
    out = tmp_path / "r"
    run(toy, out, "--max_steps", "2", "--ckpt_every", "2")
    p = run(toy, out, "--max_steps", "2", check=False)
    assert p.returncode == 2 and "already holds a run" in p.stderr and "--resume 1" in p.stderr, p.stderr
    p = run(toy, out, "--max_steps", "4", "--resume", "1", "--seed", "1", "--global_batch", "4", check=False)
    assert p.returncode == 2 and "seed was 0, now 1" in p.stderr and "global_batch was 8, now 4" in p.stderr, p.stderr
    assert sorted(os.listdir(out / "checkpoints")) == ["step_00000002"]  # nothing was touched
    p = run(toy, tmp_path / "fresh", "--max_steps", "1", "--resume", "1")
    assert "no checkpoint in" in p.stdout and "starting from step 0" in p.stdout
    assert sorted(losses(tmp_path / "fresh")) == [1]


def test_validation_loss_is_fixed_and_logged(toy, tmp_path):
    run(toy, tmp_path / "v1", "--max_steps", "4", "--val_count", "4", "--val_every", "2", "--lr", "0")
    run(toy, tmp_path / "v2", "--max_steps", "4", "--val_count", "4", "--val_every", "2", "--lr", "0")
    v1 = [r["val_loss"] for r in read_log(tmp_path / "v1") if "val_loss" in r]
    v2 = [r["val_loss"] for r in read_log(tmp_path / "v2") if "val_loss" in r]
    assert len(v1) == 2 and v1 == v2  # same clips, sigmas and noise every time
    assert v1[0] == v1[1]  # lr 0: the weights did not move, so the fixed-noise validation loss cannot either


def test_sample_mode_with_lora_and_bench(toy, tmp_path):
    """--mode sample applies an exported LoRA and writes an mp4 that decodes to the right size and frame count;
    --mode bench prints its figures."""
    import av
    run(toy, tmp_path / "base", "--max_steps", "2")
    run(toy, tmp_path / "lora", "--max_steps", "2", "--lora_rank", "2",
        "--dit_path", str(tmp_path / "base" / "model.safetensors"))
    run(toy, tmp_path / "s", "--mode", "sample", "--dit_path", str(tmp_path / "base" / "model.safetensors"),
        "--lora", str(tmp_path / "lora" / "lora.safetensors"), "--sample_prompts", "a red circle moving left",
        "--sample_steps", "3", "--sample_solver", "unipc")
    with av.open(str(tmp_path / "s" / "samples" / "step_00000000_0.mp4")) as c:
        frames = [f.to_ndarray(format="rgb24") for f in c.decode(video=0)]
    assert len(frames) == 5 and frames[0].shape == (16, 16, 3)
    p = run(toy, tmp_path / "b", "--mode", "bench", "--bench_steps", "1", "--ac", "1")
    res = json.loads([line for line in p.stdout.splitlines() if line.startswith("{")][-1])
    assert res["tokens"] == 4 * 5 * 4 * 4 and res["step_s"] > 0 and res["tokens_s"] > 0


def test_compile_and_activation_checkpointing_keep_the_math_and_the_keys(toy, tmp_path):
    """--compile 1 --ac 1 give the same losses as the plain run, and the exported keys carry no wrapper names."""
    from safetensors.torch import load_file
    run(toy, tmp_path / "plain", "--max_steps", "2")
    run(toy, tmp_path / "fast", "--max_steps", "2", "--compile", "1", "--ac", "1", timeout=900)
    a, b = losses(tmp_path / "plain"), losses(tmp_path / "fast")
    for s in (1, 2):
        assert abs(a[s] - b[s]) <= 1e-4 * max(1.0, abs(a[s])), (s, a[s], b[s])
    keys = load_file(str(tmp_path / "fast" / "model.safetensors")).keys()
    assert "blocks.0.self_attn.q.weight" in keys
    assert not [k for k in keys if "_orig_mod" in k or "_checkpoint_wrapped" in k]
