"""Tests for data/: decoding, bucketing, bad-input reporting, sources and repeats, probe memo, cache, batch sampler,
toy dataset, write_video; and common/prefetch.py.

Every clip is made here with PyAV, tiny (<= 64 px, <= 50 frames). Frame i of most clips is a flat gray of
level 10 + step*i, so the level of a decoded frame says which source frame it came from."""
import gc
import itertools
import json
import os
import re
import socket
import subprocess
import sys
import threading
import wave
from fractions import Fraction

import av
import numpy as np
import pytest
import torch
import torch.multiprocessing as mp

import data.cache
import data.dataset
from common.prefetch import prefetch
from data.cache import cache_entries, encode_dataset, load_batch, load_entry
from data.dataset import load_dataset, make_buckets, nearest_bucket
from data.loader import batch_key, batches, epoch_plan, split_val, val_batches, with_repeats
from data.toy import COLORS, DEMO_PROMPTS, DIRECTIONS, make_toy_dataset
from data.video import probe, read_clip, write_video

SMALL = dict(area=64 * 64, fps=16, max_frames=17, multiple=16, frame_step=4, min_frames=5)


def has_encoder(name):
    try:
        av.Codec(name, "w")
        return True
    except Exception:
        return False


def encode(path, codec="libx264", n=20, w=32, h=48, fps=16, fmt=None, pix="yuv420p", pts=None, step=12,
           opts=None, frames=None):
    """Write a clip whose frame i is gray level 10 + step*i (or `frames[i]`, uint8 (h, w, 3)). `pts` in ms."""
    if opts is None:
        opts = {"qp": "0"} if codec == "libx264" else {}  # lossless: levels come back within rounding
    with av.open(str(path), "w", format=fmt) as c:
        s = c.add_stream(codec, rate=fps)
        s.width, s.height, s.pix_fmt = w, h, pix
        if pts is not None:
            s.codec_context.time_base = Fraction(1, 1000)
        s.options = opts
        for i in range(n):
            img = frames[i] if frames is not None else np.full((h, w, 3), 10 + step * i, np.uint8)
            f = av.VideoFrame.from_ndarray(img, format="rgb24")
            if pts is not None:
                f.pts, f.time_base = pts[i], Fraction(1, 1000)
            for p in s.encode(f):
                c.mux(p)
        for p in s.encode():
            c.mux(p)
    return path


def write_image(path, codec, pix, w=53, h=37):
    with av.open(str(path), "w", format="image2") as c:
        s = c.add_stream(codec, rate=1)
        s.width, s.height, s.pix_fmt = w, h, pix
        for p in s.encode(av.VideoFrame.from_ndarray(np.full((h, w, 3), 100, np.uint8), format="rgb24")):
            c.mux(p)
        for p in s.encode():
            c.mux(p)
    return path


def caption(path, text="a test clip"):
    with open(os.path.splitext(str(path))[0] + ".txt", "wb") as f:
        f.write(text.encode() if isinstance(text, str) else text)


def levels(video):
    """(3, F, H, W) in [-1, 1] -> the gray level (0..255) of each frame's centre."""
    return ((video[:, :, video.shape[2] // 2, video.shape[3] // 2].mean(0) + 1) * 127.5).tolist()


def frame_ids(video, step=12):
    return [round((v - 10) / step) for v in levels(video)]


# --- decoding: containers, codecs, sizes ---

CASES = [  # name, writer, expected (source w, h), expected frames at 16 fps / max 17
    ("h264.mp4", lambda p: encode(p), (32, 48), 17),
    ("vp9_odd.webm", lambda p: encode(p, "libvpx-vp9", w=37, h=53), (37, 53), 17),
    ("ffv1_odd.mkv", lambda p: encode(p, "ffv1", w=37, h=53), (37, 53), 17),
    ("mpeg4.mov", lambda p: encode(p, "mpeg4"), (32, 48), 17),
    ("anim.gif", lambda p: encode(p, "gif", fps=10, pix="rgb8", w=37, h=53), (37, 53), 17),
    ("portrait.mp4", lambda p: encode(p, w=32, h=96), (32, 96), 17),
    ("landscape.mp4", lambda p: encode(p, w=64, h=32, n=9), (64, 32), 9),
    pytest.param("hevc.mp4", lambda p: encode(p, "libx265", opts={"x265-params": "log-level=none"}), (32, 48), 17,
                 marks=pytest.mark.skipif(not has_encoder("libx265"), reason="no hevc encoder")),
    pytest.param("av1.mkv", lambda p: encode(p, "libsvtav1", w=64, h=64), (64, 64), 17,
                 marks=pytest.mark.skipif(not has_encoder("libsvtav1"), reason="no av1 encoder")),
    ("still.png", lambda p: write_image(p, "png", "rgb24"), (53, 37), 1),
    ("still.jpg", lambda p: write_image(p, "mjpeg", "yuvj420p"), (53, 37), 1),
    pytest.param("still.webp", lambda p: write_image(p, "libwebp", "yuv420p"), (53, 37), 1,
                 marks=pytest.mark.skipif(not has_encoder("libwebp"), reason="no webp encoder")),
]


@pytest.mark.parametrize("name,write,src_size,frames", CASES)
def test_formats(tmp_path, name, write, src_size, frames):
    path = write(tmp_path / name)
    caption(path)
    info = probe(path)
    assert (info["width"], info["height"]) == src_size
    lines = []
    (r,) = load_dataset(tmp_path, **SMALL, log=lines.append)
    H, W, F = r["bucket"]
    assert H % 16 == 0 and W % 16 == 0 and H * W <= 64 * 64 and (F - 1) % 4 == 0
    assert F == frames and r["caption"] == "a test clip" and r["start"] == 0.0
    assert (H > W) == (src_size[1] > src_size[0]) or H == W  # orientation kept
    json.dumps(r)  # records are plain data
    v = read_clip(r["path"], r["start"], F, r["fps"], (H, W))
    assert v.shape == (3, F, H, W) and v.dtype == torch.float32 and v.min() >= -1 and v.max() <= 1
    if F > 1 and not name.endswith(".gif"):  # gif is palettised: levels are approximate
        ids = frame_ids(v)
        assert ids == sorted(ids) and ids[0] == 0  # in order, from the first frame


def test_resample_picks_last_frame_at_or_before_t(tmp_path):
    path = encode(tmp_path / "a.mp4", n=24, fps=24, step=10)  # 1 s
    for fps, start, n in [(16, 0.0, 16), (16, 0.25, 12), (30, 0.0, 30), (24, 0.5, 12), (8, 0.1, 7)]:
        v = read_clip(path, start, n, fps, (32, 32))
        want = [min(23, int((start + k / fps) * 24 + 1e-9)) for k in range(n)]  # floor(t * 24)
        assert frame_ids(v, step=10) == want, (fps, start)


def test_variable_frame_rate(tmp_path):
    pts = [0, 40, 50, 130, 200, 210, 300, 420]  # ms, irregular
    path = encode(tmp_path / "vfr.mp4", n=8, w=32, h=32, pts=pts)
    info = probe(path)
    assert info["frames"] == 8 and info["duration"] >= 0.42
    assert info["fps"] == pytest.approx(7 / 0.42)  # measured from pts, not the nominal 16
    for fps, n in [(10, 5), (25, 11)]:
        v = read_clip(path, 0.0, n, fps, (32, 32))
        want = [max(i for i, p in enumerate(pts) if p <= 1000 * k / fps + 1e-6) for k in range(n)]
        assert frame_ids(v) == want


def test_resize_keeps_aspect_and_crops_centre(tmp_path):
    img = np.zeros((32, 64, 3), np.uint8)  # 64 wide: red | green green | blue
    img[:, :16, 0], img[:, 16:48, 1], img[:, 48:, 2] = 255, 255, 255
    path = encode(tmp_path / "rgb.mkv", "ffv1", n=1, w=64, h=32, pix="yuv444p", frames=[img])
    for size in [(32, 32), (16, 16), (64, 64)]:  # crop only, shrink then crop, enlarge then crop
        v = read_clip(path, 0, 1, 16, size)[:, 0]  # the centre square is green: aspect kept, centre kept
        assert v.shape == (3, *size)
        v = v[:, :, 2:-2]  # the outer columns sit on the colour edges when enlarging: filter overshoot
        assert v[1].min() > 0.8 and v[0].max() < -0.8 and v[2].max() < -0.8, size
    check = np.indices((64, 64)).sum(0) % 2 * 255  # 1-px checkerboard: a box filter gives flat gray
    path = encode(tmp_path / "check.mkv", "ffv1", n=1, w=64, h=64, pix="yuv444p",
                  frames=[np.repeat(check[:, :, None], 3, 2).astype(np.uint8)])
    v = read_clip(path, 0, 1, 16, (16, 16))
    assert (v - v.mean()).abs().max() < 0.05  # no aliasing moire


def test_rotation_metadata(tmp_path):
    """A phone video: stored landscape, display matrix says rotate 90 degrees counter-clockwise."""
    img = np.zeros((32, 64, 3), np.uint8)
    img[:, :32] = 255  # left half white: after the rotation it is the bottom half
    path = tmp_path / "rot.mp4"
    with av.open(str(path), "w") as c:
        s = c.add_stream("libx264", rate=16)
        s.width, s.height, s.pix_fmt = 64, 32, "yuv420p"
        s.set_display_rotation(90)
        for p in s.encode(av.VideoFrame.from_ndarray(img, format="rgb24")):
            c.mux(p)
        for p in s.encode():
            c.mux(p)
    assert (probe(path)["width"], probe(path)["height"]) == (32, 64)
    v = read_clip(path, 0, 1, 16, (64, 32))
    assert v[:, 0, :28].mean() < -0.9 and v[:, 0, 36:].mean() > 0.9


def test_write_video_roundtrip(tmp_path):
    F, H, W = 9, 37, 50  # odd H: padded to even for yuv420p
    y, x = torch.meshgrid(torch.linspace(-1, 1, H), torch.linspace(-1, 1, W), indexing="ij")
    video = torch.stack([x.expand(F, H, W), y.expand(F, H, W), (x * y).expand(F, H, W)])  # smooth: codec-friendly
    write_video(tmp_path / "out.mp4", video, fps=16)
    info = probe(tmp_path / "out.mp4")
    assert (info["frames"], info["width"], info["height"]) == (F, 50, 38)
    back = read_clip(tmp_path / "out.mp4", 0, F, 16, (38, 50))[:, :, :H]
    assert back.shape == (3, F, H, W) and (back - video).abs().mean() < 0.05
    write_video(tmp_path / "u8.mp4", ((video + 1) * 127.5).round().to(torch.uint8), fps=24)
    assert probe(tmp_path / "u8.mp4")["frames"] == F


def test_write_video_same_bytes(tmp_path):
    """The same input gives the same bytes in any process. x264's AVX-512 mb-tree code reads uninitialised heap
    memory, so its bytes depended on what the process had allocated before (test_toy_dataset failed after the
    decoding tests); glibc's MALLOC_PERTURB_ fills fresh allocations with a given byte, which makes that
    deterministic to test: two processes, two fillings. And one thread whatever the machine (x264's automatic
    count follows the cores and the frame height, and the bytes follow the count; x264 writes it in the stream)."""
    code = """if 1:
        import sys
        sys.path.insert(0, sys.argv[1])
        import numpy as np, torch
        from data.video import write_video
        for S in (32, 128):  # a soft-edged disc moving right on gray, as in the toy dataset
            y, x = np.mgrid[:S, :S] + 0.5
            frames = []
            for t in range(17):
                a = np.clip(S * 0.25 + 0.5 - np.hypot(x - S * (0.25 + t / 32), y - S / 2), 0, 1)  # coverage
                frames.append(np.stack([128 + 100 * a, 128 - 98 * a, 128 - 98 * a]))
            video = torch.from_numpy(np.stack(frames, 1).round().astype(np.uint8))  # (3, F, S, S)
            write_video(f"{sys.argv[2]}_{S}.mp4", video, fps=16, crf=12)"""
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    out = {}
    for fill in ("85", "170"):
        subprocess.run([sys.executable, "-c", code, root, str(tmp_path / fill)], check=True,
                       env={**os.environ, "MALLOC_PERTURB_": fill})
        out[fill] = [(tmp_path / f"{fill}_{S}.mp4").read_bytes() for S in (32, 128)]
    assert out["85"] == out["170"]
    assert all(b" threads=1 " in v and b" sliced_threads=0 " in v for v in out["85"])


def test_buckets():
    b = make_buckets(480 * 832, 16)
    assert (480, 832) in b and (832, 480) in b
    assert all(h % 16 == 0 and w % 16 == 0 and h * w <= 480 * 832 and max(h / w, w / h) <= 3 for h, w in b)
    assert len({h for h, _ in b}) == len(b) == len({w for _, w in b})  # one bucket per height and per width
    assert nearest_bucket(1080, 1920, b) == (480, 832) and nearest_bucket(1920, 1080, b) == (832, 480)
    assert nearest_bucket(512, 512, b) in [(624, 640), (640, 624)]  # 624*640 is exactly the area; 632^2 is over
    assert make_buckets(32 * 32, 16) == [(16, 48), (32, 32), (48, 16)]


# --- bad input: one line each, a summary, an error if nothing is left ---

def wav(path):
    with wave.open(str(path), "wb") as w:  # audio only, named .mp4: FFmpeg reads it, there is no video
        w.setnchannels(1), w.setsampwidth(2), w.setframerate(8000), w.writeframes(b"\0\0" * 800)


def test_bad_inputs_are_skipped_and_counted(tmp_path):
    d = tmp_path / "data"
    (d / "sub").mkdir(parents=True)
    caption(encode(d / "good.mp4"))
    caption(encode(d / "sub" / "nested.webm", "libvpx-vp9"), "nested clip")
    caption(write_image(d / "image.png", "png", "rgb24"), "an image")
    caption(encode(d / "short.mp4", n=3))
    (d / "corrupt.mp4").write_bytes(np.random.default_rng(0).bytes(4000))
    good = (d / "good.mp4").read_bytes()
    (d / "truncated.mp4").write_bytes(good[: len(good) // 2])
    caption(d / "corrupt.mp4"), caption(d / "truncated.mp4")
    (d / "empty.mp4").write_bytes(b"")
    caption(d / "empty.mp4")
    encode(d / "nocaption.mp4")
    caption(encode(d / "latin1.mp4"), b"caf\xe9 au lait")
    caption(encode(d / "blank.mp4"), "  \n\t ")
    wav(d / "audio.mp4")
    caption(d / "audio.mp4")
    (d / "notes.md").write_text("not media: ignored without a word")
    (d / "voice.m4a").write_bytes(b"\0" * 100)  # audio only, and not a video extension
    caption(d / "voice.m4a", "someone talking")  # -> voice.txt
    caption(d / "sub" / "orphan.mp4", "a caption of nothing")  # orphan.txt, no file of that name beside it
    lines = []
    recs = load_dataset(d, **SMALL, log=lines.append)
    assert sorted(os.path.basename(r["path"]) for r in recs) == ["good.mp4", "image.png", "nested.webm"]
    want = {"short.mp4": "too short", "corrupt.mp4": "corrupt", "truncated.mp4": "corrupt",
            "empty.mp4": "empty file", "nocaption.mp4": "no caption", "latin1.mp4": "caption not utf-8",
            "blank.mp4": "empty caption", "audio.mp4": "no video stream",
            "voice.txt": "no video (voice.m4a is not a video/image)",
            os.path.join("sub", "orphan.txt"): "no video (no video/image named orphan.* beside it)"}
    skips = [ln for ln in lines if ln.startswith("skip ")]
    assert len(skips) == len(want)  # one line per bad file
    for name, reason in want.items():
        (ln,) = [ln for ln in skips if f"{os.sep}{name}:" in ln]
        assert ln.startswith(f"skip {d / name}: {reason}"), ln
    summary = next(ln for ln in lines if ln.startswith("data "))
    assert "3 samples from 3 files; skipped 10 files" in summary
    for reason, n in [("corrupt", 2), ("too short", 1), ("empty file", 1), ("no caption", 1),
                      ("caption not utf-8", 1), ("empty caption", 1), ("no video stream", 1), ("no video", 2)]:
        assert re.search(rf"\b{reason} {n}\b", summary), (reason, summary)
    # min_frames=1 accepts the 3-frame clip as a 1-frame sample
    recs = load_dataset(d, **{**SMALL, "min_frames": 1}, log=lines.append)
    assert [r["bucket"][2] for r in recs if r["path"].endswith("short.mp4")] == [1]


def test_default_log_prints(tmp_path, capsys):
    caption(encode(tmp_path / "ok.mp4"))
    (tmp_path / "bad.mp4").write_bytes(b"")
    caption(tmp_path / "bad.mp4")
    load_dataset(tmp_path, **SMALL)
    out = capsys.readouterr().out
    assert f"skip {tmp_path / 'bad.mp4'}: empty file" in out and "skipped 1 files (empty file 1)" in out


def test_all_bad_raises(tmp_path):
    (tmp_path / "x.mp4").write_bytes(b"garbage" * 100)
    caption(tmp_path / "x.mp4")
    encode(tmp_path / "y.mp4")  # no caption
    with pytest.raises(ValueError, match=re.escape(str(tmp_path)) + ".*corrupt 1, no caption 1"):
        load_dataset(tmp_path, **SMALL, log=lambda s: None)
    (tmp_path / "empty").mkdir()
    with pytest.raises(ValueError, match="no videos or images found in .*empty"):
        load_dataset(tmp_path / "empty", **SMALL)
    with pytest.raises(FileNotFoundError, match="nowhere"):
        load_dataset(tmp_path / "nowhere", **SMALL)


def test_jsonl_and_csv(tmp_path):
    m = tmp_path / "media"
    m.mkdir()
    encode(m / "a.mp4")
    encode(m / "b.webm", "libvpx-vp9", w=37, h=53)
    write_image(m / "c.png", "png", "rgb24")
    (m / "dir.mp4").mkdir()  # exists but cannot be read as a file
    lines = [json.dumps({"path": "media/a.mp4", "caption": "clip a"}),
             json.dumps({"video": str(m / "b.webm"), "text": "clip b"}),  # absolute path
             json.dumps({"file": "media/c.png", "prompt": "image c"}),
             "{not json",
             json.dumps({"path": "media/a.mp4"}),  # no caption
             json.dumps({"path": "media/missing.mp4", "caption": "x"}),
             json.dumps({"path": "media/dir.mp4", "caption": "x"}),
             ""]
    (tmp_path / "set.jsonl").write_text("\n".join(lines))
    log = []
    recs = load_dataset(tmp_path / "set.jsonl", **SMALL, log=log.append)
    assert [(os.path.basename(r["path"]), r["caption"], r["bucket"][2]) for r in recs] == \
        [("a.mp4", "clip a", 17), ("b.webm", "clip b", 17), ("c.png", "image c", 1)]
    reasons = [ln.split(": ")[1].split(" (")[0] for ln in log if ln.startswith("skip ")]
    assert reasons == ["bad line", "no caption", "missing file", "unreadable"]
    assert any("set.jsonl:4" in ln for ln in log)
    # csv: any of the path/caption column names, quoted commas, relative and absolute paths
    (tmp_path / "set.csv").write_text('File,Prompt,extra\nmedia/a.mp4,"red, then blue",1\n'
                                      f'{m / "c.png"},image,2\nmedia/gone.mp4,x,3\n')
    log = []
    recs = load_dataset(tmp_path / "set.csv", **SMALL, log=log.append)
    assert [(os.path.basename(r["path"]), r["caption"]) for r in recs] == [("a.mp4", "red, then blue"),
                                                                            ("c.png", "image")]
    assert sum(ln.startswith("skip ") and "missing file" in ln for ln in log) == 1
    (tmp_path / "nocap.csv").write_text("path,notes\nmedia/a.mp4,x\n")
    with pytest.raises(ValueError, match="no caption column"):
        load_dataset(tmp_path / "nocap.csv", **SMALL)


@pytest.mark.parametrize("name,codec,fps", [("a.mkv", "libx264", 16), ("b.webm", "libvpx-vp9", 24),
                                             ("c.mkv", "libx264", 30), ("d.mp4", "libx264", 30)])
def test_millisecond_timestamps_read_at_their_own_rate(tmp_path, name, codec, fps):
    """Matroska/WebM store frame times in whole milliseconds (frame 1 of 16 fps at 63 ms, not 62.5): read at its own
    rate such a video gives every frame once, in order (it used to repeat or drop a third to a half of them)."""
    if not has_encoder(codec):
        pytest.skip(f"no {codec} encoder in this FFmpeg")
    p = encode(tmp_path / name, codec, n=30, step=8, fps=fps, opts={"qp": "0"} if codec == "libx264" else
               {"lossless": "1"})
    assert frame_ids(read_clip(p, 0, 17, fps, (48, 32)), step=8) == list(range(17))
    assert frame_ids(read_clip(p, 5 / fps, 9, fps, (48, 32)), step=8) == list(range(5, 14))  # after a seek too


def test_references(tmp_path):
    """IC-LoRA's pairs: a reference per sample, from a jsonl/csv field or (folder sources) the same relative name in a
    reference folder, any extension; a sample without a usable one is skipped with its reason; a reference video
    shorter than the clip shortens the clip (or, too short, skips it); an image reference is one frame. The cache
    holds the reference encoded at the clip's start, bucket and fps, and its bytes are in the key."""
    d, refs = tmp_path / "clips", tmp_path / "clips" / "refs"
    (d / "sub").mkdir(parents=True)
    (refs / "sub").mkdir(parents=True)
    caption(encode(d / "a.mp4", n=30, step=4), "clip a")  # frame i: level 10 + 4i
    caption(encode(d / "sub" / "b.mp4"), "clip b")
    caption(encode(d / "c.mp4"), "clip c")
    caption(encode(d / "e.mp4"), "clip e")
    caption(encode(d / "f.mp4"), "clip f")
    caption(write_image(d / "g.png", "png", "rgb24"), "image g")
    encode(refs / "a.mkv", n=30, step=8)  # another container and levels: 10 + 8i
    write_image(refs / "sub" / "b.png", "png", "rgb24")  # an image reference for a video
    encode(refs / "e.mp4", n=10)  # 10 frames at 16 fps: shortens e's clip to 9 frames
    encode(refs / "f.mp4", n=3)  # too short for a 5-frame clip
    encode(refs / "g.mp4")  # a video reference for an image: its first frame
    encode(refs / "c.mp4")
    encode(refs / "c.mkv")  # two files named c.*: ambiguous
    log = []
    recs = load_dataset(d, **SMALL, reference=True, reference_dir=refs, log=log.append)
    got = {os.path.basename(r["path"]): (r["bucket"][2], os.path.basename(r["reference"]["path"]),
                                          r["reference"]["frames"]) for r in recs}
    assert got == {"a.mp4": (17, "a.mkv", 17), "b.mp4": (17, "b.png", 1), "e.mp4": (9, "e.mp4", 9),
                   "g.png": (1, "g.mp4", 1)}, got
    skips = sorted(ln for ln in log if ln.startswith("skip "))
    assert len(skips) == 2 and "c.mp4: no reference (2 files named c.* in" in skips[0], skips
    assert "f.mp4: reference too short" in skips[1], skips
    assert not any("refs" in r["path"] for r in recs)  # the references' folder inside --data holds no samples
    # a video and an image reference of one bucket do not stack: one batch holds one of them (batch_key)
    by = {os.path.basename(r["path"]): r for r in recs}
    assert by["a.mp4"]["bucket"] == by["b.mp4"]["bucket"]
    assert batch_key(by["a.mp4"]) == (*by["a.mp4"]["bucket"], 17) and batch_key(by["b.mp4"]) == (*by["a.mp4"]["bucket"], 1)
    # without reference=True the same folder trains plainly, and the references' folder is still not sampled
    plain = load_dataset(d, **SMALL, reference_dir=refs, log=lambda s: None)
    assert len(plain) == 6 and not any("reference" in r for r in plain)
    # a jsonl field (and its aliases), relative to the jsonl; rows without one skipped when references are needed
    (tmp_path / "pairs.jsonl").write_text("\n".join([
        json.dumps({"path": "clips/a.mp4", "caption": "a", "reference": "clips/refs/a.mkv"}),
        json.dumps({"path": "clips/c.mp4", "caption": "c", "control": "clips/refs/c.mkv"}),
        json.dumps({"path": "clips/e.mp4", "caption": "e"}),
        json.dumps({"path": "clips/f.mp4", "caption": "f", "reference": "clips/refs/gone.mp4"})]))
    log = []
    recs2 = load_dataset(tmp_path / "pairs.jsonl", **SMALL, reference=True, log=log.append)
    assert [(os.path.basename(r["path"]), os.path.basename(r["reference"]["path"])) for r in recs2] == \
        [("a.mp4", "a.mkv"), ("c.mp4", "c.mkv")]
    reasons = [ln.split(": ")[1].split(" (")[0] for ln in log if ln.startswith("skip ")]
    assert reasons == ["no reference", "missing reference"], log
    # the cache: the reference read at the clip's start, bucket and fps, encoded by encode_reference
    enc, cache = Counter(), tmp_path / "cache"
    seen = []

    def enc_ref(v):
        seen.append(v.shape)
        return v[:, :1]  # (1, 1, F, H, W): the red channel, every frame
    entries = encode_dataset(recs, enc.encode_video, enc.encode_text, cache, {"m": 1}, log=lambda s: None,
                             encode_reference=enc_ref)
    assert len(entries) == 4 and enc.video == 4 and len(seen) == 4
    t, meta = load_entry(entries[0]["file"])
    H, W = recs[0]["bucket"][:2]  # the clip's bucket, for the reference too
    assert t["reference"].shape == (1, 17, H, W) and meta["reference"] == str(refs / "a.mkv")
    assert frame_ids(t["reference"], step=8) == list(range(17))  # the reference's own frames 0..16, in order
    by_name = {os.path.basename(e["path"]): load_entry(e["file"])[0]["reference"] for e in entries}
    assert by_name["b.mp4"].shape == (1, 1, H, W) and by_name["g.png"].shape[1] == 1  # image reference, image sample
    assert by_name["e.mp4"].shape[1] == 9
    # its bytes are in the key: a changed reference is encoded again, the unchanged ones are not
    encode(refs / "e.mp4", n=10, step=3)
    again, todo = cache_entries(load_dataset(d, **SMALL, reference=True, reference_dir=refs, log=lambda s: None),
                                cache, {"m": 1}, log=lambda s: None)
    assert todo == 1 and len(again) == 3
    # the same clip without its reference is another entry
    plain_keys = {e["path"]: e["key"] for e in data.cache._all_entries(plain, cache, {"m": 1})}
    assert all(plain_keys[e["path"]] != e["key"] for e in entries)
    # clips_per_video: each clip's reference is read from that clip's start, frame k with frame k
    (tmp_path / "long" / "refs").mkdir(parents=True)
    caption(encode(tmp_path / "long" / "l.mp4", n=40, step=6), "long clip")
    encode(tmp_path / "long" / "refs" / "l.mp4", n=40, step=6)
    two = load_dataset(tmp_path / "long", **SMALL, clips_per_video=0, reference=True,
                       reference_dir=tmp_path / "long" / "refs", log=lambda s: None)
    assert [(r["start"], r["reference"]["frames"]) for r in two] == [(0.0, 17), (17 / 16, 17)]
    got = encode_dataset(two, enc.encode_video, enc.encode_text, tmp_path / "cache3", {"m": 1}, log=lambda s: None,
                         encode_reference=enc_ref)
    assert frame_ids(load_entry(got[1]["file"])[0]["reference"], step=6) == list(range(17, 34))
    # a reference that fails to decode past its first frame marks the sample known-bad, named as the reference's
    bad = tmp_path / "bad"
    bad.mkdir()
    caption(encode(bad / "x.mp4"), "clip x")
    (bad / "refs").mkdir()
    encode(bad / "refs" / "x.mp4")
    rec = load_dataset(bad, **SMALL, reference=True, reference_dir=bad / "refs", log=lambda s: None)
    data_ = (bad / "refs" / "x.mp4").read_bytes()
    (bad / "refs" / "x.mp4").write_bytes(data_[:len(data_) // 3])  # truncated after the probe
    log = []
    assert encode_dataset(rec, enc.encode_video, enc.encode_text, tmp_path / "cache2", {"m": 1}, log=log.append,
                          encode_reference=enc_ref) == []
    assert any("reference corrupt" in ln and "x.mp4" in ln for ln in log), log



def test_a_faststart_mp4_cut_short_is_marked_corrupt_when_cached(tmp_path):
    """A web-style mp4 (index first) cut mid-download keeps its whole index: the probe counts every frame, but the
    last ones do not decode, and the threaded decoder just stops. The clip is listed as corrupt when cached, not
    padded with its last decoded frame."""
    d = tmp_path / "data"
    d.mkdir()
    rng = np.random.default_rng(0)
    with av.open(str(d / "cut.mp4"), "w", format="mp4", options={"movflags": "faststart"}) as c:
        s = c.add_stream("libx264", rate=16)
        s.width, s.height, s.pix_fmt, s.options = 64, 64, "yuv420p", {"g": "4"}
        for _ in range(33):  # noise: a frame is a few KB, so half the file is half the frames
            for p in s.encode(av.VideoFrame.from_ndarray(rng.integers(0, 255, (64, 64, 3), np.uint8), "rgb24")):
                c.mux(p)
        for p in s.encode():
            c.mux(p)
    whole = (d / "cut.mp4").read_bytes()
    (d / "cut.mp4").write_bytes(whole[:len(whole) // 2])
    caption(d / "cut.mp4")
    recs = load_dataset(d, **{**SMALL, "max_frames": 33}, log=lambda s: None)
    assert [r["bucket"][2] for r in recs] == [17]  # the probe saw 17 frames (the cut packets' headers are there)
    with pytest.raises(ValueError, match=r"decoding stopped at .* of the 1\.000 s asked"):
        read_clip(recs[0]["path"], 0.0, 17, 16, (64, 64))
    log = []
    assert encode_dataset(recs, Counter().encode_video, Counter().encode_text, tmp_path / "cache", {"m": 1},
                          log=log.append) == []
    assert any("cut.mp4" in ln and "corrupt" in ln for ln in log), log

def test_clips_per_video(tmp_path):
    caption(encode(tmp_path / "long.mp4", n=25, fps=8, step=10))  # 3.125 s: two full 17-frame clips at 16 fps
    assert len(load_dataset(tmp_path, **SMALL, log=lambda s: None)) == 1
    recs = load_dataset(tmp_path, **SMALL, clips_per_video=0, log=lambda s: None)
    assert [(r["clip"], r["start"], r["bucket"][2]) for r in recs] == [(0, 0.0, 17), (1, 17 / 16, 17)]
    assert len(load_dataset(tmp_path, **SMALL, clips_per_video=5, log=lambda s: None)) == 2
    v = read_clip(recs[1]["path"], recs[1]["start"], 17, 16, (48, 80))
    assert frame_ids(v, step=10) == [(17 + k) // 2 for k in range(17)]  # 8 fps source, each frame twice
    recs = load_dataset(tmp_path, **{**SMALL, "max_frames": 81}, log=lambda s: None)
    assert recs[0]["bucket"][2] == 49  # 3.125 s = 50 frames at 16 fps -> largest 4k+1


def test_sources_and_repeats(tmp_path, monkeypatch):
    """--data "clips/,stills/*3,extra.jsonl": several sources, each with its repeat count."""
    for d in ("clips", "stills"):
        (tmp_path / d).mkdir()
    caption(encode(tmp_path / "clips" / "a.mp4"), "clip a")
    caption(encode(tmp_path / "clips" / "b.mp4"), "clip b")
    caption(write_image(tmp_path / "stills" / "s.png", "png", "rgb24"), "still s")
    (tmp_path / "extra.jsonl").write_text(json.dumps({"path": "clips/a.mp4", "caption": "clip a, again"}) + "\n")
    monkeypatch.chdir(tmp_path)  # relative sources, as typed on a command line
    log = []
    recs = load_dataset("clips/, stills/*3,extra.jsonl", **SMALL, log=log.append)
    assert [(os.path.basename(r["path"]), r["source"], r["repeats"]) for r in recs] == \
        [("a.mp4", "clips/", 1), ("b.mp4", "clips/", 1), ("s.png", "stills/", 3), ("a.mp4", "extra.jsonl", 1)]
    assert [ln for ln in log if ln.startswith("data")] == [
        "data clips/: 2 samples from 2 files; skipped 0 files; repeats 1",
        "data stills/: 1 samples from 1 files; skipped 0 files; repeats 3",
        "data extra.jsonl: 1 samples from 1 files; skipped 0 files; repeats 1",
        "data: 4 samples from 3 sources, 6 per epoch with the repeats"]
    assert [r["caption"] for r in with_repeats(recs)] == ["clip a", "clip b"] + ["still s"] * 3 + ["clip a, again"]
    # the cache key depends on neither the repeats nor the source
    cache, enc = tmp_path / "cache", Counter()
    once = encode_dataset(load_dataset(str(tmp_path / "stills"), **SMALL, log=lambda s: None), enc.encode_video,
                          enc.encode_text, cache, {"m": 1}, log=lambda s: None)
    thrice, todo = cache_entries(recs[2:3], cache, {"m": 1}, log=lambda s: None)
    assert todo == 0 and [e["key"] for e in thrice] == [e["key"] for e in once] and thrice[0]["repeats"] == 3
    # a path that exists as given is one source, whatever "*" or "," it holds
    odd = tmp_path / "odd*2,x"
    odd.mkdir()
    caption(write_image(odd / "o.png", "png", "rgb24"))
    assert [(r["source"], r["repeats"]) for r in load_dataset(str(odd), **SMALL, log=lambda s: None)] == \
        [(str(odd), 1)]
    os.rename(odd, tmp_path / "star*2")  # and so is each comma-separated piece that exists as given
    assert [(r["source"], r["repeats"]) for r in load_dataset("stills,star*2,star*2*3", **SMALL, log=lambda s: None)] \
        == [("stills", 1), ("star*2", 1), ("star*2", 3)]
    with pytest.raises(ValueError, match="repeat count must be an integer >= 1"):
        load_dataset("clips/,stills/*0", **SMALL)
    with pytest.raises(FileNotFoundError, match="nowhere"):
        load_dataset("clips/,nowhere/*2", **SMALL)


# --- cache ---

def small_dataset(d):
    d.mkdir(parents=True, exist_ok=True)
    caption(encode(d / "a.mp4"), "clip a")
    caption(encode(d / "b.mp4", n=40, step=6), "clip b, longer")  # two clips, same bucket as a
    caption(write_image(d / "c.png", "png", "rgb24"), "image c")
    return load_dataset(d, **SMALL, clips_per_video=2, log=lambda s: None)


class Counter:  # encoders that count their calls; the "latent" is a downsampled mean of the clip
    def __init__(self):
        self.video, self.text = 0, 0

    def encode_video(self, v):  # (1, 3, F, H, W) -> (1, 1, (F-1)/4+1, H/8, W/8)
        assert v.ndim == 5 and v.shape[:2] == (1, 3)
        self.video += 1
        return v.mean(1, keepdim=True)[:, :, ::4, ::8, ::8]

    def encode_text(self, caps):  # variable length, like unpadded T5 output
        self.text += 1
        return torch.full((1, len(caps[0]) % 5 + 2, 4), float(len(caps[0])))


def test_cache(tmp_path):
    recs = small_dataset(tmp_path / "data")
    assert len(recs) == 4
    cache, settings = tmp_path / "cache", {"model": "toy", "area": 64 * 64, "fps": 16}
    enc = Counter()
    entries = encode_dataset(recs, enc.encode_video, enc.encode_text, cache, settings, log=lambda s: None)
    assert len(entries) == 4 and enc.video == 4 and enc.text == 3  # the two clips of b.mp4 share one text call
    assert not [f for f in os.listdir(cache) if f.endswith(".tmp")]
    t, meta = load_entry(entries[1]["file"])
    H, W, F = recs[1]["bucket"]
    assert t["latents"].shape == (1, (F - 1) // 4 + 1, H // 8, W // 8)
    assert meta["caption"] == recs[1]["caption"] and meta["bucket"] == recs[1]["bucket"]
    assert meta["path"] == recs[1]["path"] and meta["settings"] == settings and meta["start"] == recs[1]["start"]
    clip = read_clip(recs[1]["path"], recs[1]["start"], F, 16, (H, W))
    assert torch.allclose(t["latents"], enc.encode_video(clip[None])[0])
    # a re-run encodes nothing; the reader finds everything
    enc = Counter()
    assert len(encode_dataset(recs, enc.encode_video, enc.encode_text, cache, settings, log=lambda s: None)) == 4
    assert enc.video == enc.text == 0
    done, todo = cache_entries(recs, cache, settings)
    assert [e["file"] for e in done] == [e["file"] for e in entries] and todo == 0
    # new bytes in a.mp4 -> only its entry is re-encoded
    a = tmp_path / "data" / "a.mp4"
    st = os.stat(a)
    encode(a, step=11)
    os.utime(a, ns=(st.st_atime_ns, st.st_mtime_ns + 10**9))  # a later mtime even on a coarse clock
    enc = Counter()
    new = encode_dataset(recs, enc.encode_video, enc.encode_text, cache, settings, log=lambda s: None)
    assert enc.video == 1 and new[0]["file"] != entries[0]["file"] and new[1:] == entries[1:]
    # a changed caption -> that entry; changed settings -> everything
    recs[3] = dict(recs[3], caption="image c, recaptioned")
    enc = Counter()
    encode_dataset(recs, enc.encode_video, enc.encode_text, cache, settings, log=lambda s: None)
    assert enc.video == 1
    enc = Counter()
    encode_dataset(recs, enc.encode_video, enc.encode_text, cache, {**settings, "fps": 24}, log=lambda s: None)
    assert enc.video == 4
    assert cache_entries(recs, cache, {**settings, "model": "other"}, log=lambda s: None) == ([], 4)
    # a batch of one bucket stacks; text of different lengths is padded, with the lengths
    assert new[0]["bucket"] == new[1]["bucket"]
    b = load_batch([new[0]["file"], new[1]["file"]])
    texts = [load_entry(e["file"])[0]["text"] for e in new[:2]]  # "clip a" -> 3 tokens, "clip b, longer" -> 6
    assert b["latents"].shape == (2, *t["latents"].shape) and b["text"].shape == (2, 6, 4)
    assert b["text_lens"].tolist() == [3, 6] and torch.equal(b["text"][0, :3], texts[0])
    assert b["text"][0, 3:].abs().sum() == 0 and torch.equal(b["text"][1], texts[1])
    # pin=True: the same tensors, in pinned memory when there is CUDA to copy them to (else a no-op)
    p = load_batch([new[0]["file"], new[1]["file"]], pin=True)
    assert p.keys() == b.keys() and all(torch.equal(p[k], b[k]) for k in b)
    assert all(p[k].is_pinned() == torch.cuda.is_available() for k in ("latents", "text"))


def test_decode_failure_is_remembered(tmp_path, monkeypatch):
    """A clip that probes but fails to decode is marked known-bad: a restart neither decodes it again nor needs
    the encoders for it (todo == 0), and still lists it, once."""
    recs = small_dataset(tmp_path / "data")  # a.mp4, b.mp4 clips 0 and 1, c.png
    cache, settings, real, reads = tmp_path / "cache", {"model": "toy"}, data.cache.read_clip, []

    def read_clip(path, start, *a):  # b.mp4 breaks after its first clip
        reads.append((os.path.basename(path), start))
        if path.endswith("b.mp4") and start > 0:
            raise ValueError("broken packet")
        return real(path, start, *a)

    monkeypatch.setattr(data.cache, "read_clip", read_clip)
    enc, log = Counter(), []
    entries = encode_dataset(recs, enc.encode_video, enc.encode_text, cache, settings, log=log.append)
    assert [(os.path.basename(e["path"]), e["start"]) for e in entries] == [("a.mp4", 0), ("b.mp4", 0), ("c.png", 0)]
    assert len(reads) == 4 and enc.video == 3
    (skip,) = [ln for ln in log if ln.startswith("skip ")]
    assert skip.startswith(f"skip {recs[2]['path']}: corrupt (decoding 17 frames from 1.06") and "broken packet" in skip
    (bad,) = [f for f in os.listdir(cache) if f.endswith(".bad.json")]
    assert json.loads((cache / bad).read_text())["reason"] == "corrupt" and not any(f.endswith(".tmp")
                                                                                      for f in os.listdir(cache))
    for _ in range(2):  # restarts: listed once each time, nothing read, nothing to encode
        reads.clear()
        log = []
        done, todo = cache_entries(recs, cache, settings, log=log.append)
        assert [e["file"] for e in done] == [e["file"] for e in entries] and todo == 0 and reads == []
        assert [ln for ln in log if ln.startswith("skip ")] == [skip]
    enc, log = Counter(), []
    assert encode_dataset(recs, enc.encode_video, enc.encode_text, cache, settings, log=log.append) == entries
    assert enc.video == enc.text == 0 and reads == [] and not any(ln.startswith("skip ") for ln in log)
    os.remove(entries[0]["file"])  # a lost entry is to do again; the known-bad one is not
    assert cache_entries(recs, cache, settings, log=log.append)[1] == 1


def test_probe_memo(tmp_path, monkeypatch):
    """cache_dir/probe.json remembers probe results (and failures) by (path, size, mtime_ns)."""
    d, cache = tmp_path / "data", tmp_path / "cache"
    small_dataset(d)
    (d / "bad.mp4").write_bytes(b"garbage" * 100)
    caption(d / "bad.mp4")
    real, probed = data.dataset.probe, []
    monkeypatch.setattr(data.dataset, "probe", lambda p: probed.append(os.path.basename(p)) or real(p))
    kw = dict(**SMALL, clips_per_video=2)
    fresh = load_dataset(d, **kw, log=lambda s: None)  # no cache_dir: no memo
    assert sorted(probed) == ["a.mp4", "b.mp4", "bad.mp4", "c.png"] and not cache.exists()
    probed.clear()
    log1 = []
    assert load_dataset(d, **kw, cache_dir=cache, log=log1.append) == fresh and len(probed) == 4
    memo = json.loads((cache / "probe.json").read_text())
    assert sorted(memo) == sorted(str(d / n) for n in ["a.mp4", "b.mp4", "bad.mp4", "c.png"])
    probed.clear()
    log2 = []
    assert load_dataset(d, **kw, cache_dir=cache, log=log2.append) == fresh  # from the memo, the same records
    assert probed == [] and log2 == log1  # the corrupt file is remembered and reported the same way
    a = d / "a.mp4"
    st = os.stat(a)
    encode(a, n=9)  # rewritten in place: only it is probed again
    os.utime(a, ns=(st.st_atime_ns, st.st_mtime_ns + 10**9))
    recs = load_dataset(d, **kw, cache_dir=cache, log=lambda s: None)
    assert probed == ["a.mp4"] and recs[0]["bucket"][2] == 9


# --- two real ranks (gloo): scan and cache are sharded, everyone ends with the same list ---

def _dist_worker(rank, world, root, port):
    import torch.distributed as dist
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=world)
    log, cache = [], os.path.join(root, "cache")
    make_toy_dataset(os.path.join(root, "toy"), n=5, size=32, frames=9)  # rank 0 writes, rank 1 waits
    walk = os.walk
    if rank == 1:  # rank 1's listing of the folder is stale (NFS caches listings per client): it lacks toy_002
        os.walk = lambda *a, **k: ((r, d, [f for f in fs if not f.startswith("toy_002")]) for r, d, fs in walk(*a, **k))
    recs = load_dataset(os.path.join(root, "toy"), area=32 * 32, fps=16, max_frames=9, log=log.append,
                        cache_dir=cache)
    os.walk = walk
    real_read = data.cache.read_clip

    def read_clip(path, *a):  # toy_003 probes fine but does not decode; it is in rank 1's share
        if path.endswith("toy_003.mp4"):
            raise ValueError("broken packet")
        return real_read(path, *a)

    data.cache.read_clip = read_clip
    enc = Counter()
    entries = encode_dataset(recs, enc.encode_video, enc.encode_text, cache, {"m": 1}, log=log.append)
    if rank == 1:  # a restart where rank 1's view of the cache folder is stale (NFS attribute caching): empty
        exists, listdir = os.path.exists, os.listdir
        os.path.exists = lambda p: False if str(p).startswith(cache) else exists(p)
        os.listdir = lambda p=".": [] if str(p).startswith(cache) else listdir(p)
    again, todo = cache_entries(recs, cache, {"m": 1}, log=log.append)
    enc2 = Counter()
    third = encode_dataset(recs, enc2.encode_video, enc2.encode_text, cache, {"m": 1}, log=log.append)
    with open(os.path.join(root, f"rank{rank}.json"), "w") as f:
        json.dump(dict(recs=recs, calls=enc.video, entries=[e["file"] for e in entries], log=log, todo=todo,
                       again=[e["file"] for e in again], calls2=enc2.video, third=[e["file"] for e in third]), f)
    dist.destroy_process_group()


def test_two_ranks(tmp_path):
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    mp.spawn(_dist_worker, args=(2, str(tmp_path), port), nprocs=2)
    r0, r1 = [json.loads((tmp_path / f"rank{r}.json").read_text()) for r in (0, 1)]
    # rank 0's listing is everyone's: the records are the same on both ranks, toy_002 included
    assert r0["recs"] == r1["recs"] and len(r0["recs"]) == 5 and r0["entries"] == r1["entries"]
    assert (r0["calls"], r1["calls"]) == (3, 1) and len(r0["entries"]) == 4  # todo[i::world] shares; 1 failed
    assert any(ln.startswith("data ") for ln in r0["log"]) and not any(ln.startswith("data ") for ln in r1["log"])
    assert (tmp_path / "cache" / "probe.json").exists()  # written by rank 0 from both ranks' probes
    # rank 0 decides what is cached or known-bad: the stale rank 1 agrees, and encodes nothing again
    assert r0["again"] == r1["again"] == r0["third"] == r1["third"] == r0["entries"]
    assert r0["todo"] == r1["todo"] == 0 and r0["calls2"] == r1["calls2"] == 0
    skips = [ln for ln in r0["log"] if ln.startswith("skip ")]  # by rank 0 (rank 1 hit it): after it, at the restart
    assert len(skips) == 2 and all("toy_003.mp4: corrupt (" in ln and "broken packet" in ln for ln in skips)
    assert not any(ln.startswith("skip ") for ln in r1["log"])


# --- batch sampler ---

S0 = {"epoch": 0, "pos": 0}


def take(gen, n):
    return [next(gen) for _ in range(n)]


def global_batches(buckets, global_batch, micro_batch, world, seed, n, state=S0):
    """Run every rank's sampler for n steps and put each step's global batch back together by the index the
    trainer gives each sample: (micro * world + rank) * micro_batch + j. -> ([global batch of step s], [state])"""
    gens = [batches(buckets, global_batch, micro_batch, r, world, seed, dict(state)) for r in range(world)]
    steps, states = [], []
    for _ in range(n):
        out = [next(g) for g in gens]
        assert all(st == out[0][1] for _, st in out)  # the ranks agree on the position
        glob = [None] * global_batch
        for rank, (micro_batches, _) in enumerate(out):
            assert len(micro_batches) == global_batch // (micro_batch * world)  # accum
            for micro, idx in enumerate(micro_batches):
                assert len(idx) == micro_batch
                for j, i in enumerate(idx):
                    glob[(micro * world + rank) * micro_batch + j] = i
        steps.append(glob)
        states.append(out[0][1])
    return steps, states


def test_sampler_deterministic_one_bucket_per_step():
    buckets = [(32, 32, 17)] * 13 + [(48, 16, 9)] * 7 + [(16, 48, 1)] * 2
    a, _ = global_batches(buckets, 8, 2, world=2, seed=3, n=30)
    assert a == global_batches(buckets, 8, 2, world=2, seed=3, n=30)[0]
    assert a != global_batches(buckets, 8, 2, world=2, seed=4, n=30)[0]
    assert all(None not in step and len({buckets[i] for i in step}) == 1 for step in a)  # one bucket, all ranks
    plan = epoch_plan(buckets, 8, seed=3, epoch=0)
    assert len(plan) == 2 + 1 + 1  # ceil(13/8) + ceil(7/8) + ceil(2/8): remainders wrap, nothing dropped
    assert {i for step in plan for i in step} == set(range(len(buckets)))
    assert sorted(next(step for step in plan if buckets[step[0]] == (16, 48, 1))) == [20] * 4 + [21] * 4  # wrapped
    assert plan != epoch_plan(buckets, 8, seed=3, epoch=1)  # reshuffled every epoch
    assert a[:4] == plan and a[4:8] == epoch_plan(buckets, 8, seed=3, epoch=1)
    with pytest.raises(AssertionError, match=r"global_batch 6 must be a multiple of micro_batch \* world = 2 \* 2"):
        next(batches(buckets, 6, 2, 0, 2, seed=0, state=S0))


def test_sampler_resume_reproduces_sequence():
    buckets = [(i % 3, 0, 0) for i in range(23)]  # 8 + 8 + 7 samples: 2 + 2 + 2 steps of 4 per epoch
    kw = dict(global_batch=4, micro_batch=1, rank=1, world=2, seed=0)
    state = dict(S0)
    full = take(batches(buckets, **kw, state=state), 40)  # crosses several epochs
    assert state == S0  # not modified: each step comes with its own state
    assert full[5][1] == {"epoch": 1, "pos": 0} and full[6][1] == {"epoch": 1, "pos": 1}
    for cut in (1, 6, 7, 17):
        first = take(batches(buckets, **kw, state=S0), cut)
        saved = json.loads(json.dumps(first[-1][1]))  # what a checkpoint would hold
        assert first + take(batches(buckets, **kw, state=saved), 40 - cut) == full, cut


def test_sampler_world_size_independent():
    """Each step's samples, and each sample's index in its global batch, are the same on 1, 2, 4 or 8 ranks, with
    any micro-batch: a run resumed on another number of ranks continues exactly."""
    buckets = [(0,)] * 12 + [(1,)] * 20 + [(2,)] * 3
    ref, ref_states = global_batches(buckets, 8, 8, world=1, seed=1, n=15)
    for world, micro_batch in [(1, 2), (2, 2), (2, 4), (4, 2), (4, 1), (8, 1)]:
        steps, states = global_batches(buckets, 8, micro_batch, world, seed=1, n=15)
        assert steps == ref and states == ref_states, (world, micro_batch)
    # resumed on 4 ranks from a state saved on 1
    assert global_batches(buckets, 8, 2, world=4, seed=1, n=8, state=ref_states[6])[0] == ref[7:15]


def test_sampler_epoch_sees_every_sample_once():
    buckets = [(0,)] * 16 + [(1,)] * 8 + [(2,)] * 24  # every bucket a multiple of the global batch: no wrap
    steps, states = global_batches(buckets, 8, 2, world=2, seed=5, n=6)
    assert sorted(i for step in steps for i in step) == list(range(48))
    assert states[-1] == {"epoch": 1, "pos": 0}


def test_with_repeats():
    entries = [{"path": "a", "repeats": 3}, {"path": "b"}, {"path": "c", "repeats": 1}]
    assert [e["path"] for e in with_repeats(entries)] == ["a", "a", "a", "b", "c"]


def test_split_val():
    entries = [{"path": f"v{i // 2}.mp4", "n": i} for i in range(20)]  # 10 files, 2 clips each
    train, val = split_val(entries, 0.2, seed=5)
    assert len({e["path"] for e in val}) == 2 and len(val) == 4 and len(train) == 16
    assert not {e["path"] for e in val} & {e["path"] for e in train}  # no file on both sides
    assert split_val(entries, 0.2, seed=5) == (train, val) and split_val(entries, 0.2, seed=6)[1] != val
    assert len({e["path"] for e in split_val(entries, 3, seed=0)[1]}) == 3
    assert len(split_val(entries, 100, seed=0)[0]) == 2  # one file always stays for training
    assert split_val(entries, 0, seed=0) == (entries, [])
    assert len({e["path"] for e in split_val(entries, 0.01, seed=0)[1]}) == 1  # asked for some: at least one
    vb = [val_batches([(0,)] * 5, 2, r, 2) for r in range(2)]
    assert len(vb[0]) == len(vb[1]) and {i for b in vb for x in b for i in x} == set(range(5))
    assert [len(val_batches([(0,)] * 3, 2, r, 8)) for r in range(8)] == [1] * 8  # more ranks than batches


# --- toy dataset ---

def test_toy_dataset(tmp_path):
    a = make_toy_dataset(tmp_path / "a", n=8, size=32, frames=17)
    b = make_toy_dataset(tmp_path / "b", n=8, size=32, frames=17)
    names = sorted(os.listdir(a))
    assert names == sorted(os.listdir(b)) and len([n for n in names if n.endswith(".mp4")]) == 8
    for n in names:  # same seed, same files
        assert (a / n).read_bytes() == (b / n).read_bytes(), n
    mtime = os.stat(a / "toy_000.mp4").st_mtime_ns
    make_toy_dataset(a, n=8, size=32, frames=17)  # complete: nothing rewritten
    assert os.stat(a / "toy_000.mp4").st_mtime_ns == mtime
    # another seed, other clips; the first four are DEMO_PROMPTS whatever the seed
    c = make_toy_dataset(tmp_path / "c", n=8, size=32, frames=17, seed=1)
    assert (c / "toy_005.txt").read_text() != (a / "toy_005.txt").read_text() or \
        (c / "toy_005.mp4").read_bytes() != (a / "toy_005.mp4").read_bytes()
    assert [(a / f"toy_{i:03d}.txt").read_text().strip() for i in range(4)] == list(DEMO_PROMPTS)
    recs = load_dataset(a, area=32 * 32, fps=16, max_frames=17, log=lambda s: None)
    assert len(recs) == 8 and all(r["bucket"] == [32, 32, 17] for r in recs)
    for r in recs:
        m = re.fullmatch(r"a (\w+) (circle|square|triangle) moving (left|right|up|down) on a (\w+) background",
                         r["caption"])
        assert m, r["caption"]
        color, direction = m.group(1), m.group(3)
        v = read_clip(r["path"], 0, 17, 16, (32, 32))
        rgb = (v + 1) * 127.5  # (3, F, H, W)
        dist = (rgb - torch.tensor(COLORS[color], dtype=torch.float32)[:, None, None, None]).norm(dim=0)
        mask = (dist < 60).float()  # (F, H, W): pixels of the shape's colour
        assert mask[0].sum() > 20 and mask[-1].sum() > 20, r["caption"]
        yy, xx = torch.meshgrid(torch.arange(32.0), torch.arange(32.0), indexing="ij")
        cx = [(mask[t] * xx).sum() / mask[t].sum() for t in (0, -1)]
        cy = [(mask[t] * yy).sum() / mask[t].sum() for t in (0, -1)]
        dx, dy = DIRECTIONS[direction]
        moved = (cx[1] - cx[0], cy[1] - cy[0])
        assert moved[0] * dx + moved[1] * dy > 10 and abs(moved[0] * dy) + abs(moved[1] * dx) < 2, \
            (r["caption"], moved)


# --- common/prefetch.py ---

def test_prefetch_order_on_a_background_thread():
    threads = []

    def fn(x):
        threads.append(threading.get_ident())
        return x * x

    assert list(prefetch(iter(range(20)), fn, depth=3)) == [x * x for x in range(20)]
    assert threading.get_ident() not in threads and len(set(threads)) == 1  # one thread, not this one
    assert list(prefetch(iter([]), fn)) == []


def test_prefetch_reraises_in_the_consumer():
    def fn(x):
        if x == 3:
            raise KeyError("bad item 3")
        return x

    g = prefetch(iter(range(10)), fn)
    assert take(g, 3) == [0, 1, 2]
    with pytest.raises(KeyError, match="bad item 3"):
        next(g)

    def source():  # the iterator itself fails
        yield 1
        raise ValueError("source broke")

    g = prefetch(source(), lambda x: x)
    assert next(g) == 1
    with pytest.raises(ValueError, match="source broke"):
        next(g)


def test_prefetch_stops_with_the_consumer():
    pulled = []

    def source():
        for i in itertools.count():
            pulled.append(i)
            yield i

    def alive():
        return [t for t in threading.enumerate() if t.name == "prefetch"]

    for stop in ("close", "gc", "break"):
        pulled.clear()
        g = prefetch(source(), lambda x: x, depth=2)
        assert take(g, 3) == [0, 1, 2]
        if stop == "close":
            g.close()
        elif stop == "gc":
            del g
            gc.collect()
        else:
            for x in g:
                if x == 4:
                    break
            g = None  # the loop left, the generator dropped
        assert alive() == [], stop  # joined: done before close() returns
        n = len(pulled)
        assert n <= 5 + 2 + 1, stop  # taken + at most depth waiting + the one it was handing over



def test_a_clip_listed_twice_is_encoded_once_and_a_damaged_entry_is_named(tmp_path):
    d = tmp_path / "data"
    d.mkdir()
    caption(encode(d / "a.mp4"), "clip a")
    (tmp_path / "twice.jsonl").write_text("".join(json.dumps({"path": str(d / "a.mp4"), "caption": "clip a"}) + "\n"
                                                  for _ in range(2)))
    recs = load_dataset(str(tmp_path / "twice.jsonl"), **SMALL, log=lambda s: None)
    assert len(recs) == 2
    enc = Counter()
    entries = encode_dataset(recs, enc.encode_video, enc.encode_text, tmp_path / "cache", {"m": 1}, log=lambda s: None)
    assert enc.video == 1 and len(entries) == 2 and entries[0]["file"] == entries[1]["file"]  # one key, one file
    with open(entries[0]["file"], "r+b") as f:  # cut short after it was written (a crash, a full disk)
        f.truncate(100)
    with pytest.raises(ValueError, match=rf"cache entry {re.escape(entries[0]['file'])} is unreadable .*delete it"):
        load_batch([entries[0]["file"]])
    os.remove(entries[0]["file"])  # cached on a node-local disk, read on another node
    with pytest.raises(ValueError, match=rf"cache entry {re.escape(entries[0]['file'])} does not exist here.*every "
                                         "rank of every node"):
        load_batch([entries[0]["file"]])
