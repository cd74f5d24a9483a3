"""Encode every sample once (VAE latents + text embedding) into one safetensors file, so training never holds the
VAE or the text encoder. Model-agnostic: the training script passes the encoders in as plain callables.

    entries, todo = cache_entries(records, cache_dir, settings)  # what is there; todo: how many are still missing
    entries = encode_dataset(records, encode_video, encode_text, cache_dir, settings)  # encodes what is missing
    tensors, meta = load_entry(entry["file"])                 # {"latents": (C, f, h, w), "text": (L, D)}, metadata
    batch = load_batch([e["file"] for e in entries_of_one_batch], pin=True)  # {"latents": (B, C, f, h, w), ...}

The caller builds the encoders only if todo > 0 on some rank, then calls encode_dataset.

encode_video(video) gets float32 (1, 3, F, H, W) in [-1, 1] on the CPU (moving it to the GPU is the caller's job)
and returns a (1, ...) tensor or a dict of them; encode_text(["caption"]) likewise. They are called under
torch.no_grad(). The batch dim is dropped in the file; a dict {"mu": ..} is stored as "latents.mu" / "text.mu".
An entry is its record (data/dataset.py) plus "file" (the safetensors path) and "key". A record with a
"reference" (data/dataset.py: IC-LoRA's conditioning clip) also gets that clip, read at the record's start, bucket
and fps ("frames" of them: 1 for an image) and encoded by encode_reference (default encode_video), as "reference"
(a dict: "reference.<key>"); a reference that fails to decode marks the sample known-bad ("reference corrupt").

Cache key (the file name): sha1 over (sha1 of the source file's bytes, clip start, bucket, fps, caption, settings,
and with a reference the sha1 of its bytes and its frame count).
`settings` is whatever the script says changes the encoding (model name, VAE version, dtype, ...); it must be
JSON-serialisable. So a re-run skips what is done, and an edited video, caption or setting gets a new file (the old
one is left behind; delete the folder to reclaim space). The path is not in the key, so moving the data keeps the
cache. Hashing a large dataset means reading all of it, so file hashes are remembered in cache_dir/file_sha1.json
by (path, size, mtime); a file rewritten in place gets a new mtime and is hashed again.

Known-bad clips. The probe (data/dataset.py) decodes one frame only, so a clip can still fail to decode here. It
is then remembered as cache_dir/<key>.bad.json ({"path", "start", "reason", "detail"}), so a restart neither
decodes it again nor needs the encoders for it; cache_entries lists each such clip at every start with one line
"skip PATH: corrupt (detail)", and encode_dataset lists the clips that fail in it.

Under torch.distributed (when initialised) each rank hashes and encodes its share (i::world of what is missing);
cache_dir must then be on a filesystem all ranks see. Which entries are cached, known-bad or missing is decided by
rank 0 alone (one listing of cache_dir) and broadcast: NFS caches file attributes per client, so ranks asking
os.path.exists could disagree, and the batch sampler needs one list. At the end of encode_dataset every rank's
outcomes (encoded / failed) are all-gathered and applied to that list, the same way on every rank. Each file is
written under a temporary name in the same folder and renamed (os.replace is atomic), so a crash never leaves a
half-written entry.
"""
import hashlib
import json
import os

import torch
import torch.distributed as dist
from safetensors import safe_open
from safetensors.torch import save_file
from tqdm import tqdm

from data.util import from_rank0, rank_world, read_json, tmp_tag, write_json
from data.video import read_clip

_SHA1 = {}  # (path, size, mtime_ns) -> sha1, for this process


def file_sha1(path, chunk=1 << 22):
    h = hashlib.sha1()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(chunk), b""):  # 4 MB at a time: videos can be larger than memory
            h.update(block)
    return h.hexdigest()


def _file_hashes(paths, cache_dir):
    """{path: sha1} for the unique paths; remembered in memory and in cache_dir/file_sha1.json."""
    memo_file = os.path.join(cache_dir, "file_sha1.json")
    disk = read_json(memo_file, {})
    stamps = {p: (os.stat(p).st_size, os.stat(p).st_mtime_ns) for p in sorted(set(paths))}
    for p, (size, mtime) in stamps.items():
        if p in disk and disk[p][:2] == [size, mtime]:
            _SHA1[(p, size, mtime)] = disk[p][2]
    todo = [p for p, st in stamps.items() if (p, *st) not in _SHA1]
    rank, world = rank_world()
    mine = {p: file_sha1(p) for p in tqdm(todo[rank::world], desc="hashing", disable=rank != 0 or len(todo) < 100)}
    if world > 1:
        parts = [None] * world
        dist.all_gather_object(parts, mine)
        mine = {p: h for part in parts for p, h in part.items()}
    for p, h in mine.items():
        _SHA1[(p, *stamps[p])] = h
    out = {p: _SHA1.get((p, *st)) or file_sha1(p) for p, st in stamps.items()}  # `or`: ranks saw different memos
    if todo and rank == 0:
        disk.update({p: [*stamps[p], h] for p, h in out.items()})
        write_json(memo_file, disk)
    return out


def _all_entries(records, cache_dir, settings):
    # the key leaves out the path (moving the data keeps the cache) and "source"/"repeats" (how often a sample is
    # seen does not change its encoding)
    sha1 = _file_hashes([r["path"] for r in records] + [r["reference"]["path"] for r in records if "reference" in r],
                        cache_dir)
    entries = []
    for r in records:
        ref = {"reference": dict(sha1=sha1[r["reference"]["path"]], frames=r["reference"]["frames"])} \
            if "reference" in r else {}  # (a record without one keeps the key it always had)
        blob = json.dumps(dict(sha1=sha1[r["path"]], start=r["start"], bucket=r["bucket"], fps=r["fps"],
                               caption=r["caption"], settings=settings, **ref), sort_keys=True)
        key = hashlib.sha1(blob.encode()).hexdigest()
        entries.append(dict(r, key=key, file=os.path.join(cache_dir, key + ".safetensors"), sha1=sha1[r["path"]]))
    return entries


def _bad_file(cache_dir, key):
    return os.path.join(cache_dir, key + ".bad.json")


def _status(entries, cache_dir):
    """Per entry "cached", "todo" or its known-bad marker {"path", "start", "reason", "detail"}: rank 0 looks (one
    listing of the folder, not a stat per entry) and every rank gets its answer."""
    status = None
    if rank_world()[0] == 0:
        names, status = set(os.listdir(cache_dir)), []
        for e in entries:
            if e["key"] + ".safetensors" in names:
                status.append("cached")
            elif e["key"] + ".bad.json" in names:
                status.append(read_json(_bad_file(cache_dir, e["key"]), "todo"))  # unreadable marker: try again
            else:
                status.append("todo")
    return from_rank0(status)


def _skip_line(bad):
    return f"skip {bad['path']}: {bad['reason']} ({bad['detail']})"


def cache_entries(records, cache_dir, settings, log=print):
    """-> (the entries (record + "file", "key") of `records` that are already cached, in the order of `records`;
    todo = how many records are neither cached nor known-bad). Lists each known-bad clip (rank 0)."""
    os.makedirs(cache_dir, exist_ok=True)
    entries = _all_entries(records, cache_dir, settings)
    status = _status(entries, cache_dir)
    done = [e for e, st in zip(entries, status) if st == "cached"]
    bad = [st for st in status if isinstance(st, dict)]
    if rank_world()[0] == 0:
        for b in bad:
            log(_skip_line(b))
    todo = len(entries) - len(done) - len(bad)
    if len(done) < len(entries):
        log(f"cache {cache_dir}: {len(done)} of {len(entries)} samples cached, {len(bad)} known bad, {todo} to encode")
    return done, todo


def _flat(x, name):
    """(1, ...) tensor or dict of them -> {name or name.key: tensor without the batch dim}."""
    items = x.items() if isinstance(x, dict) else [(None, x)]
    out = {}
    for k, t in items:
        assert torch.is_tensor(t) and t.shape[0] == 1, f"{name}: the encoder must return (1, ...) tensors"
        # clone: views of one storage (mu and logvar from one chunk) would make safetensors refuse to save
        out[name if k is None else f"{name}.{k}"] = t[0].detach().cpu().clone()
    return out


def encode_dataset(records, encode_video, encode_text, cache_dir, settings, log=print, encode_reference=None):
    """Encode the records that are neither cached nor known-bad (this rank's share), wait for all ranks, return all
    entries that are cached now, in the order of `records`. A clip that fails to decode is marked known-bad
    (<key>.bad.json), listed (by rank 0, whichever rank hit it) and left out. encode_reference: the encoder of the
    records' references (None: encode_video)."""
    os.makedirs(cache_dir, exist_ok=True)
    rank, world = rank_world()
    entries = _all_entries(records, cache_dir, settings)
    status = _status(entries, cache_dir)  # rank 0's view, the same on every rank
    # one encoding per key: a clip listed twice with the same caption (a jsonl that repeats a line) is one entry, so
    # no two ranks write the same file at once
    first = {}  # key -> the first index that has it
    for i, st in enumerate(status):
        if st == "todo":
            first.setdefault(entries[i]["key"], i)
    todo = sorted(first.values())
    done_here = {}  # entry index -> "cached" or its bad marker, for this rank's share
    last_caption, last_text = None, None
    for i in tqdm(todo[rank::world], desc=f"encoding (rank {rank})", disable=rank != 0):
        e = entries[i]
        H, W, F = e["bucket"]
        ref = e.get("reference")
        reading = (e["start"], F, "corrupt", "")  # what was being read: for the known-bad marker
        try:
            video = read_clip(e["path"], e["start"], F, e["fps"], (H, W))  # (3, F, H, W)
            if ref:  # at the clip's start, size and rate: frame k of the reference goes with frame k of the clip
                start = e["start"] if ref["frames"] > 1 else 0.0  # an image: its one frame
                reading = (start, ref["frames"], "reference corrupt", ref["path"] + ": ")
                ref_video = read_clip(ref["path"], start, ref["frames"], e["fps"], (H, W))
        except Exception as ex:  # the probe decodes one frame only; the rest can still be broken
            start, n, reason, who = reading
            done_here[i] = dict(path=e["path"], start=e["start"], reason=reason,
                                detail=f"{who}decoding {n} frames from {start:.3f}s: {ex}")
            write_json(_bad_file(cache_dir, e["key"]), done_here[i])
            continue
        with torch.no_grad():
            tensors = _flat(encode_video(video[None]), "latents")
            if ref:
                tensors.update(_flat((encode_reference or encode_video)(ref_video[None]), "reference"))
            if e["caption"] != last_caption:  # clips of one video are consecutive and share the caption
                last_caption, last_text = e["caption"], _flat(encode_text([e["caption"]]), "text")
        tensors.update(last_text)
        meta = dict(path=e["path"], caption=e["caption"], start=repr(e["start"]), bucket=json.dumps(e["bucket"]),
                    fps=repr(e["fps"]), sha1=e["sha1"], settings=json.dumps(settings, sort_keys=True),
                    **({"reference": ref["path"]} if ref else {}))
        tmp = os.path.join(cache_dir, f".{e['key']}.{tmp_tag()}.tmp")
        save_file(tensors, tmp, metadata=meta)
        os.replace(tmp, e["file"])
        done_here[i] = "cached"
    encoded = sum(v == "cached" for v in done_here.values())
    outcome = done_here
    if world > 1:
        # Wait for every rank and collect what each one wrote, rather than listing the folder again: on NFS rank 0
        # could still miss a file another rank has just written. Rank 0's view plus these outcomes is one list.
        parts = [None] * world
        dist.all_gather_object(parts, done_here)
        outcome = {i: v for part in parts for i, v in part.items()}
    if rank == 0:
        for i in sorted(outcome):
            if isinstance(outcome[i], dict):  # failed just now, on any rank
                log(_skip_line(outcome[i]))
    by_key = {entries[i]["key"]: v for i, v in outcome.items()}  # and its duplicates share it
    status = [by_key.get(e["key"], st) if st == "todo" else st for e, st in zip(entries, status)]
    done = [e for e, st in zip(entries, status) if st == "cached"]
    n_bad = sum(isinstance(st, dict) for st in status)
    log(f"cache {cache_dir}: {len(done)} of {len(entries)} samples cached, {n_bad} known bad "
        f"({encoded} encoded on rank {rank})")
    return done


def load_entry(file, device="cpu"):
    """-> (tensors {"latents": (C, f, h, w), "text": (L, D), ...}, metadata with start/fps/bucket/settings parsed).
    A damaged entry (cut short by a crash or a full disk after it was written) raises ValueError naming it, and so
    does a missing one: rank 0 listed it or another rank wrote it, so a process that cannot see it has a cache_dir
    that is not shared (a node-local disk on a multi-node run)."""
    try:
        with safe_open(file, "pt", device=str(device)) as f:
            tensors = {k: f.get_tensor(k) for k in f.keys()}
            meta = dict(f.metadata())
        meta.update(start=float(meta["start"]), fps=float(meta["fps"]), bucket=json.loads(meta["bucket"]),
                    settings=json.loads(meta["settings"]))
    except Exception as e:  # noqa: BLE001 -- safetensors' own errors name no file
        if not os.path.exists(file):  # (looked at only on failure: no stat per entry on the loading path)
            raise ValueError(f"cache entry {file} does not exist here, though it was cached (rank 0 listed it or a "
                             "rank wrote it): the cache folder must be on a filesystem every rank of every node sees, "
                             "not a node-local disk") from None
        raise ValueError(f"cache entry {file} is unreadable ({type(e).__name__}: {e}); delete it and run again to "
                         "encode it anew") from None
    return tensors, meta


def load_batch(files, device="cpu", pin=False):
    """Stack the entries of one batch: {"latents": (B, C, f, h, w), "text": (B, L, D), ...}. Same bucket means the
    same latent shape; a tensor whose first dim differs (e.g. unpadded text of varying length) is zero-padded
    to the longest and "<name>_lens" (B,) gives the true lengths. pin=True: the stacked tensors are in pinned
    (page-locked) memory, so that .to("cuda", non_blocking=True) is a real asynchronous copy; it needs CUDA, so
    without it (or for device != cpu) pin is a no-op."""
    pin = pin and torch.cuda.is_available() and torch.device(device).type == "cpu"
    loaded = [load_entry(f, device)[0] for f in files]
    out = {}
    for k in loaded[0]:
        ts = [t[k] for t in loaded]
        if all(t.shape == ts[0].shape for t in ts):
            # stacked straight into the (pinned) buffer: one copy, not a stack and then a pin
            out[k] = torch.stack(ts, out=torch.empty(len(ts), *ts[0].shape, dtype=ts[0].dtype, device=device,
                                                     pin_memory=pin))
        else:
            n = max(t.shape[0] for t in ts)
            out[k] = torch.zeros(len(ts), n, *ts[0].shape[1:], dtype=ts[0].dtype, device=device, pin_memory=pin)
            for b, t in enumerate(ts):
                out[k][b, :t.shape[0]] = t
            out[k + "_lens"] = torch.tensor([t.shape[0] for t in ts])
    return out
