"""Encode every sample once (VAE latents + text embedding) into one safetensors file, so training never holds the
VAE or the text encoder. Model-agnostic: the training script passes the encoders in as plain callables.

    entries = encode_dataset(records, encode_video, encode_text, cache_dir, settings)  # encodes what is missing
    entries = cache_entries(records, cache_dir, settings)     # what is already there (no encoders needed)
    tensors, meta = load_entry(entry["file"])                 # {"latents": (C, f, h, w), "text": (L, D)}, metadata
    batch = load_batch([e["file"] for e in entries_of_one_batch])   # {"latents": (B, C, f, h, w), "text": (B, L, D)}

encode_video(video) gets float32 (1, 3, F, H, W) in [-1, 1] on the CPU (moving it to the GPU is the caller's job)
and returns a (1, ...) tensor or a dict of them; encode_text(["caption"]) likewise. They are called under
torch.no_grad(). The batch dim is dropped in the file; a dict {"mu": ..} is stored as "latents.mu" / "text.mu".
An entry is its record (data/dataset.py) plus "file" (the safetensors path) and "key".

Cache key (the file name): sha1 over (sha1 of the source file's bytes, clip start, bucket, fps, caption, settings).
`settings` is whatever the script says changes the encoding (model name, VAE version, dtype, ...); it must be
JSON-serialisable. So a re-run skips what is done, and an edited video, caption or setting gets a new file (the old
one is left behind; delete the folder to reclaim space). The path is not in the key, so moving the data keeps the
cache. Hashing a large dataset means reading all of it, so file hashes are remembered in cache_dir/file_sha1.json
by (path, size, mtime); a file rewritten in place gets a new mtime and is hashed again.

Under torch.distributed (when initialised) each rank hashes and encodes its share (i::world) and a barrier waits
for all; cache_dir must then be on a filesystem all ranks see. Each file is written under a temporary name in
the same folder and renamed (os.replace is atomic), so a crash never leaves a half-written entry.
"""
import hashlib
import json
import os

import torch
import torch.distributed as dist
from safetensors import safe_open
from safetensors.torch import save_file
from tqdm import tqdm

from data.video import read_clip

_SHA1 = {}  # (path, size, mtime_ns) -> sha1, for this process


def _dist():
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


def file_sha1(path, chunk=1 << 22):
    h = hashlib.sha1()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(chunk), b""):  # 4 MB at a time: videos can be larger than memory
            h.update(block)
    return h.hexdigest()


def _file_hashes(paths, cache_dir):
    """{path: sha1} for the unique paths; remembered in memory and in cache_dir/file_sha1.json."""
    memo_file = os.path.join(cache_dir, "file_sha1.json")
    try:
        with open(memo_file) as f:
            disk = json.load(f)
    except (OSError, ValueError):
        disk = {}
    stamps = {p: (os.stat(p).st_size, os.stat(p).st_mtime_ns) for p in sorted(set(paths))}
    for p, (size, mtime) in stamps.items():
        if p in disk and disk[p][:2] == [size, mtime]:
            _SHA1[(p, size, mtime)] = disk[p][2]
    todo = [p for p, st in stamps.items() if (p, *st) not in _SHA1]
    rank, world = _dist()
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
        _write_json(memo_file, disk)
    return out


def _write_json(path, obj):
    tmp = os.path.join(os.path.dirname(path), f".{os.path.basename(path)}.{os.getpid()}.tmp")
    with open(tmp, "w") as f:
        json.dump(obj, f)
    os.replace(tmp, path)


def _all_entries(records, cache_dir, settings):
    sha1 = _file_hashes([r["path"] for r in records], cache_dir)
    entries = []
    for r in records:
        blob = json.dumps(dict(sha1=sha1[r["path"]], start=r["start"], bucket=r["bucket"], fps=r["fps"],
                               caption=r["caption"], settings=settings), sort_keys=True)
        key = hashlib.sha1(blob.encode()).hexdigest()
        entries.append(dict(r, key=key, file=os.path.join(cache_dir, key + ".safetensors"), sha1=sha1[r["path"]]))
    return entries


def cache_entries(records, cache_dir, settings, log=print):
    """The entries (record + "file", "key") of `records` that are already cached, in the order of `records`."""
    os.makedirs(cache_dir, exist_ok=True)
    entries = _all_entries(records, cache_dir, settings)
    done = [e for e in entries if os.path.exists(e["file"])]
    if len(done) < len(entries):
        log(f"cache {cache_dir}: {len(done)} of {len(entries)} samples cached")
    return done


def _flat(x, name):
    """(1, ...) tensor or dict of them -> {name or name.key: tensor without the batch dim}."""
    items = x.items() if isinstance(x, dict) else [(None, x)]
    out = {}
    for k, t in items:
        assert torch.is_tensor(t) and t.shape[0] == 1, f"{name}: the encoder must return (1, ...) tensors"
        # clone: views of one storage (mu and logvar from one chunk) would make safetensors refuse to save
        out[name if k is None else f"{name}.{k}"] = t[0].detach().cpu().clone()
    return out


def encode_dataset(records, encode_video, encode_text, cache_dir, settings, log=print):
    """Encode the records that are not cached yet (this rank's share), wait for all ranks, return all entries
    that are cached now. A clip that fails to decode is reported and left out."""
    os.makedirs(cache_dir, exist_ok=True)
    rank, world = _dist()
    entries = _all_entries(records, cache_dir, settings)
    todo = [e for e in entries[rank::world] if not os.path.exists(e["file"])]
    last_caption, last_text = None, None
    for e in tqdm(todo, desc=f"encoding (rank {rank})", disable=rank != 0):
        H, W, F = e["bucket"]
        try:
            video = read_clip(e["path"], e["start"], F, e["fps"], (H, W))  # (3, F, H, W)
        except Exception as ex:  # the probe decodes one frame only; the rest can still be broken
            log(f"skip {e['path']}: corrupt (decoding {F} frames from {e['start']:.3f}s: {ex})")
            continue
        with torch.no_grad():
            tensors = _flat(encode_video(video[None]), "latents")
            if e["caption"] != last_caption:  # clips of one video are consecutive and share the caption
                last_caption, last_text = e["caption"], _flat(encode_text([e["caption"]]), "text")
        tensors.update(last_text)
        meta = dict(path=e["path"], caption=e["caption"], start=repr(e["start"]), bucket=json.dumps(e["bucket"]),
                    fps=repr(e["fps"]), sha1=e["sha1"], settings=json.dumps(settings, sort_keys=True))
        tmp = os.path.join(cache_dir, f".{e['key']}.{os.getpid()}.tmp")
        save_file(tensors, tmp, metadata=meta)
        os.replace(tmp, e["file"])
    if world > 1:
        dist.barrier()  # every rank's share is on disk before anyone lists the cache
    done = [e for e in entries if os.path.exists(e["file"])]
    log(f"cache {cache_dir}: {len(done)} of {len(entries)} samples cached ({len(todo)} encoded on rank {rank})")
    return done


def load_entry(file, device="cpu"):
    """-> (tensors {"latents": (C, f, h, w), "text": (L, D), ...}, metadata with start/fps/bucket/settings parsed)."""
    with safe_open(file, "pt", device=str(device)) as f:
        tensors = {k: f.get_tensor(k) for k in f.keys()}
        meta = dict(f.metadata())
    meta.update(start=float(meta["start"]), fps=float(meta["fps"]), bucket=json.loads(meta["bucket"]),
                settings=json.loads(meta["settings"]))
    return tensors, meta


def load_batch(files, device="cpu"):
    """Stack the entries of one batch: {"latents": (B, C, f, h, w), "text": (B, L, D), ...}. Same bucket means the
    same latent shape; a tensor whose first dim differs (e.g. unpadded text of varying length) is zero-padded
    to the longest and "<name>_lens" (B,) gives the true lengths."""
    loaded = [load_entry(f, device)[0] for f in files]
    out = {}
    for k in loaded[0]:
        ts = [t[k] for t in loaded]
        if all(t.shape == ts[0].shape for t in ts):
            out[k] = torch.stack(ts)
        else:
            n = max(t.shape[0] for t in ts)
            out[k] = torch.stack([torch.cat([t, t.new_zeros(n - t.shape[0], *t.shape[1:])]) for t in ts])
            out[k + "_lens"] = torch.tensor([t.shape[0] for t in ts])
    return out
