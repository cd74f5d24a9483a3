"""What files and captions a `--data` value names (cheap: no file is opened beyond the jsonl/csv lists, and the
answer is the same on every rank). data/dataset.py probes them.

    parse_sources("clips/,stills/*3,extra.jsonl") -> [("clips/", 1), ("stills/", 3), ("extra.jsonl", 1)]
    list_items(source) -> [{"path", "caption", "txt", "error", "reference"}, ...]

`--data` is a comma-separated list of sources, each a folder, a .jsonl or a .csv, each optionally suffixed `*N`
(an integer >= 1): its samples are seen N times per epoch (data/loader.py: with_repeats). A value that exists as
a path as given is one source, whatever `*` or `,` it holds; so is each comma-separated piece that exists as
given. A source is one of
    - a folder (searched recursively) of videos/images, each with a same-name .txt caption (clip.mp4 + clip.txt);
      a .txt with no video/image of the same name beside it is reported as "no video" (clip.m4a + clip.txt);
    - a .jsonl file, one object per line: {"path"|"video"|"file"|"media_path": ..., "caption"|"text"|"prompt": ...};
    - a .csv file with a header row naming a path column and a caption column (same names as for jsonl).
Relative paths in a jsonl/csv are relative to the folder of that file.

References (a conditioning video or image per sample: LTX-Video's IC-LoRA, a control clip): a jsonl/csv
"reference" field (or reference_path, control, control_path), relative like "path"; for a folder source,
`reference_dir` holds them under the same relative names, any media extension (clips/a/b.mp4 -> refs/a/b.*, as
musubi-tuner's control_directory), in which a name with several extensions is ambiguous, so none. An item without
one has "reference" None; data/dataset.py decides whether that is an error.
"""
import csv
import json
import os
import re

from data.video import MEDIA_EXTS

PATH_KEYS = ("path", "video", "file", "media_path")
CAPTION_KEYS = ("caption", "text", "prompt")
REFERENCE_KEYS = ("reference", "reference_path", "control", "control_path")


def parse_sources(data):
    """`--data` -> [(source path as written, repeats)], in the order given."""
    data = str(data)
    if os.path.exists(os.path.expanduser(data)):
        return [(data, 1)]
    out = []
    for part in (p.strip() for p in data.split(",")):
        if not part:
            continue
        m = re.fullmatch(r"(.+)\*(\d+)", part)  # "stills/*3"; a name that exists as given keeps its "*"
        if m and not os.path.exists(os.path.expanduser(part)):
            if int(m.group(2)) < 1:
                raise ValueError(f"--data {data}: {part}: the repeat count must be an integer >= 1")
            out.append((m.group(1), int(m.group(2))))
        else:
            out.append((part, 1))
    if not out:
        raise ValueError(f"--data {data!r} names no source")
    return out


def _item(path, caption=None, txt=None, error=None, reference=None):
    # caption: str, or None to read it from `txt`; error: (reason, detail) when the item is bad before any probing;
    # reference: its reference's absolute path, or (reason, detail) when it names none usable
    return dict(path=path, caption=caption, txt=txt, error=error, reference=reference)


def _reference_in(reference_dir, rel, listed):
    """The media file of `reference_dir` with the relative stem of `rel` (any media extension), else (reason,
    detail). listed: {folder: {stem: [names]}}, filled as folders are first looked in (one listing per folder)."""
    stem = os.path.splitext(rel)[0]
    folder = os.path.join(reference_dir, os.path.dirname(stem))
    if folder not in listed:
        by_stem = {}
        for f in sorted(os.listdir(folder)) if os.path.isdir(folder) else []:
            if os.path.splitext(f)[1].lower() in MEDIA_EXTS:
                by_stem.setdefault(os.path.splitext(f)[0], []).append(f)
        listed[folder] = by_stem
    names = listed[folder].get(os.path.basename(stem), [])
    if len(names) == 1:
        return os.path.abspath(os.path.join(folder, names[0]))
    if names:
        return ("no reference", f"{len(names)} files named {stem}.* in {reference_dir}: {', '.join(names)}")
    return ("no reference", f"expected {os.path.join(reference_dir, stem)}.* (a video or an image)")


def _folder_items(data, reference_dir=None):
    items, listed = [], {}
    refs = os.path.abspath(reference_dir) if reference_dir else None
    for root, dirs, files in os.walk(data):
        # sorted in place: a fixed walk order; the references' folder, when it is inside, holds no samples
        dirs[:] = sorted(d for d in dirs if not d.startswith(".") and os.path.abspath(os.path.join(root, d)) != refs)
        files = sorted(f for f in files if not f.startswith("."))
        media = {os.path.splitext(f)[0] for f in files if os.path.splitext(f)[1].lower() in MEDIA_EXTS}
        for f in files:
            stem, ext = os.path.splitext(f)
            p = os.path.abspath(os.path.join(root, f))
            if ext.lower() in MEDIA_EXTS:
                ref = _reference_in(refs, os.path.relpath(p, os.path.abspath(data)), listed) if refs else None
                items.append(_item(p, txt=os.path.join(os.path.dirname(p), stem + ".txt"), reference=ref))
            elif ext.lower() == ".txt" and stem not in media:  # a caption of nothing we can read
                others = [g for g in files if g != f and os.path.splitext(g)[0] == stem]
                what = "is not a video/image" if len(others) == 1 else "are not videos/images"
                detail = f"{', '.join(others)} {what}" if others else f"no video/image named {stem}.* beside it"
                items.append(_item(p, error=("no video", detail)))
    return items


def list_items(data, reference_dir=None):
    """One source -> [{"path", "caption" (str or None: read from "txt"), "txt" (caption file or None), "error",
    "reference" (path, None, or (reason, detail))}]. reference_dir: where a folder source's references are."""
    data = os.path.expanduser(str(data))
    if os.path.isdir(data):
        return _folder_items(data, reference_dir and os.path.expanduser(str(reference_dir)))
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
            items.append(_item(where, error=("bad line", err)))
            continue
        cap = next((row[k] for k in CAPTION_KEYS if row.get(k) is not None), None)
        path = os.path.abspath(os.path.join(base, os.path.expanduser(path)))  # an absolute path stays as it is
        ref = next((row[k] for k in REFERENCE_KEYS if row.get(k)), None)
        ref = (os.path.abspath(os.path.join(base, os.path.expanduser(ref.strip()))) if isinstance(ref, str) else
               None if ref is None else ("no reference", f"{where}: the reference field is not a path"))
        items.append(_item(path, caption=cap if isinstance(cap, str) else None,
                           error=None if isinstance(cap, str) else ("no caption", where), reference=ref))
    return items
