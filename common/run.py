"""The run folder belongs to one run. A new run never writes into a folder that holds another run (its checkpoints
would be pruned by --keep, a later --resume would load the wrong one, its log would be appended to), and
`--resume 1` continues only the run that the folder holds, with the same data, seed and batch sizes.

    <out_dir>/run.json   {"fingerprint": {...}}: what must not change across a resume, written at the first start

    claim(out_dir, resume)                     # before any work: refuse a folder that holds another run
    start_or_resume(out_dir, fingerprint, resume)   # after the data is known: compare, write run.json
"""
import json
import os

from common.args import UserError

RUN_FILES = ("run.json", "log.jsonl", "checkpoints", "model.safetensors", "lora.safetensors")


def holds_a_run(out_dir):
    """The run files in out_dir (empty if none)."""
    return [f for f in RUN_FILES if os.path.exists(os.path.join(out_dir, f))]


def claim(out_dir, resume):
    """Refuse to start a new run in a folder that holds one. With --resume 1 any folder is fine (an empty or
    missing one starts fresh: a requeued cluster job always passes --resume 1)."""
    found = holds_a_run(out_dir)
    if found and not resume:
        raise UserError(f"{out_dir} already holds a run ({', '.join(found)}): pass --resume 1 to continue it, or "
                        f"another --out_dir for a new run")


def differences(old, new):
    return [f"{k} was {old.get(k)!r}, now {new.get(k)!r}" for k in sorted(set(old) | set(new))
            if old.get(k) != new.get(k)]


def start_or_resume(out_dir, fingerprint, resume, rank):
    """Compare `fingerprint` (JSON-able dict) with the folder's run.json on --resume (refusing with every
    difference named), and write run.json on a first start (rank 0)."""
    path = os.path.join(out_dir, "run.json")
    if os.path.exists(path):
        with open(path) as f:
            old = json.load(f)["fingerprint"]
        diff = differences(old, json.loads(json.dumps(fingerprint)))
        if diff:
            raise UserError(f"--resume 1: {out_dir} holds a run with other settings: {'; '.join(diff)}. Resume "
                            f"with the same ones, or start a new run in another --out_dir")
        return
    if rank == 0:
        os.makedirs(out_dir, exist_ok=True)
        tmp = path + ".tmp"
        with open(tmp, "w") as f:
            json.dump({"fingerprint": fingerprint}, f, indent=1)
        os.replace(tmp, path)
