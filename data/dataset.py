"""Find the samples of a dataset and give each one a bucket. No pixels are decoded here beyond one frame per
file (to check it decodes); data/cache.py reads the clips.

    records = load_dataset(data, area=480*832, fps=16, max_frames=81)   # Wan defaults; see the signature
    make_buckets(area, multiple=16, max_ratio=3.0) -> [(H, W), ...]

`data` names one or more sources (folders, .jsonl, .csv), comma-separated, each optionally `*N` for N repeats per
epoch, e.g. "clips/,stills/*3,extra.jsonl": see data/sources.py.

A record is plain JSON-serialisable data (the cache hashes it, checkpoints may store it):
    {"path": absolute path, "caption": str, "start": clip start (s), "clip": index of the clip in its file,
     "bucket": [H, W, F] (pixels, pixels, frames), "fps": the target fps,
     "src": {"width", "height", "frames", "duration", "fps"} of the source file, as probed,
     "source": the source it came from, as written in `data` (without "*N"), "repeats": N (1 if not given),
     with reference=True also "reference": {"path", "frames": F, or 1 for an image}}

References (reference=True: LTX-Video's IC-LoRA trains on a (video, reference video) pair; data/sources.py says
where they are found): every sample must have one, a video covering the clip's frames from its start at the same
fps, or an image; it is resized and cropped to the sample's bucket. Reasons to skip: no reference (none named or
found), missing reference, reference unreadable/corrupt, reference too short (then only the clips it covers).

Bucketing. Spatial buckets are every (H, W) with H and W multiples of `multiple` (Wan: VAE 8 x patch 2 = 16;
LTX: 32), H*W <= `area` and as large as possible for that aspect ratio, between 1:max_ratio and max_ratio:1.
A sample goes to the bucket with the closest aspect ratio (in log space, so 1:2 and 2:1 are equally far from 1:1),
and is resized to cover it and centre-cropped. Frame counts are 1 + frame_step*k (Wan/Hunyuan 4k+1, LTX 8k+1,
Mochi 6k+1), at most `max_frames`; a video gets the largest count its duration holds at the target fps, from its
start. Images (and 1-frame videos) get F = 1 whatever `min_frames` says. A long video gives up to
`clips_per_video` consecutive, non-overlapping clips of that same length (0 = as many as fit).

Bad inputs are skipped with one line each ("skip PATH: REASON (detail)"), then one summary line with counts per
reason. Reasons: missing file, empty file, unreadable, corrupt, no video stream, too short, no caption,
empty caption, caption not utf-8, bad line, no video (a caption with no video/image beside it). If nothing is
usable, ValueError naming `data`. One line per source gives its counts and repeats.
Under torch.distributed rank 0 lists the sources, every rank probes 1/world of the files and the results are
all-gathered, so all ranks hold the same list in the same order (the batch sampler relies on that).

Probing reads every packet's timestamp, which is slow for a large dataset at every start: with `cache_dir`, the
results (and the failures that are about a file's bytes, not I/O errors) are remembered in cache_dir/probe.json by
(absolute path, size, mtime_ns), written atomically by rank 0. A file rewritten in place gets a new mtime and is
probed again.
"""
import collections
import math
import os

import torch.distributed as dist

from data.sources import list_items, parse_sources
from data.util import from_rank0, rank_world, read_json, write_json
from data.video import EPS, MEDIA_EXTS, probe


def make_buckets(area, multiple=16, max_ratio=3.0):
    """All (H, W): multiples of `multiple`, H*W <= area and maximal for the aspect, aspect within max_ratio."""
    m, out = multiple, set()
    for h in range(m, area // m + 1, m):
        w = area // h // m * m  # the widest W that keeps H*W within the area
        if w >= m and max(h / w, w / h) <= max_ratio:
            out |= {(h, w), (w, h)}  # the transpose too: floor rounding is not symmetric
    # the transposes add some (h, w) with a wider (h, w') or taller (h', w) next to them: drop those
    widest, tallest = {}, {}
    for h, w in out:
        widest[h], tallest[w] = max(widest.get(h, 0), w), max(tallest.get(w, 0), h)
    out = {(h, w) for h, w in out if widest[h] == w and tallest[w] == h}
    assert out, f"no bucket of area <= {area} with sides multiple of {multiple}"
    return sorted(out)


def nearest_bucket(height, width, buckets):
    a = math.log(width / height)
    return min(buckets, key=lambda hw: (abs(math.log(hw[1] / hw[0]) - a), -hw[0] * hw[1]))


def frames_available(duration, start, fps):
    """How many output frames start + k/fps fall inside a video of `duration` seconds."""
    return max(0, math.ceil((duration - start) * fps - EPS))


def load_dataset(data, area, fps, max_frames, multiple=16, frame_step=4, min_frames=5, max_ratio=3.0,
                 clips_per_video=1, log=print, cache_dir=None, reference=False, reference_dir=None):
    """Scan `data` and return the list of sample records (see the module docstring), in a fixed order: the
    sources in the order given, each in its listing order. cache_dir: where probe.json lives (None: no memo).
    reference: each sample needs its reference (a folder source's in reference_dir)."""
    rank, world = rank_world()
    # Rank 0 lists the sources and every rank takes its list: ranks that walked a folder themselves could see other
    # files (NFS caches directory listings per client), and the records, merged by index below, would then differ
    # from rank to rank. An error in the listing is raised on every rank.
    listing = from_rank0(_list_sources(data, reference_dir) if rank == 0 else None)
    if isinstance(listing, Exception):
        raise listing
    sources, items = listing  # [(source, repeats)], [(index of its source, item)]
    memo_file = os.path.join(cache_dir, "probe.json") if cache_dir is not None else None
    memo = read_json(memo_file, {}) if memo_file else {}  # path -> {"stamp": [size, mtime_ns], "info" | "error"}
    opts = dict(buckets=make_buckets(area, multiple, max_ratio), fps=fps, max_frames=max_frames,
                frame_step=frame_step, min_frames=min_frames, clips_per_video=clips_per_video, reference=reference)
    mine = {i: _item_records(items[i][1], memo, **opts) for i in range(rank, len(items), world)}
    if world > 1:  # probing opens every file: split it, then share the results
        parts = [None] * world
        dist.all_gather_object(parts, mine)
        mine = {i: r for p in parts for i, r in p.items()}
    per = [([], collections.Counter()) for _ in sources]  # per source: (records, skipped files per reason)
    updates = {}  # new memo values
    for i, (s, item) in enumerate(items):
        r, new = mine[i]
        updates.update(new)
        if isinstance(r, tuple):  # (reason, detail)
            per[s][1][r[0]] += 1
            if rank == 0:
                log(f"skip {item['path']}: {r[0]}" + (f" ({r[1]})" if r[1] else ""))
        else:
            src, repeats = sources[s]
            per[s][0].extend(dict(x, source=src, repeats=repeats) for x in r)
    if memo_file and updates and rank == 0:
        os.makedirs(cache_dir, exist_ok=True)
        write_json(memo_file, {**memo, **updates})
    records = [r for recs, _ in per for r in recs]
    skipped = sum((c for _, c in per), collections.Counter())
    if not records:
        raise ValueError(f"no usable samples in {data}: all {len(items)} files were skipped ({_counts(skipped)})")
    if rank == 0:
        listed = collections.Counter(s for s, _ in items)
        for s, ((src, repeats), (recs, skip)) in enumerate(zip(sources, per)):
            n_files = listed[s] - sum(skip.values())
            log(f"data {src}: {len(recs)} samples from {n_files} files; skipped {sum(skip.values())} files"
                + (f" ({_counts(skip)})" if skip else "") + f"; repeats {repeats}")
        if len(sources) > 1:
            log(f"data: {len(records)} samples from {len(sources)} sources, "
                f"{sum(r['repeats'] for r in records)} per epoch with the repeats")
        buckets = collections.Counter("x".join(map(str, r["bucket"])) for r in records)
        log("buckets (HxWxF: samples): " + ", ".join(f"{k}: {v}" for k, v in sorted(buckets.items())))
    return records


def _list_sources(data, reference_dir):
    """(sources, items) of `data`, or the exception that listing it raised (to be raised on every rank)."""
    try:
        sources, items = parse_sources(data), []
        for s, (src, _) in enumerate(sources):
            listed = list_items(src, reference_dir)
            if not listed:
                raise ValueError(f"no videos or images found in {src} (extensions: {' '.join(sorted(MEDIA_EXTS))})")
            items += [(s, it) for it in listed]
        return sources, items
    except Exception as e:  # noqa: BLE001 -- any listing error, passed on as it is
        return e


def _counts(counter):
    return ", ".join(f"{k} {v}" for k, v in sorted(counter.items()))


# --- probing: one file -> its records, or (reason, detail) ---

def _caption(item):
    if item["txt"] is None:
        cap = item["caption"]
    else:
        try:
            with open(item["txt"], encoding="utf-8-sig") as f:  # -sig: drop the BOM some editors write
                cap = f.read()
        except FileNotFoundError:
            return None, ("no caption", f"expected {os.path.basename(item['txt'])}")
        except UnicodeDecodeError as e:
            return None, ("caption not utf-8", str(e))
        except OSError as e:
            return None, ("no caption", f"cannot read {item['txt']}: {e}")
    cap = " ".join(cap.split())  # one line, single spaces
    return (cap, None) if cap else (None, ("empty caption", ""))


def _probe(path, memo):
    """-> (probe(path)'s info, or (reason, detail)), and the new memo value (None when it came from the memo, or
    when the failure was an OSError: permissions or I/O are about the machine, not the bytes; try again)."""
    st = os.stat(path)
    stamp = [st.st_size, st.st_mtime_ns]
    known = memo.get(path)
    if known and known.get("stamp") == stamp:
        return (known["info"] if "info" in known else tuple(known["error"])), None
    try:
        info = probe(path)
    except Exception as e:  # PyAV raises many kinds (InvalidDataError, EOFError, PermissionError, ...)
        msg = str(e) or type(e).__name__
        err = ("no video stream", "") if msg == "no video stream" else ("corrupt", msg)
        return err, (None if isinstance(e, OSError) else dict(stamp=stamp, error=list(err)))
    return info, dict(stamp=stamp, info=info)


def _readable(path, what=""):
    """(reason, detail) when `path` is missing, unreadable or empty, else None; what: "" or "reference "."""
    if not os.path.exists(path):
        return ("missing reference", path) if what else ("missing file", "")
    try:
        with open(path, "rb") as f:
            f.read(1)
    except OSError as e:
        return (f"{what}unreadable", str(e))
    if os.path.getsize(path) == 0:
        return (f"{what}empty file", "0 bytes")
    return None


def _item_records(item, memo, buckets, fps, max_frames, frame_step, min_frames, clips_per_video, reference=False):
    """One item -> (its records, or (reason, detail)), and {path: new probe memo value} for what it probed."""
    path = item["path"]
    if item["error"]:
        return item["error"], {}
    ref = item.get("reference")
    if reference and not isinstance(ref, str):
        return ref or ("no reference", "no reference field" if item["txt"] is None else "no reference folder given"), {}
    bad = _readable(path)
    if bad:
        return bad, {}
    caption, err = _caption(item)
    if err:
        return err, {}
    info, memo_value = _probe(path, memo)
    new = {path: memo_value} if memo_value is not None else {}
    if isinstance(info, tuple):
        return info, new
    H, W = nearest_bucket(info["height"], info["width"], buckets)
    src = {k: info[k] for k in ("width", "height", "frames", "duration", "fps")}
    rinfo = None
    if reference:
        bad = _readable(ref, "reference ")
        if bad:
            return bad, new
        rinfo, memo_value = _probe(ref, memo)
        if memo_value is not None:
            new[ref] = memo_value
        if isinstance(rinfo, tuple):  # the reference's own failure, named as the reference's
            return ("reference " + rinfo[0], f"{ref}: {rinfo[1]}" if rinfo[1] else ref), new

    def record(start, clip, F):
        r = dict(path=path, caption=caption, start=start, clip=clip, bucket=[H, W, F], fps=fps, src=src)
        if reference:  # an image reference: one frame whatever F; a video: the clip's F frames from its start
            r["reference"] = dict(path=ref, frames=1 if rinfo["is_image"] else F)
        return r

    def available(start):  # frames from `start` that the clip and (a video) its reference both hold
        n = frames_available(info["duration"], start, fps)
        return n if rinfo is None or rinfo["is_image"] else min(n, frames_available(rinfo["duration"], start, fps))
    if info["is_image"]:
        return [record(0.0, 0, 1)], new
    n = min(available(0.0), max_frames)
    F = (n - 1) // frame_step * frame_step + 1 if n >= 1 else 0  # largest 1 + frame_step*k <= n
    if F < max(min_frames, 1):
        if n < min(frames_available(info["duration"], 0.0, fps), max_frames):  # the reference is what is short
            return ("reference too short", f"{ref}: {rinfo['duration']:.3f}s holds {n} frames at {fps} fps, "
                    f"need {min_frames}"), new
        return ("too short", f"{info['duration']:.3f}s holds {n} frames at {fps} fps, need {min_frames}"), new
    records = []
    while clips_per_video <= 0 or len(records) < clips_per_video:
        start = len(records) * F / fps  # consecutive, non-overlapping
        if available(start) < F:
            break
        records.append(record(start, len(records), F))
    return records, new
