"""The check bodies that every model's tests share, each parameterised by the model's script and flags; a model's own
assertions stay in its test file, on what these return. Toy runs: `run` is a tests/procs.py toy_runner. The real
(non-toy) path of main(): `run` is a function of the flags that runs the script (check=False: do not raise)."""
import json
import os
import signal
import subprocess
import time

import torch

from common.log import read_log
from tests.procs import ROOT, close, env, losses, records, run_script, script_cmd, script_world_of_one

# ---- in-process: a model's LoRA adapters (any script's LoRALinear), its full-size keys


def lora_modules(model):
    """{name: module} of the model's LoRALinear modules (each script has its own class of that name)."""
    return {n: m for n, m in model.named_modules() if type(m).__name__ == "LoRALinear"}


def random_lora(model, seed=3):
    """Non-zero A and B for every adapter, large enough that the adapter visibly moves the output."""
    g = torch.Generator().manual_seed(seed)
    sd = {}
    for n, m in lora_modules(model).items():
        sd[n + ".lora_A.weight"] = torch.randn(m.lora_A.weight.shape, generator=g) * 0.1
        sd[n + ".lora_B.weight"] = torch.randn(m.lora_B.weight.shape, generator=g) * 0.1
    return sd


def load_lora(model, sd):
    """Load adapter weights only (every LoRA key must be used, only base keys may be missing); returns the model."""
    missing, unexpected = model.load_state_dict(sd, strict=False)
    assert not unexpected, unexpected
    assert not [k for k in missing if ".lora_" in k]
    return model


def check_full_size_keys(model, fixture, n_params, drop=()):
    """A meta-device model's state-dict keys and shapes equal the upstream list in the JSON file `fixture` (less the
    keys in `drop`), and its parameter count is n_params; returns that list."""
    shapes = {k: list(v.shape) for k, v in model.state_dict().items()}
    with open(fixture) as f:
        want = json.load(f)
    for k in drop:
        want.pop(k)
    assert sorted(shapes) == sorted(want), set(shapes) ^ set(want)
    bad = {k: (shapes[k], want[k]) for k in want if shapes[k] != want[k]}
    assert not bad, bad
    assert sum(p.numel() for p in model.parameters()) == n_params
    return want


# ---- toy runs (tests/test_*_train.py)


def check_one_and_two_processes_agree(run, toy, tmp_path, *flags, falls=0.9):
    """8 steps on 1 and on 2 processes with `flags`: the losses AND the gradient norms agree per step (equal up to
    float summation order), and the mean loss of steps 7-8 is under `falls` x that of steps 1-2."""
    run(toy, tmp_path / "p1", "--max_steps", "8", *flags)
    run(toy, tmp_path / "p2", "--max_steps", "8", *flags, nproc=2)
    a, b = records(tmp_path / "p1"), records(tmp_path / "p2")
    assert sorted(a) == sorted(b) == list(range(1, 9))
    for s in range(1, 9):
        assert close(a[s]["loss"], b[s]["loss"]), (s, a[s], b[s])
        assert close(a[s]["grad_norm"], b[s]["grad_norm"], 1e-3), (s, a[s], b[s])
    assert sum(a[s]["loss"] for s in (7, 8)) < sum(a[s]["loss"] for s in (1, 2)) * falls, a


def check_sequence_parallel_agrees(run, toy, tmp_path, *flags):
    """6 steps on 1 process and on 2 processes with --sp 2 (both ranks train the same samples, each half of their
    tokens): the losses AND the gradient norms agree per step, so the tokens' split, the attention across the
    ranks and the gradient scale are right."""
    run(toy, tmp_path / "p1", "--max_steps", "6", *flags)
    run(toy, tmp_path / "sp2", "--max_steps", "6", "--sp", "2", *flags, nproc=2)
    a, b = records(tmp_path / "p1"), records(tmp_path / "sp2")
    assert sorted(a) == sorted(b) == list(range(1, 7))
    for s in range(1, 7):
        assert close(a[s]["loss"], b[s]["loss"]), (s, a[s], b[s])
        assert close(a[s]["grad_norm"], b[s]["grad_norm"], 1e-3), (s, a[s], b[s])


def check_lora_trains_only_the_adapters(run, toy, tmp_path, *base_flags):
    """A 3-step base run (+ base_flags), then rank-4 LoRA on its export for 4 steps in bf16 with --keep 2: two
    checkpoints kept, the file holds only lora_A / lora_B / .alpha tensors, B left zero, the DCP checkpoint only
    adapters. Returns the LoRA file's state dict (the model's own key checks are its test's)."""
    from safetensors.torch import load_file
    import torch.distributed.checkpoint as dcp
    run(toy, tmp_path / "base", "--max_steps", "3", *base_flags)
    out = tmp_path / "lora"
    run(toy, out, "--max_steps", "4", "--lora_rank", "4", "--lr", "1e-2", "--ckpt_every", "1", "--keep", "2",
        "--dit_path", str(tmp_path / "base" / "model.safetensors"), "--dtype", "bf16")
    assert sorted(os.listdir(out / "checkpoints")) == ["step_00000003", "step_00000004"]  # --keep 2
    sd = load_file(str(out / "lora.safetensors"))
    assert sd and all(".lora_A." in k or ".lora_B." in k or k.endswith(".alpha") for k in sd), list(sd)[:5]
    # B starts at zero: after training it is not, so the adapters learned
    assert max(v.abs().max().item() for k, v in sd.items() if ".lora_B." in k) > 0
    # the checkpoint holds the trainable tensors only (the frozen base comes from --ckpt_dir on resume)
    meta = dcp.FileSystemReader(str(out / "checkpoints" / "step_00000004")).read_metadata()
    model_keys = [k for k in meta.state_dict_metadata if k.startswith("model.")]
    assert model_keys and all(".lora_" in k for k in model_keys), model_keys[:5]
    # --lora_plus 4: one step moves B exactly 4 times as far as without (the same gradients; Adam's step scales with
    # the lr, and by a power of two exactly) and leaves A as the plain run does (B = 0: no gradient reaches A)
    one, lora = {}, ["--lora_rank", "4", "--lr", "1e-2", "--dit_path", str(tmp_path / "base" / "model.safetensors"),
                     "--dtype", "bf16", "--ckpt_every", "1"]
    for plus in ("1", "4"):
        run(toy, tmp_path / f"plus{plus}", "--max_steps", "1", "--lora_plus", plus, *lora)
        one[plus] = load_file(str(tmp_path / f"plus{plus}" / "lora.safetensors"))
    bs = [k for k in one["1"] if ".lora_B." in k]
    assert bs and any(one["1"][k].abs().max() > 0 for k in bs)
    assert all(torch.equal(one["4"][k].float(), 4 * one["1"][k].float()) if k in bs else torch.equal(one["4"][k],
               one["1"][k]) for k in one["1"])
    # and its two parameter groups come back from the checkpoint: resumed to 3, it runs as a 3-step run does
    run(toy, tmp_path / "plus4", "--max_steps", "3", "--lora_plus", "4", "--resume", "1", *lora)
    run(toy, tmp_path / "plus4_full", "--max_steps", "3", "--lora_plus", "4", *lora)
    assert losses(tmp_path / "plus4") == losses(tmp_path / "plus4_full"), (losses(tmp_path / "plus4"),
                                                                         losses(tmp_path / "plus4_full"))
    return sd


def check_interrupted_run_resumes_exactly(run, toy, tmp_path):
    """SIGTERM in the middle of an accumulated step (micro-batch 1: 8 a step): the step in flight is dropped and
    said so, the last whole step is checkpointed (EMA included), a half-written later checkpoint (.tmp) is ignored,
    and --resume 1 continues bit for bit as the uninterrupted run, exported EMA weights included. The uninterrupted
    run skips the preflight (--preflight 0) that both parts of the other run it: it changes no step either."""
    from safetensors.torch import load_file
    flags = ["--micro_batch", "1", "--ema", "0.9", "--ema_export", "1", "--ckpt_every", "100"]
    full, cut = tmp_path / "full", tmp_path / "cut"
    run(toy, full, "--max_steps", "8", "--preflight", "0", *flags)
    cmd = script_cmd(run.script, run.args(toy, cut, "--max_steps", "8", *flags))
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
    assert "preflight: one forward + backward of 1 x " in stdout, stdout[-2000:]
    # a crash in the middle of a later checkpoint write leaves a .tmp folder behind: it must be ignored
    os.makedirs(cut / "checkpoints" / "step_00000099.tmp")
    (cut / "checkpoints" / "step_00000099.tmp" / "junk").write_text("half a checkpoint")
    run(toy, cut, "--max_steps", "8", "--resume", "1", *flags)
    a, b = losses(full), losses(cut)
    assert sorted(b) == list(range(1, 9))  # log.jsonl reads as one run: the redone steps are not there twice
    for s in range(1, 9):  # exact: same weights, optimizer state, data position and noise
        assert a[s] == b[s], (s, a[s], b[s])
    wa, wb = load_file(str(full / "model.safetensors")), load_file(str(cut / "model.safetensors"))
    assert wa.keys() == wb.keys() and all(wa[k].equal(wb[k]) for k in wa)


def check_resume_across_world_sizes(run, toy, tmp_path, pairs=((1, 2), (2, 1)), steps=6):
    """For each (first, then): `first` processes to step 3, then `then` processes to `steps` with --resume 1: the
    losses and gradient norms of steps 4.. equal an uninterrupted 1-process run's."""
    run(toy, tmp_path / "one", "--max_steps", str(steps))
    a = records(tmp_path / "one")
    for first, then in pairs:
        out = tmp_path / f"{first}to{then}"
        run(toy, out, "--max_steps", "3", "--ckpt_every", "3", nproc=first)
        run(toy, out, "--max_steps", str(steps), "--resume", "1", nproc=then)
        b = records(out)
        for s in range(4, steps + 1):
            assert close(a[s]["loss"], b[s]["loss"]) and close(a[s]["grad_norm"], b[s]["grad_norm"], 1e-3), \
                (first, then, s, a[s], b[s])


def check_replicated_shards_agree_and_resume(run, toy, tmp_path, steps=6):
    """--shard 1 on 2 processes (HSDP, a (2, 1) mesh: each rank holds every weight, as DDP) to step 3: losses and
    gradient norms equal 1 process's; its checkpoint resumes on the same 2 processes fully sharded (--shard 0, a
    1-D mesh: DCP reshards) to `steps`, still equal."""
    run(toy, tmp_path / "one", "--max_steps", str(steps))
    out = tmp_path / "hsdp"
    p = run(toy, out, "--max_steps", "3", "--ckpt_every", "3", "--shard", "1", nproc=2)
    run(toy, out, "--max_steps", str(steps), "--resume", "1", nproc=2)
    a, b = records(tmp_path / "one"), records(out)
    assert sorted(b) == list(range(1, steps + 1)), sorted(b)
    for s in range(1, steps + 1):
        assert close(a[s]["loss"], b[s]["loss"]) and close(a[s]["grad_norm"], b[s]["grad_norm"], 1e-3), (s, a[s], b[s])
    return p


def check_run_folder_is_never_another_runs(run, toy, tmp_path, changed, says):
    """A second run in a run's folder is refused (exit 2, pointing to --resume 1); --resume 1 with the `changed`
    flags is refused, its error naming each change in `says`; the folder's checkpoint is untouched."""
    out = tmp_path / "r"
    run(toy, out, "--max_steps", "2", "--ckpt_every", "2")
    p = run(toy, out, "--max_steps", "2", check=False)
    assert p.returncode == 2 and "already holds a run" in p.stderr and "--resume 1" in p.stderr, p.stderr
    p = run(toy, out, "--max_steps", "4", "--resume", "1", *changed, check=False)
    assert p.returncode == 2 and all(s in p.stderr for s in says), (says, p.stderr)
    assert sorted(os.listdir(out / "checkpoints")) == ["step_00000002"]  # nothing was touched


def check_validation_loss_is_fixed(run, toy, tmp_path, runs=1):
    """`runs` equal runs of 4 steps at lr 0 with validation every 2: two validation losses a run, the same in
    every run and at both steps (fixed clips, sigmas and noise, weights that do not move). Returns the first's."""
    vs = []
    for i in range(1, runs + 1):
        run(toy, tmp_path / f"v{i}", "--max_steps", "4", "--val_count", "4", "--val_every", "2", "--lr", "0")
        vs.append([r["val_loss"] for r in read_log(tmp_path / f"v{i}") if "val_loss" in r])
    assert len(vs[0]) == 2 and all(v == vs[0] for v in vs), vs
    assert vs[0][0] == vs[0][1], vs
    return vs[0]


def check_sample_mode_with_lora(run, toy, tmp_path, *sample_flags, base_flags=()):
    """A 2-step base run (+ base_flags), a rank-2 LoRA on its export, then --mode sample of one prompt in 3 steps
    with that LoRA (+ sample_flags), into a cache folder that does not exist yet (a first run may be a sample run):
    an mp4 of 5 frames of 16x16. Returns the sample run's process."""
    import av
    run(toy, tmp_path / "base", "--max_steps", "2", *base_flags)
    run(toy, tmp_path / "lora", "--max_steps", "2", "--lora_rank", "2",
        "--dit_path", str(tmp_path / "base" / "model.safetensors"))
    p = run(toy, tmp_path / "s", "--mode", "sample", "--dit_path", str(tmp_path / "base" / "model.safetensors"),
            "--lora", str(tmp_path / "lora" / "lora.safetensors"), "--sample_prompts", "a red circle moving left",
            "--sample_steps", "3", "--cache_dir", str(tmp_path / "new_cache"), *sample_flags)
    with av.open(str(tmp_path / "s" / "samples" / "step_00000000_0.mp4")) as c:
        frames = [f.to_ndarray(format="rgb24") for f in c.decode(video=0)]
    assert len(frames) == 5 and frames[0].shape == (16, 16, 3)
    return p


def check_bench(run, toy, out, tokens_per_frame=4 * 4):
    """--mode bench for 1 step with AC prints its figures as a JSON line: 4 clips x 5 frames x the toy DiT's tokens
    per 16x16 frame (4x4 patches: 16; Wan's 8x8: 4), positive times; and a second run gives the same loss (seeded
    weights and inputs: what lets a GPU session compare an eager bench with a --compile one). Returns it."""
    def bench():
        p = run(toy, out, "--mode", "bench", "--bench_steps", "1", "--ac", "1")
        return json.loads([line for line in p.stdout.splitlines() if line.startswith("{")][-1])
    res, again = bench(), bench()
    assert res["tokens"] == 4 * 5 * tokens_per_frame and res["step_s"] > 0 and res["tokens_s"] > 0, res
    assert res["pinned_gb"] is None and res["mem_gb"] > 0  # pinned host memory: measured on CUDA only
    assert again["loss"] == res["loss"], (res["loss"], again["loss"])
    return res


def check_compile_and_ac_keep_the_math(run, toy, tmp_path, *flags):
    """--compile 1 --ac 2 (checkpointing with its saved inputs parked in CPU memory: on CPU no copy is made, but the
    hooks run, compiled) + `flags` give the plain run's losses over 2 steps, and the exported keys carry no wrapper
    names. Returns those keys."""
    from safetensors.torch import load_file
    run(toy, tmp_path / "plain", "--max_steps", "2")
    run(toy, tmp_path / "fast", "--max_steps", "2", "--compile", "1", "--ac", "2", *flags, timeout=900)
    a, b = losses(tmp_path / "plain"), losses(tmp_path / "fast")
    for s in (1, 2):
        assert close(a[s], b[s]), (s, a[s], b[s])
    keys = load_file(str(tmp_path / "fast" / "model.safetensors")).keys()
    assert not [k for k in keys if "_orig_mod" in k or "_checkpoint_wrapped" in k]
    return keys


# ---- the real path of main() on a tiny official folder (tests/test_*_main.py)


def official_folder(tmp_path_factory, name, make):
    """For a module fixture: make(path) writes a tiny model in its official layout at <tmp>/<name>, beside 8 toy
    clips of 32x32 and 9 frames; returns {"ckpt": that path, "data", "cache": a folder for the cache, "root"}."""
    from data.toy import make_toy_dataset
    d = tmp_path_factory.mktemp("official")
    make(str(d / name))
    make_toy_dataset(str(d / "clips"), n=8, size=32, frames=9)
    return {"ckpt": str(d / name), "data": str(d / "clips"), "cache": str(d / "cache"), "root": d}


def sample_flags(model, dit_path, cache, frames, *extra):
    """--mode sample of one prompt ("a blue square moving up") in 3 steps at 32x32 x `frames` in bf16, from the
    `model` flags (--ckpt_dir ...) and the DiT file `dit_path` (+ extra)."""
    return ["--mode", "sample", *model, "--dit_path", dit_path, "--sample_prompts", "a blue square moving up",
            "--sample_steps", "3", "--height", "32", "--width", "32", "--frames", str(frames), "--dtype", "bf16",
            "--cache_dir", cache, *extra]


def check_cache(run, common, cache, n=8):
    """--mode cache (the `common` flags) fills the folder `cache` with `n` entries; returns (tensors, meta) of one."""
    from data.cache import load_entry
    p = run("--mode", "cache", *common)
    files = [f for f in os.listdir(cache) if f.endswith(".safetensors")]
    assert len(files) == n, (files, p.stdout[-2000:])
    return load_entry(os.path.join(cache, files[0]))


def check_train_from_cache(run, common, out, *flags):
    """A full fine-tune of 4 steps (+ flags) with a checkpoint at 2 and a 2-step sample at the end, all from the
    cache: finite losses, gradients that move. Returns the process."""
    p = run(*common, "--out_dir", str(out), "--max_steps", "4", "--ckpt_every", "2", "--sample_prompts",
            "a red circle moving left", "--sample_steps", "2", *flags)
    assert "encoding" not in p.stderr and "0 encoded" not in p.stdout  # everything came from the cache
    log = [r for r in read_log(out) if "loss" in r]
    assert [r["step"] for r in log] == [1, 2, 3, 4]
    assert all(r["loss"] == r["loss"] and r["grad_norm"] > 0 for r in log)  # finite, learning
    return p


def check_resume_to_6(run, common, out, frames, *flags):
    """The run of check_train_from_cache to step 6 with --resume 1 (+ flags): one log of steps 1-6, checkpoints 2,
    4, 6, and its step-4 sample decoded by the VAE to `frames` frames of 32x32."""
    from data.video import probe
    run(*common, "--out_dir", str(out), "--max_steps", "6", "--ckpt_every", "2", "--resume", "1", *flags)
    assert [r["step"] for r in read_log(out) if "loss" in r] == [1, 2, 3, 4, 5, 6]
    assert sorted(os.listdir(out / "checkpoints")) == ["step_00000002", "step_00000004", "step_00000006"]
    info = probe(str(out / "samples" / "step_00000004_0.mp4"))
    assert (info["frames"], info["height"], info["width"]) == (frames, 32, 32)


def check_lora_on_export(run, common, out, dit_path, read_lora):
    """A rank-4 LoRA, 3 steps at lr 5e-2, on the exported DiT `dit_path`: the file reads back (`read_lora`, the
    script's) with rank 4 and a B that moved. Returns the read state dict."""
    run(*common, "--out_dir", str(out), "--max_steps", "3", "--lora_rank", "4", "--lr", "5e-2", "--dit_path", dit_path)
    lsd, rank, _ = read_lora(str(out / "lora.safetensors"))
    assert rank == 4 and max(v.abs().max().item() for k, v in lsd.items() if ".lora_B." in k) > 0
    return lsd


def check_init_and_base_lora(run, common, tmp_path, lora, read_lora, tol=1e-5):
    """--init_lora and --base_lora through main(), one step at lr 0 in fp32 on the base of the `common` flags, with
    the trained LoRA file `lora` (check_lora_on_export's): (a) --init_lora starts the adapter from the file (rank,
    alpha and targets its own) and, lr 0, exports it unchanged; (b) a fresh adapter on the base with the file merged
    by --base_lora sees the loss of (a) (the same model, merged); (c) merged with multiplier 0 it sees the base's
    loss, which the LoRA changes. Each step-1 loss is the untrained model's on the same draws."""
    one = [*common, "--max_steps", "1", "--lr", "0", "--dtype", "fp32", "--sample_prompts", ""]
    run(*one, "--init_lora", str(lora), "--out_dir", str(tmp_path / "init"))
    run(*one, "--base_lora", str(lora), "--lora_rank", "4", "--out_dir", str(tmp_path / "merged"))
    run(*one, "--base_lora", f"{lora}:0", "--lora_rank", "4", "--out_dir", str(tmp_path / "zero"))
    want, rank, alpha = read_lora(str(lora))
    got, rank2, alpha2 = read_lora(str(tmp_path / "init" / "lora.safetensors"))
    assert (rank2, alpha2, sorted(got)) == (rank, alpha, sorted(want))
    assert all(torch.equal(got[k], want[k]) for k in want)  # lr 0: the file's adapter, unchanged
    a, b, c = (losses(tmp_path / d)[1] for d in ("init", "merged", "zero"))
    assert abs(a - b) <= tol * abs(a), (a, b)
    assert abs(a - c) > 1000 * abs(a - b) and abs(a - c) > 1e-4 * abs(a), (a, b, c)


def check_lora_changes_the_sample(run, sample, tmp_path, lora, frames, fps):
    """--mode sample (the `sample` flags) into s0 without and s1 with the LoRA file `lora`: the LoRA changes the
    video, and sampling leaves no run files behind. Returns the two clips (read at `frames` frames, `fps`)."""
    from data.video import read_clip
    run(*sample, "--out_dir", str(tmp_path / "s0"))
    run(*sample, "--out_dir", str(tmp_path / "s1"), "--lora", str(lora))
    a, b = (read_clip(str(tmp_path / d / "samples" / "step_00000000_0.mp4"), 0, frames, fps, (32, 32))
            for d in ("s0", "s1"))
    assert (a - b).abs().float().mean() > 0.01, (a - b).abs().float().mean()
    assert not os.path.exists(tmp_path / "s0" / "args.json")  # sampling leaves no run files behind
    return a, b


def check_bench_in_bf16(run, ckpt, clip, tokens):
    """--mode bench of the model at `ckpt` (the `clip` flags), plain and with a rank-4 LoRA: bf16, a positive step
    time, a finite loss, `tokens` tokens."""
    for extra in ([], ["--lora_rank", "4"]):
        p = run("--mode", "bench", "--ckpt_dir", ckpt, *clip, "--bench_steps", "1", *extra)
        res = json.loads([line for line in p.stdout.splitlines() if line.startswith("{")][-1])
        assert res["dtype"] == "torch.bfloat16" and res["step_s"] > 0 and res["loss"] == res["loss"]
        assert res["tokens"] == tokens


def check_user_error(run, args, says, out):
    """The script with `args` stops before any work: exit 2, one stderr line `error: ...` containing `says`, no
    traceback, and no run folder `out` made. In this process (main(argv) under the scripts' own cli wrapper): a
    subprocess per case spent seconds importing torch for a check that takes milliseconds. The environment is
    restored afterwards (a check that fails after the process group is up leaves its variables behind)."""
    import contextlib
    import importlib
    import io

    from common.args import cli
    mod = importlib.import_module(os.path.splitext(run.script)[0])
    err, environ = io.StringIO(), dict(os.environ)
    try:
        with contextlib.redirect_stderr(err), contextlib.redirect_stdout(io.StringIO()):
            try:
                cli(lambda: mod.main([str(a) for a in args]))
                code = 0
            except SystemExit as e:
                code = e.code
    finally:
        os.environ.clear()
        os.environ.update(environ)
    assert code == 2, err.getvalue()
    lines = err.getvalue().strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: ") and says in lines[0], err.getvalue()
    assert not os.path.exists(out)


# ---- the memory flags of a LoRA run, --offload 1 and --base_dtype float8, on a tiny model in bf16 on CPU
# (tests/test_*_memory.py). `script`: the imported train_*.py module; `run`: its tests/procs.py script_runner.


def memory_folder(tmp_path_factory, run, name, make, clip, *model):
    """official_folder, its clips cached (--mode cache with the `clip` flags); f["model"] holds the flags that name
    the model: --ckpt_dir (+ `model`)."""
    f = official_folder(tmp_path_factory, name, make)
    f["model"] = ["--ckpt_dir", f["ckpt"], *model]
    run("--mode", "cache", *f["model"], "--data", f["data"], "--cache_dir", f["cache"], *clip)
    return f


def lora_flags(folder, clip, lora):
    """The flags of a LoRA run from the cache of a memory_folder: the model, data, cache, `clip` and `lora`."""
    return [*folder["model"], "--data", folder["data"], "--cache_dir", folder["cache"], *clip, *lora]


def memory_weights(script, model_class, sd, seed=3):
    """(sd, adapters): the base `sd` and non-zero A and B (so both get gradients and the adapters matter) for every
    rank-4 adapter of model_class(the tiny preset) with the script's add_lora."""
    with torch.device("meta"):
        probe = script.add_lora(model_class(script.DIT_PRESETS["tiny"]), 4, 4)
    g = torch.Generator().manual_seed(seed)
    lora = {k: torch.randn(v.shape, generator=g) * 0.1 for k, v in probe.state_dict().items() if ".lora_" in k}
    return sd, lora


def count_upcasts(model):
    """{float8 weight's module name: times upcast}, counted from now on by forward hooks on the float8 parametrizations
    (empty for a model without float8 weights)."""
    from collections import Counter

    from common.float8 import Upcast
    calls = Counter()
    for name, m in model.named_modules():
        if isinstance(m, Upcast):
            m.register_forward_hook(lambda *_, name=name: calls.update([name]))
    return calls


def check_offload_bitwise_and_float8_within_tolerance(script, loss, weights, latent, adapters, loss_tol, total_tol,
                                                      worst_tol, *also, probe=None):
    """build_dit as main() calls it (bf16, LoRA rank 4 with the adapters of `weights`, --ac 1 + flags), in a
    one-process group, and one flow loss, loss(model, args, x0, eps, t, g) (the script's: its text inputs drawn from
    g), on fixed inputs (x0, eps of shape 2 x `latent`, t 0.3 and 0.8) and its backward: --offload 1 gives bitwise
    the plain loss and adapters' gradients, all `adapters` of them non-zero; --base_dtype float8 moves the loss by a
    relative 0 < . < loss_tol, all the gradients together by < total_tol and the worst adapter's by < worst_tol;
    both flags give bitwise float8 alone, and so does each flag dict of `also` (on top of float8 and offload).
    Returns {"plain", "offload", "float8", "both": (loss, {adapter: gradient}, probe(model) or None)}."""
    sd, lora = weights

    def step(flags):
        args = script.Args(**{"preset": "tiny", "lora_rank": 4, "ac": 1, "dtype": "bf16", **flags})
        g = torch.Generator().manual_seed(5)
        x0, eps = torch.randn(2, *latent, generator=g), torch.randn(2, *latent, generator=g)
        with script_world_of_one():
            model = script.build_dit(args, script.DIT_PRESETS["tiny"], {**sd, **lora}, torch.device("cpu"),
                                     torch.bfloat16)
            calls = count_upcasts(model)
            out = loss(model, args, x0, eps, torch.tensor([0.3, 0.8]), g)
            out.backward()
            # each float8 weight upcast once in the forward and once in its checkpointed block's recompute, no more:
            # a read of `.weight` for its dtype alone would upcast it again (common/float8.py)
            assert not calls or set(calls.values()) == {2}, {k: v for k, v in calls.items() if v != 2}
            grads = {script.clean_name(n): p.grad.full_tensor().float() for n, p in model.named_parameters()
                     if p.requires_grad}
            return out.item(), grads, probe(model) if probe else None

    res = {"plain": step({}), "offload": step({"offload": True})}
    (loss0, g0, _), (loss1, g1, _) = res["plain"], res["offload"]
    assert loss1 == loss0 and g1.keys() == g0.keys() and all(torch.equal(g1[k], g0[k]) for k in g0)
    assert len(g0) == adapters and all(g.abs().sum() > 0 for g in g0.values())  # every adapter trains
    res["float8"] = step({"base_dtype": "float8"})
    loss8, g8, _ = res["float8"]
    assert 0 < abs(loss8 - loss0) / loss0 < loss_tol, (loss8, loss0)
    a, b = torch.cat([g0[k].flatten() for k in g0]), torch.cat([g8[k].flatten() for k in g0])
    assert ((b - a).norm() / a.norm()).item() < total_tol
    worst = max(((g8[k] - g0[k]).norm() / g0[k].norm()).item() for k in g0)
    assert worst < worst_tol, worst
    res["both"] = step({"base_dtype": "float8", "offload": True})
    for flags in ({}, *also):
        loss9, g9, _ = step({"base_dtype": "float8", "offload": True, **flags}) if flags else res["both"]
        assert loss9 == loss8 and all(torch.equal(g9[k], g8[k]) for k in g8), flags
    return res


FLAG_RUNS = {"plain": [], "offload": ["--offload", "1"], "float8": ["--base_dtype", "float8"],
             "both": ["--offload", "1", "--base_dtype", "float8"]}


def check_lora_runs_through_main_with_each_flag(run, common, tmp_path, float8_says="float8 base: ", below=None,
                                                float8_per_step=0.02):
    """10 steps of LoRA (the `common` flags: lora_flags) plain, with each flag and with both, in tmp_path/<FLAG_RUNS
    name>: each logs steps 1-10, says "offload: " with --offload 1 only and `float8_says` with float8 only, and
    exports its LoRA; the loss falls: the sum of steps 8-10 under 0.95 x that of steps 1-3, or under `below` when
    given; --offload 1 logs the losses and gradient norms of the run without it exactly (also with float8); with
    float8_per_step, each step's float8 loss is within that fraction of the plain one; float8 is in the run's
    fingerprint and offload is not, and a --resume 1 without float8 is refused in one line. Returns {name: log}."""
    common = [*common, "--max_steps", "10"]
    logs = {}
    for name, flags in FLAG_RUNS.items():
        p = run(*common, *flags, "--out_dir", str(tmp_path / name))
        logs[name] = [r for r in read_log(tmp_path / name) if "loss" in r]
        assert [r["step"] for r in logs[name]] == list(range(1, 11)), p.stdout[-2000:]
        assert ("offload: " in p.stdout) == ("--offload" in flags), p.stdout[-2000:]
        assert (float8_says in p.stdout) == ("float8" in flags), p.stdout[-2000:]
        last = sum(r["loss"] for r in logs[name][-3:])
        limit = 0.95 * sum(r["loss"] for r in logs[name][:3]) if below is None else below
        assert last < limit, (name, [r["loss"] for r in logs[name]])
        assert os.path.exists(tmp_path / name / "lora.safetensors")
    for a, b in (("plain", "offload"), ("float8", "both")):
        assert [(r["loss"], r["grad_norm"]) for r in logs[a]] == [(r["loss"], r["grad_norm"]) for r in logs[b]]
    if float8_per_step is not None:
        for r0, r8 in zip(logs["plain"], logs["float8"]):
            assert abs(r8["loss"] - r0["loss"]) < float8_per_step * r0["loss"], (r0, r8)
    with open(tmp_path / "float8" / "run.json") as f:  # float8 changes the math: a resume must keep it
        assert json.load(f)["fingerprint"]["base_dtype"] == "float8"
    with open(tmp_path / "offload" / "run.json") as f:  # offload does not: not in the fingerprint
        assert "base_dtype" not in json.load(f)["fingerprint"]
    # a resume must keep float8 (one line, before any training)
    p = run(*common, "--offload", "1", "--out_dir", str(tmp_path / "float8"), "--resume", "1", check=False)
    assert p.returncode == 2 and "base_dtype was 'float8', now None" in p.stderr, p.stderr[-1000:]
    return logs


def check_resume_with_both_flags_continues_exactly(run, common, tmp_path, keys=("loss", "grad_norm")):
    """With both flags and a checkpoint every 2 steps: 2 steps, then on to 4 with --resume 1 (tmp_path/resumed) log
    the `keys` of the uninterrupted 4 steps (tmp_path/whole) exactly (the checkpoint holds the adapters and AdamW
    only; the float8 base is made again from --ckpt_dir). Returns (the whole run's process, [whole, resumed] logs)."""
    both = [*common, "--offload", "1", "--base_dtype", "float8", "--ckpt_every", "2"]
    p = run(*both, "--max_steps", "4", "--out_dir", str(tmp_path / "whole"))
    run(*both, "--max_steps", "2", "--out_dir", str(tmp_path / "resumed"))
    run(*both, "--max_steps", "4", "--out_dir", str(tmp_path / "resumed"), "--resume", "1")
    logs = [[tuple(r[k] for k in keys) for r in read_log(tmp_path / d) if "loss" in r] for d in ("whole", "resumed")]
    assert len(logs[0]) == 4 and logs[0] == logs[1], logs
    return p, logs


def check_bench_with_both_flags(run, src, clip, says):
    """--mode bench of 1 step of a rank-4 LoRA with --ac 1 and both flags, the model from the `src` flags: a finite
    loss, a positive step time, `says` (the float8 line) and "offload: " printed, both flags in its figures."""
    p = run("--mode", "bench", *src, *clip, "--bench_steps", "1", "--lora_rank", "4", "--ac", "1", "--offload", "1",
            "--base_dtype", "float8")
    res = json.loads([line for line in p.stdout.splitlines() if line.startswith("{")][-1])
    assert res["loss"] == res["loss"] and res["step_s"] > 0 and says in p.stdout, (res, p.stdout[-2000:])
    assert res["base_dtype"] == "float8" and res["offload"] is True and "offload: " in p.stdout, res
    return res


# the user errors of the memory flags every script has (a script adds its own: pytest parameters (flags, says))
MEMORY_USER_ERRORS = [
    (["--offload", "1", "--ac", "1"], "--offload 1 converts the frozen base of a LoRA run: add --lora_rank"),
    (["--base_dtype", "float8", "--lora_rank", "4"], "--base_dtype float8 needs --ac 1"),
    (["--offload", "1", "--lora_rank", "4", "--ac", "1", "--compile", "1"], "does not combine with --compile 1"),
    (["--offload", "1", "--lora_rank", "4", "--ac", "1", "--ac_interval", "2"], "--offload 1 needs every block "
     "checkpointed (--ac_interval 1, not 2)"),
    (["--base_dtype", "fp8"], "--base_dtype 'fp8': expected one of auto, float8"),
]


def check_memory_user_error(run, folder, clip, flags, says, tmp_path):
    """check_user_error of the model of a memory_folder, its data and the `clip` flags + `flags`."""
    base = [*folder["model"], "--data", folder["data"], "--out_dir", str(tmp_path / "o"), *clip]
    check_user_error(run, [*base, *flags], says, tmp_path / "o")


def check_refused_with_two_processes(run, common, tmp_path):
    """The LoRA run of the `common` flags with --offload 1 on 2 processes stops with its one-process error."""
    p = run_script(run.script, [*common, "--out_dir", str(tmp_path / "o"), "--offload", "1"], nproc=2, check=False)
    assert p.returncode != 0 and "error: --base_dtype float8 and --offload 1 are for one-process LoRA runs" in \
        p.stderr, p.stderr[-2000:]


# ---- sequence parallelism: a DiT split over 2 processes against itself whole (tests/test_*_sp.py; each rank runs
# under tests/procs.py spawn_gloo)


def o1_weights(model, std=0.2):
    """Every weight O(1)-effect (normal, `std`): a zero-init head or modulation must not hide a wrong split."""
    with torch.no_grad():
        for p in model.parameters():
            p.normal_(0, std)
    return model


def check_split_equals_whole(model, forward, weight, outputs="close", partial=False, unused=False, needs=()):
    """In each rank of a 2-process group, the same fp32 `model` and inputs on every rank: forward(model) whole, then
    split (model.sp = common/sp.py new_groups(2)): the same output (`outputs` "close": torch.testing.assert_close at
    1e-5; "relative": the max error over the whole's largest under 1e-5), and the gradients of (output * weight).sum(),
    a rank's summed over the group, equal the whole model's to a max error relative to its largest under 1e-5 (fp32
    summation order only). Every parameter gets a gradient, unless `unused`: then the same ones in both, `needs`
    among them, and a zero whole gradient is compared absolutely. `partial`: no rank's own gradient is the whole."""
    import torch.distributed as dist

    from common import sp
    whole = forward(model)
    (whole * weight).sum().backward()
    ref = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
    assert unused or set(ref) == {n for n, _ in model.named_parameters()}, "a parameter without a gradient"
    assert all(n in ref for n in needs), [n for n in needs if n not in ref]
    model.zero_grad(set_to_none=True)
    model.sp = sp.new_groups(2)
    split = forward(model)
    assert split.shape == whole.shape
    if outputs == "close":
        torch.testing.assert_close(split, whole, rtol=1e-5, atol=1e-5)
    else:
        err = (split - whole).abs().max().item() / whole.abs().max().item()
        assert err < 1e-5, err
    (split * weight).sum().backward()
    assert {n for n, p in model.named_parameters() if p.grad is not None} == set(ref)
    for n, p in model.named_parameters():
        if p.grad is None:  # `unused` only: none in the whole model either
            continue
        g = p.grad.clone()
        dist.all_reduce(g)  # each rank: the part through its tokens; the group's sum: the whole gradient
        scale = ref[n].abs().max().item()
        assert scale or unused, (n, "a zero gradient")
        err = (g - ref[n]).abs().max().item() / (scale or 1.0)
        assert err < 1e-5, (n, err)
        if partial:
            assert not torch.allclose(p.grad, ref[n], rtol=1e-3, atol=1e-3), n  # one rank alone holds only a part


def fp8_scaled(sd, prefix):
    """ComfyUI's fp8_scaled layout (of any DiT whose blocks are `blocks.N`): each 2-d block weight in float8_e4m3fn with a per-tensor fp32 .scale_weight and
    a .scale_input, the unprefixed `scaled_fp8` marker, the rest as it is (fp32 here), all but the marker prefixed.
    -> (the file's tensors, {key: the dequantized weight the loader must give})."""
    out, want = {"scaled_fp8": torch.empty(0, dtype=torch.float8_e4m3fn)}, {}
    for k, v in sd.items():
        if k.startswith("blocks.") and k.endswith(".weight") and v.dim() == 2:
            scale = v.abs().max() / 448
            w8 = (v / scale).to(torch.float8_e4m3fn)
            out[prefix + k], out[prefix + k[:-len("weight")] + "scale_weight"] = w8, scale.reshape(())
            out[prefix + k[:-len("weight")] + "scale_input"] = torch.ones(())
            want[k] = w8.float() * scale
        else:
            out[prefix + k], want[k] = v.contiguous(), v
    return out, want
