"""Training checkpoints with torch.distributed.checkpoint (DCP): every rank writes its own shards, and a checkpoint
written with N ranks loads with M. Crash safety: a checkpoint is written to `<name>.tmp`, and only when every rank
has finished is it renamed to `<name>`; a rename is atomic, so `--resume` never sees half a checkpoint. A complete
checkpoint that was damaged later (a shard deleted or truncated, extra.json unreadable) fails `verify` and is
never trained from: `latest_valid` says why and takes the one before.

    <out_dir>/checkpoints/step_00000100/      DCP shards (model = trainable weights only, optimizer, ema) + extra.json
"""
import json
import os
import re
import shutil

import torch.distributed as dist
import torch.distributed.checkpoint as dcp
from torch.distributed.checkpoint.state_dict import (StateDictOptions, get_model_state_dict,
                                                     get_optimizer_state_dict, set_model_state_dict,
                                                     set_optimizer_state_dict)

# Only what trains goes into a checkpoint: with LoRA that is a few MB instead of the whole frozen base, which
# `--ckpt_dir` provides again on resume.
_OPTS = StateDictOptions(ignore_frozen_params=True)
# Loading it back must not ask for the frozen weights: a strict load names every one of them as missing. state["model"]
# holds every trainable tensor, and dcp.load fails on one that the checkpoint lacks, so nothing trainable goes unset.
_LOAD_OPTS = StateDictOptions(ignore_frozen_params=True, strict=False)


def _name(step):
    return f"step_{step:08d}"


def complete_checkpoints(out_dir):
    """Steps of the complete checkpoints in <out_dir>/checkpoints, oldest first (`.tmp` folders are incomplete)."""
    d = os.path.join(out_dir, "checkpoints")
    if not os.path.isdir(d):
        return []
    return sorted(int(m.group(1)) for n in os.listdir(d) if (m := re.fullmatch(r"step_(\d{8})", n)))


def verify(out_dir, step):
    """None if the checkpoint of `step` looks whole, else the reason: extra.json readable and naming this step,
    DCP metadata readable, and every shard file it names present and non-empty."""
    path = os.path.join(out_dir, "checkpoints", _name(step))
    try:
        with open(os.path.join(path, "extra.json")) as f:
            if json.load(f).get("step") != step:
                return "extra.json names another step"
        meta = dcp.FileSystemReader(path).read_metadata()
    except Exception as e:  # missing/garbled extra.json or .metadata
        return f"unreadable ({type(e).__name__}: {e})"
    for info in (meta.storage_data or {}).values():
        f = os.path.join(path, info.relative_path)
        if not os.path.isfile(f) or os.path.getsize(f) < info.offset + info.length:
            return f"shard {info.relative_path} is missing or truncated"
    return None


def latest_valid(out_dir, log=print):
    """The newest step whose checkpoint verifies, or None; each damaged newer one is reported and skipped."""
    for step in reversed(complete_checkpoints(out_dir)):
        why = verify(out_dir, step)
        if why is None:
            return step
        log(f"skip damaged checkpoint {os.path.join(out_dir, 'checkpoints', _name(step))}: {why}")
    return None


def _state(model, optimizer, extra_state):
    state = {"model": get_model_state_dict(model, options=_OPTS),
             "optim": get_optimizer_state_dict(model, optimizer, options=_OPTS)}
    return {**state, **{k: v.state_dict() for k, v in (extra_state or {}).items()}}


def save(out_dir, step, model, optimizer, extra, keep=0, extra_state=None):
    """Write the checkpoint of `step` (collective: every rank calls it). `extra` is a JSON-able dict (step, data
    position, args...); rank 0 writes it. `extra_state`: {name: object with state_dict()/load_state_dict()} saved
    through DCP too (the EMA). Keeps the newest `keep` checkpoints (0 = all): the run folder holds one run only
    (common/run.py), so every checkpoint in it is this run's."""
    root = os.path.join(out_dir, "checkpoints")
    final, tmp = os.path.join(root, _name(step)), os.path.join(root, _name(step) + ".tmp")
    rank = dist.get_rank()
    if rank == 0:
        for n in os.listdir(root) if os.path.isdir(root) else []:  # halves of checkpoints a crash cut short
            if re.fullmatch(r"step_\d{8}\.tmp", n):
                shutil.rmtree(os.path.join(root, n), ignore_errors=True)
        os.makedirs(tmp)
    dist.barrier()
    dcp.save(_state(model, optimizer, extra_state), checkpoint_id=tmp)
    if rank == 0:
        with open(os.path.join(tmp, "extra.json"), "w") as f:
            json.dump(extra, f)
        shutil.rmtree(final, ignore_errors=True)
        os.replace(tmp, final)  # the commit point
        # Only this step and older ones count: a newer one can only be a damaged checkpoint that --resume skipped
        # (latest_valid), from the stretch this run is now training again. It is neither counted, which would prune
        # the checkpoint just written, nor deleted (saving its step again replaces it).
        steps = [s for s in complete_checkpoints(out_dir) if s <= step]
        for s in steps[:-keep] if keep > 0 else []:
            shutil.rmtree(os.path.join(root, _name(s)), ignore_errors=True)
    dist.barrier()
    return final


def load(out_dir, step, model, optimizer, extra_state=None):
    """Restore the trainable weights, the optimizer and `extra_state` from the checkpoint of `step`; returns its
    `extra` dict."""
    path = os.path.join(out_dir, "checkpoints", _name(step))
    state = _state(model, optimizer, extra_state)
    try:
        dcp.load(state, checkpoint_id=path)
    except dcp.api.CheckpointException as e:  # a BaseException: say in one line which checkpoint and why
        raise RuntimeError(f"cannot load checkpoint {path}: {str(e).strip().splitlines()[-1]}") from None
    set_model_state_dict(model, state["model"], options=_LOAD_OPTS)
    set_optimizer_state_dict(model, optimizer, state["optim"], options=_OPTS)
    for k, v in (extra_state or {}).items():
        v.load_state_dict(state[k])
    with open(os.path.join(path, "extra.json")) as f:
        return json.load(f)
