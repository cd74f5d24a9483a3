"""Find the samples of a dataset and give each one a bucket. No pixels are decoded here beyond one frame per
file (to check it decodes); data/cache.py reads the clips.

    records = load_dataset(data, area=480*832, fps=16, max_frames=81)   # Wan defaults; see the signature
    make_buckets(area, multiple=16, max_ratio=3.0) -> [(H, W), ...]

`data` is one of
    - a folder (searched recursively) of videos/images, each with a same-name .txt caption (clip.mp4 + clip.txt);
    - a .jsonl file, one object per line: {"path"|"video"|"file"|"media_path": ..., "caption"|"text"|"prompt": ...};
    - a .csv file with a header row naming a path column and a caption column (same names as for jsonl).
Relative paths in a jsonl/csv are relative to the folder of that file.

A record is plain JSON-serialisable data (the cache hashes it, checkpoints may store it):
    {"path": absolute path, "caption": str, "start": clip start (s), "clip": index of the clip in its file,
     "bucket": [H, W, F] (pixels, pixels, frames), "fps": the target fps,
     "src": {"width", "height", "frames", "duration", "fps"} of the source file, as probed}

Bucketing. Spatial buckets are every (H, W) with H and W multiples of `multiple` (Wan: VAE 8 x patch 2 = 16;
LTX: 32), H*W <= `area` and as large as possible for that aspect ratio, between 1:max_ratio and max_ratio:1.
A sample goes to the bucket with the closest aspect ratio (in log space, so 1:2 and 2:1 are equally far from 1:1),
and is resized to cover it and centre-cropped. Frame counts are 1 + frame_step*k (Wan/Hunyuan 4k+1, LTX 8k+1,
Mochi 6k+1), at most `max_frames`; a video gets the largest count its duration holds at the target fps, from its
start. Images (and 1-frame videos) get F = 1 whatever `min_frames` says. A long video gives up to
`clips_per_video` consecutive, non-overlapping clips of that same length (0 = as many as fit).

Bad inputs are skipped with one line each ("skip PATH: REASON (detail)"), then one summary line with counts per
reason. Reasons: missing file, empty file, unreadable, corrupt, no video stream, too short, no caption,
empty caption, caption not utf-8, bad line. If nothing is usable, ValueError naming `data`.
Under torch.distributed every rank probes 1/world of the files and the results are all-gathered, so all ranks
hold the same list in the same order (the batch sampler relies on that).
"""
import collections
import csv
import json
import math
import os

import torch.distributed as dist

from data.video import EPS, MEDIA_EXTS, probe

PATH_KEYS = ("path", "video", "file", "media_path")
CAPTION_KEYS = ("caption", "text", "prompt")


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
                 clips_per_video=1, log=print):
    """Scan `data` and return the list of sample records (see the module docstring), in a fixed order."""
    items = _list_items(data)
    if not items:
        raise ValueError(f"no videos or images found in {data} (extensions: {' '.join(sorted(MEDIA_EXTS))})")
    opts = dict(buckets=make_buckets(area, multiple, max_ratio), fps=fps, max_frames=max_frames,
                frame_step=frame_step, min_frames=min_frames, clips_per_video=clips_per_video)
    rank, world = (dist.get_rank(), dist.get_world_size()) if dist.is_available() and dist.is_initialized() else (0, 1)
    mine = {i: _item_records(items[i], **opts) for i in range(rank, len(items), world)}
    if world > 1:  # probing opens every file: split it, then share the results
        parts = [None] * world
        dist.all_gather_object(parts, mine)
        mine = {i: r for p in parts for i, r in p.items()}
    records, skipped = [], collections.Counter()
    for i, item in enumerate(items):
        r = mine[i]
        if isinstance(r, tuple):  # (reason, detail)
            skipped[r[0]] += 1
            if rank == 0:
                log(f"skip {item['path']}: {r[0]}" + (f" ({r[1]})" if r[1] else ""))
        else:
            records += r
    summary = ", ".join(f"{k} {v}" for k, v in sorted(skipped.items()))
    if not records:
        raise ValueError(f"no usable samples in {data}: all {len(items)} files were skipped ({summary})")
    if rank == 0:
        n_files = len(items) - sum(skipped.values())
        log(f"data {data}: {len(records)} samples from {n_files} files; skipped {sum(skipped.values())} files"
            + (f" ({summary})" if summary else ""))
        buckets = collections.Counter("x".join(map(str, r["bucket"])) for r in records)
        log("buckets (HxWxF: samples): " + ", ".join(f"{k}: {v}" for k, v in sorted(buckets.items())))
    return records


# --- listing: what files and captions are there (cheap, identical on every rank) ---

def _list_items(data):
    """-> [{"path", "caption" (str or None: read from "txt"), "txt" (caption file or None), "error"}]."""
    data = os.path.expanduser(str(data))
    if os.path.isdir(data):
        items = []
        for root, dirs, files in os.walk(data):
            dirs[:] = sorted(d for d in dirs if not d.startswith("."))  # sorted in place: a fixed walk order
            for f in sorted(files):
                if not f.startswith(".") and os.path.splitext(f)[1].lower() in MEDIA_EXTS:
                    p = os.path.abspath(os.path.join(root, f))
                    items.append(dict(path=p, caption=None, txt=os.path.splitext(p)[0] + ".txt", error=None))
        return items
    if not os.path.isfile(data):
        raise FileNotFoundError(f"--data {data}: no such folder or file")
    ext = os.path.splitext(data)[1].lower()
    if ext == ".jsonl":
        rows = []
        with open(data, encoding="utf-8-sig") as f:
            for n, line in enumerate(f, 1):
                if line.strip():
                    try:
                        rows.append((n, json.loads(line)))
                    except json.JSONDecodeError as e:
                        rows.append((n, f"not JSON: {e}"))
    elif ext == ".csv":
        with open(data, encoding="utf-8-sig", newline="") as f:
            reader = csv.DictReader(f)
            header = [h.strip().lower() for h in reader.fieldnames or []]
            for keys, what in ((PATH_KEYS, "path"), (CAPTION_KEYS, "caption")):
                if not set(keys) & set(header):
                    raise ValueError(f"{data}: the header {header} has no {what} column (one of {', '.join(keys)})")
            rows = [(n, {k.strip().lower(): v for k, v in row.items() if k}) for n, row in enumerate(reader, 2)]
    else:
        raise ValueError(f"--data {data}: expected a folder, a .jsonl or a .csv")
    base, items = os.path.dirname(os.path.abspath(data)), []
    for n, row in rows:
        where = f"{data}:{n}"
        path = next((row[k] for k in PATH_KEYS if isinstance(row, dict) and row.get(k)), None)
        path = path.strip() if isinstance(path, str) else path
        if not isinstance(path, str):
            err = row if isinstance(row, str) else f"no {'/'.join(PATH_KEYS)} field"
            items.append(dict(path=where, caption=None, txt=None, error=("bad line", err)))
            continue
        cap = next((row[k] for k in CAPTION_KEYS if row.get(k) is not None), None)
        path = os.path.join(base, os.path.expanduser(path))  # an absolute path stays as it is
        items.append(dict(path=os.path.abspath(path), caption=cap if isinstance(cap, str) else None, txt=None,
                          error=None if isinstance(cap, str) else ("no caption", where)))
    return items


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


def _item_records(item, buckets, fps, max_frames, frame_step, min_frames, clips_per_video):
    path = item["path"]
    if item["error"]:
        return item["error"]
    if not os.path.exists(path):
        return ("missing file", "")
    try:
        with open(path, "rb") as f:
            f.read(1)
    except OSError as e:
        return ("unreadable", str(e))
    if os.path.getsize(path) == 0:
        return ("empty file", "0 bytes")
    caption, err = _caption(item)
    if err:
        return err
    try:
        info = probe(path)
    except Exception as e:  # PyAV raises many kinds (InvalidDataError, EOFError, PermissionError, ...)
        msg = str(e) or type(e).__name__
        return ("no video stream", "") if msg == "no video stream" else ("corrupt", msg)
    H, W = nearest_bucket(info["height"], info["width"], buckets)
    src = {k: info[k] for k in ("width", "height", "frames", "duration", "fps")}
    if info["is_image"]:
        return [dict(path=path, caption=caption, start=0.0, clip=0, bucket=[H, W, 1], fps=fps, src=src)]
    n = min(frames_available(info["duration"], 0.0, fps), max_frames)
    F = (n - 1) // frame_step * frame_step + 1 if n >= 1 else 0  # largest 1 + frame_step*k <= n
    if F < max(min_frames, 1):
        return ("too short", f"{info['duration']:.3f}s holds {n} frames at {fps} fps, need {min_frames}")
    records = []
    while clips_per_video <= 0 or len(records) < clips_per_video:
        start = len(records) * F / fps  # consecutive, non-overlapping
        if frames_available(info["duration"], start, fps) < F:
            break
        records.append(dict(path=path, caption=caption, start=start, clip=len(records), bucket=[H, W, F], fps=fps,
                            src=src))
    return records
