"""Which samples go in which optimizer step, on which rank, in which order: deterministic and resumable.

    train, val = split_val(entries, val=0.05, seed=0)             # held out by source file, chosen by seed
    train = with_repeats(train)                                    # a source's "*N": its samples N times
    buckets = [batch_key(e) for e in train]                        # (H, W, F), + a reference's frames
    state = {"epoch": 0, "pos": 0}                                 # restore it from the checkpoint to resume
    for micro_batches, state in batches(buckets, global_batch=8, micro_batch=2, rank=rank, world=world,
                                        seed=seed, state=state):
        for micro, idx in enumerate(micro_batches):                # accum = 8 // (2 * world) micro-batches
            batch = load_batch([train[i]["file"] for i in idx])    # data/cache.py
            # sample j of it is sample (micro * world + rank) * micro_batch + j of the step's global batch
        ...                                                        # optimizer step; save `state` with it

An epoch's plan is a pure function of (seed, epoch, buckets, global_batch): shuffle the samples of each bucket,
cut them into global batches (every step holds ONE bucket, on all ranks: one latent shape, no padding, and no
rank waits for another's 81-frame clip while it holds an image), shuffle the steps. A bucket's last, incomplete
global batch is filled up with samples from the start of that bucket (wrap, not drop: a bucket smaller than the
global batch would otherwise never be seen). Global batch -> ranks: sample j belongs to global micro-batch
j // micro_batch, and rank r takes micro-batches r, r + world, r + 2*world, ... So the samples of a step, and the
index of each in its global batch, do not depend on the world size: a run resumed on another number of ranks
(same global_batch) continues exactly.

`state` is {"epoch", "pos"}: pos = steps taken in that epoch. batches() does not modify it; each step comes with
the state after it, a fresh dict, so a prefetcher may run ahead while the trainer saves the state of the last
step it trained; batches(..., state=that) continues with exactly the next step.
"""
import collections
import random


def batch_key(entry):
    """What the samples of one step share, so that they stack: the bucket (H, W, F), and with a reference
    (data/dataset.py: IC-LoRA) its frame count, which is 1 for an image whatever F is."""
    ref = entry.get("reference")
    return tuple(entry["bucket"]) + ((ref["frames"],) if ref else ())


def split_val(entries, val, seed):
    """Split into (train, val) by source file, so clips of one video never sit on both sides. `val` < 1 is a
    fraction of the files, >= 1 a number of files. val > 0 holds out at least one file, and at least one file
    stays in train. The input order is kept on both sides."""
    paths = sorted({e["path"] for e in entries})
    n = round(val * len(paths)) if val < 1 else int(val)
    n = max(1 if val > 0 else 0, min(n, len(paths) - 1))
    held = set(random.Random(f"val-{seed}").sample(paths, n))  # string seeds hash the same in every process
    return [e for e in entries if e["path"] not in held], [e for e in entries if e["path"] in held]


def with_repeats(entries):
    """Each entry `entry["repeats"]` times (once without the field), in order: a source given as "stills/*3" is
    seen 3 times per epoch. Apply it to the training split, after split_val (a repeat must not land in val)."""
    return [e for e in entries for _ in range(e.get("repeats", 1))]


def _groups(buckets, size, rng):
    """Cut each bucket's sample indices (shuffled by rng, unless None) into groups of `size`, the last one filled
    by wrapping to the bucket's start. -> [[index, ...], ...], bucket by bucket in sorted bucket order."""
    by_bucket = collections.defaultdict(list)
    for i, b in enumerate(buckets):
        by_bucket[b].append(i)
    out = []
    for b in sorted(by_bucket):  # sorted: the plan must not depend on dict order
        idx = by_bucket[b]
        if rng is not None:
            rng.shuffle(idx)
        pad = -len(idx) % size
        idx = idx + (idx * (pad // len(idx) + 1))[:pad]  # wrap: fill the last group from the bucket's start
        out += [idx[j:j + size] for j in range(0, len(idx), size)]
    return out


def epoch_plan(buckets, global_batch, seed, epoch):
    """-> plan[step] = the global batch of that step: `global_batch` sample indices, all from one bucket."""
    rng = random.Random(f"{seed}-{epoch}")  # a string seed: the same in every process and Python version
    plan = _groups(buckets, global_batch, rng)
    rng.shuffle(plan)
    return plan


def batches(buckets, global_batch, micro_batch, rank, world, seed, state):
    """Yield (micro_batches, state_after) forever, one item per optimizer step: micro_batches is this rank's
    accum = global_batch // (micro_batch * world) lists of `micro_batch` indices into `buckets`, state_after the
    {"epoch", "pos"} that resumes with the next step. `state` is not modified."""
    assert buckets, "no samples to batch"
    assert global_batch % (micro_batch * world) == 0, \
        f"global_batch {global_batch} must be a multiple of micro_batch * world = {micro_batch} * {world}"
    epoch, pos = state["epoch"], state["pos"]
    while True:
        plan = epoch_plan(buckets, global_batch, seed, epoch)
        while pos < len(plan):
            step = plan[pos]
            micro = [step[m:m + micro_batch] for m in range(0, global_batch, micro_batch)]  # global micro-batches
            pos += 1
            after = {"epoch": epoch, "pos": pos} if pos < len(plan) else {"epoch": epoch + 1, "pos": 0}
            yield micro[rank::world], after
        epoch, pos = epoch + 1, 0


def val_batches(buckets, micro_batch, rank, world):
    """This rank's validation micro-batches: fixed order, one pass. Micro-batches of one bucket each, wrapped as
    in training and padded (by wrapping the list) to a multiple of world, dealt round-robin: every rank gets the
    same number, so none waits in a collective for a batch that never comes."""
    out = _groups(buckets, micro_batch, None)
    out += (out * (world // max(len(out), 1) + 1))[:-len(out) % world]  # wrap to a multiple of world
    return out[rank::world]
