"""Running a train_*.py script as a user does (a subprocess, one process or torchrun), for every model's tests; and
a one-process torch.distributed group for the tests that call the scripts' distributed code in-process."""
import contextlib
import os
import socket
import subprocess
import sys

from common.log import read_log

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def env():
    # one thread per process: two ranks on a 2-core CI machine, and no dependence on thread scheduling
    return dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=ROOT)


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return str(s.getsockname()[1])


@contextlib.contextmanager
def gloo_world_of_one():
    """A gloo process group of one (rank 0, a free local port) for the block, destroyed after it; a group that is
    already there is used as it is and left alone."""
    import torch.distributed as dist
    mine = not dist.is_initialized()
    if mine:
        dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{free_port()}", rank=0, world_size=1)
    try:
        yield
    finally:
        if mine:
            dist.destroy_process_group()


@contextlib.contextmanager
def script_world_of_one():
    """A one-process gloo group made as the scripts make theirs (common/dist.init) for the block, torn down after it
    with the environment variables it set."""
    from common import dist as cdist
    environ = dict(os.environ)
    cdist.init()
    try:
        yield
    finally:
        cdist.cleanup()
        os.environ.clear()
        os.environ.update(environ)


def _gloo_rank(rank, world, port, target, args):
    import torch.distributed as dist
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world)
    try:
        target(*args)
    finally:
        dist.destroy_process_group()


def spawn_gloo(target, *args, nprocs=2):
    """target(*args) in each of `nprocs` spawned processes, all in one gloo group (a free local port) that is
    destroyed after it; a failure in any rank fails the call. `target`: a module-level function (the processes
    import it by name)."""
    import torch.multiprocessing as mp
    mp.spawn(_gloo_rank, args=(nprocs, free_port(), target, args), nprocs=nprocs, join=True)


def script_cmd(script, args, nproc=1):
    """The command line of `python <script> args`, or of torchrun with nproc processes on one node."""
    path = os.path.join(ROOT, script)
    if nproc == 1:
        return [sys.executable, path, *args]
    return [sys.executable, "-m", "torch.distributed.run", f"--nproc_per_node={nproc}", "--master_port", free_port(),
            path, *args]


def run_script(script, args, nproc=1, check=True, timeout=900):
    """Run it to the end; with check, a non-zero exit fails the test with the tail of its output."""
    p = subprocess.run(script_cmd(script, [str(a) for a in args], nproc), cwd=ROOT, env=env(), capture_output=True,
                       text=True, timeout=timeout)
    if check and p.returncode != 0:
        raise AssertionError(f"exit {p.returncode}\n{p.stdout[-3000:]}\n{p.stderr[-3000:]}")
    return p


def script_runner(script):
    """run(*flags, check=True): `script` with these flags, one process, to the end (run_script)."""
    def run(*flags, check=True):
        return run_script(script, flags, check=check)
    run.script = script  # for a check that runs main() in this process (tests/checks.py check_user_error)
    return run


def records(out):
    """{step: the log.jsonl record of that step's loss line} of a run folder."""
    return {r["step"]: r for r in read_log(out) if "loss" in r}


def losses(out):
    return {s: r["loss"] for s, r in records(out).items()}


def close(a, b, tol=1e-4):
    return abs(a - b) <= tol * max(1.0, abs(a))


# A very small toy run, the same for every script: 16x16 pixels, 5 frames at 4 fps (80 tokens per clip with 4x4
# patches), global batch 8 in micro-batches of 4, a log line every step, no samples, no validation.
SMALL = ["--preset", "toy", "--height", "16", "--width", "16", "--frames", "5", "--fps", "4", "--global_batch", "8",
         "--micro_batch", "4", "--log_every", "1", "--sample_prompts", "", "--val_count", "0", "--warmup_steps", "2",
         "--lr", "1e-3", "--lr_schedule", "constant"]


def toy_runner(script, *extra):
    """run(toy, out, *flags, nproc=1): `script` with SMALL (+ the script's own `extra` flags) on the toy dataset of
    the `toy` fixture (conftest.py); run.script is the script, run.args(toy, out, *flags) its argument list."""
    def args(toy, out, *flags):
        return [*SMALL, *extra, "--data", toy["data"], "--cache_dir", toy["cache"], "--out_dir", str(out), *flags]

    def run(toy, out, *flags, nproc=1, check=True, timeout=600):
        return run_script(script, args(toy, out, *flags), nproc=nproc, check=check, timeout=timeout)
    run.script, run.args = script, args  # for a check that starts the process itself (tests/checks.py)
    return run
