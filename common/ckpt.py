"""Training checkpoints with torch.distributed.checkpoint (DCP): every rank writes its own shards, and a checkpoint
written with N ranks loads with M. Crash safety: a checkpoint is written to `<name>.tmp`, and only when every rank
has finished is it renamed to `<name>`; a rename is atomic, so `--resume` never sees half a checkpoint.

    <out_dir>/checkpoints/step_00000100/      DCP shards (model = trainable weights only, optimizer) + extra.json
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


def _name(step):
    return f"step_{step:08d}"


def complete_checkpoints(out_dir):
    """Steps of the complete checkpoints in <out_dir>/checkpoints, oldest first (`.tmp` folders are incomplete)."""
    d = os.path.join(out_dir, "checkpoints")
    if not os.path.isdir(d):
        return []
    return sorted(int(m.group(1)) for n in os.listdir(d) if (m := re.fullmatch(r"step_(\d{8})", n)))


def save(out_dir, step, model, optimizer, extra, keep=0):
    """Write the checkpoint of `step` (collective: every rank calls it). `extra` is a JSON-able dict (step, data
    position, scheduler, args...); rank 0 writes it. Keeps the newest `keep` checkpoints (0 = all)."""
    root = os.path.join(out_dir, "checkpoints")
    final, tmp = os.path.join(root, _name(step)), os.path.join(root, _name(step) + ".tmp")
    rank = dist.get_rank()
    if rank == 0:
        shutil.rmtree(tmp, ignore_errors=True)  # left over from a crash
        os.makedirs(tmp)
    dist.barrier()
    state = {"model": get_model_state_dict(model, options=_OPTS),
             "optim": get_optimizer_state_dict(model, optimizer, options=_OPTS)}
    dcp.save(state, checkpoint_id=tmp)
    if rank == 0:
        with open(os.path.join(tmp, "extra.json"), "w") as f:
            json.dump(extra, f)
        shutil.rmtree(final, ignore_errors=True)
        os.replace(tmp, final)  # the commit point
        steps = complete_checkpoints(out_dir)
        for s in steps[:-keep] if keep > 0 else []:
            shutil.rmtree(os.path.join(root, _name(s)), ignore_errors=True)
    dist.barrier()
    return final


def load(out_dir, step, model, optimizer):
    """Restore the trainable weights and the optimizer from the checkpoint of `step`; returns its `extra` dict."""
    path = os.path.join(out_dir, "checkpoints", _name(step))
    state = {"model": get_model_state_dict(model, options=_OPTS),
             "optim": get_optimizer_state_dict(model, optimizer, options=_OPTS)}
    dcp.load(state, checkpoint_id=path)
    set_model_state_dict(model, state["model"], options=_OPTS)
    set_optimizer_state_dict(model, optimizer, state["optim"], options=_OPTS)
    with open(os.path.join(path, "extra.json")) as f:
        return json.load(f)
