"""Which samples go in which batch, on which rank, in which order: deterministic and resumable.

    train, val = split_val(entries, val=0.05, seed=0)             # held out by source file, chosen by seed
    buckets = [tuple(e["bucket"]) for e in train]
    state = {"epoch": 0, "pos": 0}                                 # save it in the checkpoint; restore it to resume
    for idx in batches(buckets, micro_batch=2, rank=rank, world=world, seed=seed, state=state):
        batch = load_batch([train[i]["file"] for i in idx])        # data/cache.py

An epoch's plan is a pure function of (seed, epoch, buckets, micro_batch, world): shuffle the samples of each
bucket, cut them into micro-batches (every batch holds ONE bucket, so one latent shape and no padding), shuffle
the batches, deal them out round-robin to the ranks. A bucket's last, incomplete batch is filled up with samples
from the start of that bucket (wrap, not drop: a bucket smaller than micro_batch would otherwise never be seen),
and the batch list is padded the same way to a multiple of `world`, so every rank gets the same number of
batches per epoch and no rank waits in a collective for a batch that never comes.

`state` is {"epoch", "pos"}: pos = micro-batches this rank has taken in this epoch (the same on every rank).
batches() advances it in place before each yield, so the state saved after training on a batch, passed to a new
batches() call, continues with exactly the batch an uninterrupted run would take next. Resume with the same
seed, micro_batch and world size (and the same entries), or the plan differs.
"""
import collections
import random


def split_val(entries, val, seed):
    """Split into (train, val) by source file, so clips of one video never sit on both sides. `val` < 1 is a
    fraction of the files, >= 1 a number of files. val > 0 holds out at least one file, and at least one file
    stays in train. The input order is kept on both sides."""
    paths = sorted({e["path"] for e in entries})
    n = round(val * len(paths)) if val < 1 else int(val)
    n = max(1 if val > 0 else 0, min(n, len(paths) - 1))
    held = set(random.Random(f"val-{seed}").sample(paths, n))  # string seeds hash the same in every process
    return [e for e in entries if e["path"] not in held], [e for e in entries if e["path"] in held]


def epoch_plan(buckets, micro_batch, world, seed, epoch, shuffle=True):
    """-> plan[step][rank] = list of `micro_batch` sample indices, all from one bucket."""
    rng = random.Random(f"{seed}-{epoch}")
    groups = collections.defaultdict(list)
    for i, b in enumerate(buckets):
        groups[b].append(i)
    out = []
    for b in sorted(groups):  # sorted: the plan must not depend on dict order
        idx = groups[b]
        if shuffle:
            rng.shuffle(idx)
        pad = -len(idx) % micro_batch
        idx = idx + (idx * (pad // len(idx) + 1))[:pad]  # wrap: fill the last batch from the bucket's start
        out += [idx[j:j + micro_batch] for j in range(0, len(idx), micro_batch)]
    if shuffle:
        rng.shuffle(out)
    out += (out * (world // max(len(out), 1) + 1))[:-len(out) % world]  # wrap to a multiple of world
    return [out[s:s + world] for s in range(0, len(out), world)]


def batches(buckets, micro_batch, rank, world, seed, state):
    """Yield this rank's micro-batches (lists of indices into `buckets`) forever, updating `state` in place."""
    assert buckets, "no samples to batch"
    while True:
        plan = epoch_plan(buckets, micro_batch, world, seed, state["epoch"])
        while state["pos"] < len(plan):
            idx = plan[state["pos"]][rank]
            state["pos"] += 1
            yield idx
        state["epoch"], state["pos"] = state["epoch"] + 1, 0


def val_batches(buckets, micro_batch, rank, world):
    """This rank's validation micro-batches: fixed order, one pass (same padding rules as training)."""
    return [step[rank] for step in epoch_plan(buckets, micro_batch, world, seed=0, epoch=0, shuffle=False)]
