"""Small helpers shared by data/dataset.py and data/cache.py: the process's place in torch.distributed, and JSON
files (memos, markers) that are read leniently and written atomically."""
import json
import os
import socket

import torch.distributed as dist


def rank_world():
    """(rank, world size) under torch.distributed when it is initialised, else (0, 1)."""
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


def from_rank0(obj):
    """Rank 0's `obj` on every rank (the others may pass None). Used where ranks could see the filesystem
    differently (NFS caches file attributes per client) but must act on one answer."""
    if rank_world()[1] == 1:
        return obj
    box = [obj]
    dist.broadcast_object_list(box, src=0)
    return box[0]


def read_json(path, default):
    """The JSON in `path`, or `default` if it is missing or unreadable (a memo is only ever a shortcut)."""
    try:
        with open(path) as f:
            return json.load(f)
    except (OSError, ValueError):
        return default


def tmp_tag():
    """What makes a temporary file name this process's own: host and pid (two nodes can run the same pid)."""
    return f"{socket.gethostname()}.{os.getpid()}"


def write_json(path, obj):
    """Write under a temporary name in the same folder, then rename: os.replace is atomic, so a reader (or a
    crash) never sees half a file."""
    tmp = os.path.join(os.path.dirname(path), f".{os.path.basename(path)}.{tmp_tag()}.tmp")
    with open(tmp, "w") as f:
        json.dump(obj, f)
    os.replace(tmp, path)
