"""train_ltx.py as a user runs it (subprocesses, the toy preset): the loss falls on 1 and 2 processes and the two
agree (losses and gradient norms, with per-sample caption dropout and first-frame conditioning in the draws), LoRA
trains only the adapters, an interrupted run resumes exactly, the run folder is never another run's, the validation
loss is fixed, --mode sample applies a LoRA, bench runs, AC keeps the math."""
import json
import os
import signal
import subprocess
import time

from common.log import read_log
from tests.procs import ROOT, SMALL, close, env, losses, records, script_cmd, toy_runner

# SMALL (tests/procs.py) -> 48 x 5 x 4 x 4 "latents" -> 80 tokens per clip; with first-frame conditioning and caption
# dropout in the draws
EXTRA = ["--first_frame_p", "0.3", "--caption_dropout", "0.2"]
run = toy_runner("train_ltx.py", *EXTRA)


def test_one_and_two_processes_agree_and_loss_falls(toy, tmp_path):
    """Same samples, noise, sigmas, dropout and conditioning on 1 and 2 processes: losses AND gradient norms agree
    per step (one process accumulates 2 micro-batches, two processes none: a wrong / accum shows in the norm)."""
    run(toy, tmp_path / "p1", "--max_steps", "8", "--timestep_sampling", "uniform")
    run(toy, tmp_path / "p2", "--max_steps", "8", "--timestep_sampling", "uniform", nproc=2)
    a, b = records(tmp_path / "p1"), records(tmp_path / "p2")
    assert sorted(a) == sorted(b) == list(range(1, 9))
    for s in range(1, 9):
        assert close(a[s]["loss"], b[s]["loss"]), (s, a[s], b[s])
        assert close(a[s]["grad_norm"], b[s]["grad_norm"], 1e-3), (s, a[s], b[s])
    assert sum(a[s]["loss"] for s in (7, 8)) < sum(a[s]["loss"] for s in (1, 2)) * 0.9, a


def test_lora_trains_only_the_adapters(toy, tmp_path):
    from safetensors.torch import load_file
    # the from-scratch toy DiT has a zero output layer: fine-tune a briefly trained one, loaded from its own export
    run(toy, tmp_path / "base", "--max_steps", "3")
    out = tmp_path / "lora"
    run(toy, out, "--max_steps", "4", "--lora_rank", "4", "--lr", "1e-2", "--ckpt_every", "1", "--keep", "2",
        "--dit_path", str(tmp_path / "base" / "model.safetensors"), "--dtype", "bf16")
    assert sorted(os.listdir(out / "checkpoints")) == ["step_00000003", "step_00000004"]  # --keep 2
    sd = load_file(str(out / "lora.safetensors"))
    assert sd and all(".lora_A." in k or ".lora_B." in k or k.endswith(".alpha") for k in sd), list(sd)[:5]
    assert all(k.startswith("diffusion_model.transformer_blocks.") for k in sd)
    assert {k.split(".", 3)[3].rsplit(".lora_", 1)[0].rsplit(".alpha", 1)[0] for k in sd} == \
        {f"{a}.{m}" for a in ("attn1", "attn2") for m in ("to_q", "to_k", "to_v", "to_out.0")}
    assert max(v.abs().max().item() for k, v in sd.items() if ".lora_B." in k) > 0
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
    cmd = script_cmd("train_ltx.py", [*SMALL, *EXTRA, "--data", toy["data"], "--cache_dir", toy["cache"],
                                      "--out_dir", str(cut), "--max_steps", "8", *flags])
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
    run(toy, cut, "--max_steps", "8", "--resume", "1", *flags)
    a, b = losses(full), losses(cut)
    assert sorted(b) == list(range(1, 9))
    for s in range(k + 1, 9):
        assert a[s] == b[s], (s, a[s], b[s])  # exact: same weights, optimizer state, data position and noise
    from safetensors.torch import load_file
    wa, wb = load_file(str(full / "model.safetensors")), load_file(str(cut / "model.safetensors"))
    assert wa.keys() == wb.keys() and all(wa[k].equal(wb[k]) for k in wa)


def test_run_folder_is_never_another_runs(toy, tmp_path):
    out = tmp_path / "r"
    run(toy, out, "--max_steps", "2", "--ckpt_every", "2")
    p = run(toy, out, "--max_steps", "2", check=False)
    assert p.returncode == 2 and "already holds a run" in p.stderr, p.stderr
    p = run(toy, out, "--max_steps", "4", "--resume", "1", "--first_frame_p", "0.5", check=False)
    assert p.returncode == 2 and "first_frame_p was 0.3, now 0.5" in p.stderr, p.stderr


def test_validation_loss_is_fixed_and_logged(toy, tmp_path):
    run(toy, tmp_path / "v1", "--max_steps", "4", "--val_count", "4", "--val_every", "2", "--lr", "0")
    v1 = [r["val_loss"] for r in read_log(tmp_path / "v1") if "val_loss" in r]
    assert len(v1) == 2 and v1[0] == v1[1]  # lr 0: fixed clips, sigmas and noise give the same number


def test_sample_mode_with_lora_and_bench_with_ac(toy, tmp_path):
    import av
    run(toy, tmp_path / "base", "--max_steps", "2")
    run(toy, tmp_path / "lora", "--max_steps", "2", "--lora_rank", "2",
        "--dit_path", str(tmp_path / "base" / "model.safetensors"))
    run(toy, tmp_path / "s", "--mode", "sample", "--dit_path", str(tmp_path / "base" / "model.safetensors"),
        "--lora", str(tmp_path / "lora" / "lora.safetensors"), "--sample_prompts", "a red circle moving left",
        "--sample_steps", "3", "--sample_stg", "1", "--sample_stg_blocks", "2")
    with av.open(str(tmp_path / "s" / "samples" / "step_00000000_0.mp4")) as c:
        frames = [f.to_ndarray(format="rgb24") for f in c.decode(video=0)]
    assert len(frames) == 5 and frames[0].shape == (16, 16, 3)
    p = run(toy, tmp_path / "b", "--mode", "bench", "--bench_steps", "1", "--ac", "1")
    res = json.loads([line for line in p.stdout.splitlines() if line.startswith("{")][-1])
    assert res["tokens"] == 4 * 5 * 4 * 4 and res["step_s"] > 0
    run(toy, tmp_path / "ac", "--max_steps", "2", "--ac", "1")
    a, b = losses(tmp_path / "base"), losses(tmp_path / "ac")
    assert all(abs(a[s] - b[s]) <= 1e-5 * max(1.0, abs(a[s])) for s in (1, 2)), (a, b)
