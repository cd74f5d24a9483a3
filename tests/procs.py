"""Running a train_*.py script as a user does (a subprocess, one process or torchrun), for every model's tests."""
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


def records(out):
    """{step: the log.jsonl record of that step's loss line} of a run folder."""
    return {r["step"]: r for r in read_log(out) if "loss" in r}


def losses(out):
    return {s: r["loss"] for s, r in records(out).items()}


def close(a, b, tol=1e-4):
    return abs(a - b) <= tol * max(1.0, abs(a))
