"""train_hunyuan.py as a user runs it (subprocesses, the toy preset): the loss falls on 1 and 2 processes and the
two agree in losses AND gradient norms, LoRA trains only the adapters, an interrupted run resumes exactly (also on
another number of processes), compile + activation checkpointing keep the math, the validation loss is fixed,
--mode sample applies a LoRA with true CFG."""
import os
import signal
import subprocess
import time

from common.log import read_log
from tests.procs import ROOT, SMALL, close, env, losses, records, script_cmd, toy_runner

run = toy_runner("train_hunyuan.py")


def test_one_and_two_processes_agree_and_loss_falls(toy, tmp_path):
    """Global 8, micro 4: one process accumulates 2 micro-batches, two processes none; losses and gradient norms
    agree per step (a wrong accumulation scale would show in the gradient norm)."""
    run(toy, tmp_path / "p1", "--max_steps", "8", "--timestep_sampling", "uniform")
    run(toy, tmp_path / "p2", "--max_steps", "8", "--timestep_sampling", "uniform", nproc=2)
    a, b = records(tmp_path / "p1"), records(tmp_path / "p2")
    assert sorted(a) == sorted(b) == list(range(1, 9))
    for s in range(1, 9):  # equal up to float summation order
        assert close(a[s]["loss"], b[s]["loss"]), (s, a[s], b[s])
        assert close(a[s]["grad_norm"], b[s]["grad_norm"], 1e-3), (s, a[s], b[s])
    assert sum(a[s]["loss"] for s in (7, 8)) < sum(a[s]["loss"] for s in (1, 2)) * 0.95, a


def test_lora_trains_only_the_adapters(toy, tmp_path):
    from safetensors.torch import load_file
    # the from-scratch init zeroes every modulation (each block starts as the identity): fine-tune a briefly
    # trained toy DiT, loaded back from its own export
    run(toy, tmp_path / "base", "--max_steps", "3", "--lr", "1e-2")
    out = tmp_path / "lora"
    run(toy, out, "--max_steps", "4", "--lora_rank", "4", "--lr", "1e-2", "--ckpt_every", "1", "--keep", "2",
        "--dit_path", str(tmp_path / "base" / "model.safetensors"), "--dtype", "bf16")
    assert sorted(os.listdir(out / "checkpoints")) == ["step_00000003", "step_00000004"]  # --keep 2
    sd = load_file(str(out / "lora.safetensors"))
    assert sd and all(k.startswith(("diffusion_model.double_blocks.", "diffusion_model.single_blocks."))
                      and (".lora_A." in k or ".lora_B." in k) for k in sd), list(sd)[:5]
    assert max(v.abs().max().item() for k, v in sd.items() if ".lora_B." in k) > 0  # B started at 0
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
    cmd = script_cmd("train_hunyuan.py", [*SMALL, "--data", toy["data"], "--cache_dir", toy["cache"], "--out_dir",
                                          str(cut), "--max_steps", "8", *flags])
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
    assert f"stopped by a signal in step {k + 1} (before micro-batch" in stdout, stdout[-2000:]
    run(toy, cut, "--max_steps", "8", "--resume", "1", *flags)
    a, b = losses(full), losses(cut)
    assert sorted(b) == list(range(1, 9))  # log.jsonl reads as one run
    for s in range(k + 1, 9):
        assert a[s] == b[s], (s, a[s], b[s])  # exact: same weights, optimizer state, data position and noise
    from safetensors.torch import load_file
    wa, wb = load_file(str(full / "model.safetensors")), load_file(str(cut / "model.safetensors"))
    assert wa.keys() == wb.keys() and all(wa[k].equal(wb[k]) for k in wa)


def test_compile_and_activation_checkpointing_keep_the_math_and_the_keys(toy, tmp_path):
    """--compile 1 --ac 1 (both block lists wrapped, compiled and sharded) give the plain run's losses, and the
    exported keys carry no wrapper names."""
    from safetensors.torch import load_file
    run(toy, tmp_path / "plain", "--max_steps", "2")
    run(toy, tmp_path / "fast", "--max_steps", "2", "--compile", "1", "--ac", "1", timeout=900)
    a, b = losses(tmp_path / "plain"), losses(tmp_path / "fast")
    assert all(close(a[s], b[s]) for s in (1, 2)), (a, b)
    keys = load_file(str(tmp_path / "fast" / "model.safetensors")).keys()
    assert "double_blocks.0.img_attn_qkv.weight" in keys and "single_blocks.1.linear1.weight" in keys
    assert not [k for k in keys if "_orig_mod" in k or "_checkpoint_wrapped" in k]


def test_resume_across_world_sizes(toy, tmp_path):
    """1 process to step 3, then 2 from there: weights, optimizer and data position carry over, and the losses and
    gradient norms equal an uninterrupted 1-process run."""
    run(toy, tmp_path / "one", "--max_steps", "5")
    out = tmp_path / "1to2"
    run(toy, out, "--max_steps", "3", "--ckpt_every", "3")
    run(toy, out, "--max_steps", "5", "--resume", "1", nproc=2)
    a, b = records(tmp_path / "one"), records(out)
    for s in (4, 5):
        assert close(a[s]["loss"], b[s]["loss"]) and close(a[s]["grad_norm"], b[s]["grad_norm"], 1e-3), (s, a[s], b[s])


def test_sample_mode_with_true_cfg_and_lora(toy, tmp_path):
    """--mode sample on the toy (no guidance embedding: true CFG against the empty prompt, the toy's default) with an
    exported LoRA: an mp4 of the right size and frame count."""
    import av
    run(toy, tmp_path / "base", "--max_steps", "2", "--lr", "1e-2")
    run(toy, tmp_path / "lora", "--max_steps", "2", "--lora_rank", "2",
        "--dit_path", str(tmp_path / "base" / "model.safetensors"))
    p = run(toy, tmp_path / "s", "--mode", "sample", "--dit_path", str(tmp_path / "base" / "model.safetensors"),
            "--lora", str(tmp_path / "lora" / "lora.safetensors"), "--sample_prompts", "a red circle moving left",
            "--sample_steps", "3", "--sample_guidance", "3", "--sample_negative", "")
    assert "sample ->" in p.stdout
    with av.open(str(tmp_path / "s" / "samples" / "step_00000000_0.mp4")) as c:
        frames = [f.to_ndarray(format="rgb24") for f in c.decode(video=0)]
    assert len(frames) == 5 and frames[0].shape == (16, 16, 3)


def test_validation_loss_is_fixed_and_logged(toy, tmp_path):
    run(toy, tmp_path / "v", "--max_steps", "4", "--val_count", "4", "--val_every", "2", "--lr", "0")
    v = [r["val_loss"] for r in read_log(tmp_path / "v") if "val_loss" in r]
    assert len(v) == 2 and v[0] == v[1]  # lr 0: same weights, same clips, sigmas and noise
