"""Video and image I/O with PyAV: anything FFmpeg reads goes in, a (3, F, H, W) tensor in [-1, 1] comes out.

    probe(path) -> {"width", "height", "frames", "duration", "fps", "is_image"}
    read_clip(path, start, frames, fps, size=(H, W)) -> float32 (3, F, H, W) in [-1, 1]
    write_video(path, video (3, F, H, W) float in [-1, 1] or uint8, fps)   # h264 mp4, yuv420p

Time is always frame pts * time_base (seconds, relative to the stream's start), never the nominal frame
rate: phone videos and screen recordings are often variable-frame-rate, and the nominal rate then lies.
Resampling to a target fps picks, for output time t = start + k/fps, the last source frame with time <= t
(what a player would be showing at t; to one tick of the time base, which is 1 ms in Matroska/WebM), so frames are
repeated when upsampling and skipped when downsampling.
Still images (png/jpg/webp/...) and 1-frame videos are 1-frame clips.
"""
import os
from fractions import Fraction

import numpy as np
import torch

# PyAV is imported where a file is read or written, not here: `--mode bench` (random data) and the models imported
# from Python need no PyAV (a GPU machine may have torch but not PyAV).

IMAGE_EXTS = {".png", ".jpg", ".jpeg", ".webp", ".bmp", ".tif", ".tiff"}
VIDEO_EXTS = {".mp4", ".m4v", ".mov", ".mkv", ".webm", ".avi", ".gif", ".flv", ".wmv", ".mpg", ".mpeg",
              ".ts", ".mts", ".m2ts", ".3gp", ".ogv"}
MEDIA_EXTS = IMAGE_EXTS | VIDEO_EXTS
EPS = 1e-6  # seconds; absorbs float error in pts * time_base vs k / fps


def _origin(stream):
    # Times are relative to the stream start: mp4 with B-frames or an edit list, and MPEG-TS, do not start at pts 0.
    return float(stream.start_time * stream.time_base) if stream.start_time is not None else 0.0


def _rotation(frame):
    # phone videos store a rotation in the display matrix; counter-clockwise quarter turns, as np.rot90 counts
    return round((frame.rotation or 0) / 90) % 4


def _upright_size(frame):
    return (frame.height, frame.width) if _rotation(frame) % 2 == 0 else (frame.width, frame.height)


def frame_to_array(frame, size):
    """Decoded frame -> uint8 (H, W, 3), upright: scaled (aspect kept) to cover size=(H, W), then centre-cropped.
    Scaling is swscale's, in C on uint8: "area" (a box average, no aliasing) when shrinking, bicubic when
    enlarging. Doing it in torch float is ~10x slower at 480p and the frames are the bulk of a caching run."""
    H, W = size
    k = _rotation(frame)
    h, w = _upright_size(frame)
    scale = max(H / h, W / w)
    nh, nw = max(H, round(h * scale)), max(W, round(w * scale))
    sh, sw = (nh, nw) if k % 2 == 0 else (nw, nh)  # the size before the rotation
    img = frame.to_ndarray(format="rgb24", width=sw, height=sh, interpolation="AREA" if scale < 1 else "BICUBIC")
    img = np.rot90(img, k) if k else img  # (nh, nw, 3)
    top, left = (nh - H) // 2, (nw - W) // 2
    return torch.from_numpy(np.ascontiguousarray(img[top:top + H, left:left + W]))


def probe(path):
    """Size, duration, fps and frame count, from the packet timestamps (no full decode; one frame is decoded to
    check that the stream decodes and to get the upright size). Raises on anything unreadable. Returns
    {"width", "height", "frames", "duration" (s), "fps" (measured average), "is_image"}."""
    import av
    with av.open(str(path)) as c:
        if not c.streams.video:
            raise ValueError("no video stream")
        s = c.streams.video[0]
        tb = s.time_base
        pts, last_pts, last_dur = [], None, 0
        for p in c.demux(s):
            if p.size == 0:  # the flush packet at the end
                continue
            if p.pts is None:  # some raw streams have no timestamps: fall back to decoding
                pts = None
                break
            pts.append(p.pts)
            if last_pts is None or p.pts >= last_pts:  # packets come in decode order; keep the latest in time
                last_pts, last_dur = p.pts, p.duration or 0
        if pts is None or not pts:
            # decode everything; slow but rare (raw elementary streams, or demux gave no packets)
            c.seek(0)
            times = [f.time for f in c.decode(s) if f.time is not None]
            if not times:
                raise ValueError("no decodable frames")
            times = sorted(t - _origin(s) for t in times)
        else:
            times = sorted(float((x - (s.start_time or 0)) * tb) for x in pts)
        c.seek(0)
        first = next(c.decode(s), None)
        if first is None:
            raise ValueError("no decodable frames")
        first.to_ndarray(format="rgb24")  # converts, i.e. the pixels are really there
        h, w = _upright_size(first)
        rate = float(s.guessed_rate or s.average_rate or 0) or 25.0  # read before close: PyAV segfaults after
        tb = float(tb)
    n = len(times)
    if n > 1:
        step = float(np.median(np.diff(times))) or 1 / rate
        fps = (n - 1) / (times[-1] - times[0]) if times[-1] > times[0] else rate
    else:
        step, fps = 1 / rate, rate
    dur = last_dur * tb if last_dur else step
    is_image = n == 1 or os.path.splitext(str(path))[1].lower() in IMAGE_EXTS
    return {"width": w, "height": h, "frames": n, "duration": times[-1] + dur, "fps": fps, "is_image": is_image}


def read_clip(path, start, frames, fps, size):
    """Decode `frames` frames at `fps` starting at `start` seconds, resized and centre-cropped to size=(H, W).
    Returns float32 (3, F, H, W) in [-1, 1]. Output frame k is the last source frame with time <= start + k/fps;
    a video that stops decoding before the last one asked for raises ValueError (truncated or damaged)."""
    import av
    targets = [start + k / fps for k in range(frames)]
    out = torch.empty(frames, *size, 3, dtype=torch.uint8)  # frame-major, as decoded: each frame is one memcpy
    with av.open(str(path)) as c:
        s = c.streams.video[0]
        s.thread_type = "AUTO"
        t0 = _origin(s)
        if not _decode_at(c, s, t0, targets, out, seek=start > 0):
            c.seek(0)  # the seek landed after `start` (happens with some demuxers): decode from the top
            _decode_at(c, s, t0, targets, out, seek=False)
    video = torch.empty(3, frames, *size).copy_(out.permute(3, 0, 1, 2))  # (3, F, H, W) float32
    return video.div_(127.5).sub_(1)  # [0, 255] -> [-1, 1]


def _decode_at(c, s, t0, targets, out, seek):
    """Fill out[k] (uint8 (F, H, W, 3)) with the frame showing at targets[k]. False if the seek overshot."""
    import av
    if seek:
        try:
            c.seek(int((targets[0] + t0) / s.time_base), stream=s, backward=True)  # to the keyframe before start
        except av.error.FFmpegError:
            c.seek(0)
    k, prev, last = 0, None, (None, -1)  # last: (frame, the k it went to); holding it keeps `is` honest
    # A frame's time is exact only to one tick of its time base: Matroska/WebM store milliseconds, so frame 1 of a
    # 16 fps video is at 63 ms, after the 62.5 ms it is meant for. Without a tick of slack, reading such a video at
    # its own rate repeats every other frame and drops the rest. (GIF's tick is 10 ms; a coarser one is not a
    # frame time's rounding, so the slack stops there.)
    tol = max(EPS, min(float(s.time_base or 0), 0.01))

    def put(frame):  # upsampling puts the same frame at several k: convert it once
        nonlocal k, last
        out[k] = out[last[1]] if frame is last[0] else frame_to_array(frame, out.shape[1:3])
        last, k = (frame, k), k + 1

    for i, frame in enumerate(c.decode(s)):
        t = frame.time - t0 if frame.time is not None else i / float(s.guessed_rate or 25)
        if prev is None and seek and t > targets[0] + tol:
            return False
        while k < len(targets) and t > targets[k] + tol:
            put(prev if prev is not None else frame)  # before the first frame: show the first frame
        if k == len(targets):
            break
        prev = frame
    if prev is None:
        raise ValueError("no decodable frames")
    # The frames asked for lie inside the probed duration. If decoding stopped before them, the file is cut short
    # (a faststart mp4 cut mid-download keeps its full index, so the probe counted frames that are not there, and the
    # threaded decoder stops without an error): refuse it rather than repeat the last frame.
    t = prev.time - t0 if prev.time is not None else 0.0
    dur = getattr(prev, "duration", None)  # (Frame.duration: PyAV 13+)
    end = t + (float(dur * s.time_base) if dur else 1 / float(s.guessed_rate or 25))
    if k < len(targets) and targets[-1] > end + tol:
        raise ValueError(f"decoding stopped at {end:.3f} s of the {targets[-1]:.3f} s asked (truncated or damaged)")
    while k < len(targets):
        put(prev)
    return True


def write_video(path, video, fps, crf=18):
    """Write (3, F, H, W) float in [-1, 1] (or uint8) as an h264/yuv420p mp4 that every player opens.
    yuv420p needs even sizes: an odd H or W is padded by repeating the last row/column."""
    import av
    assert video.ndim == 4 and video.shape[0] == 3, f"expected (3, F, H, W), got {tuple(video.shape)}"
    if video.dtype != torch.uint8:
        video = ((video.float().clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8)
    frames = video.permute(1, 2, 3, 0).cpu().numpy()  # (F, H, W, 3)
    _, H, W, _ = frames.shape
    frames = np.pad(frames, ((0, 0), (0, H % 2), (0, W % 2), (0, 0)), mode="edge")
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    with av.open(str(path), "w", format="mp4") as c:
        s = c.add_stream("libx264", rate=Fraction(fps).limit_denominator(1001))
        s.width, s.height, s.pix_fmt = W + W % 2, H + H % 2, "yuv420p"
        # Same input, same bytes (the toy dataset and its test rely on it): one thread, since x264's output depends
        # on its thread count (auto = the machine's cores), and no mb-tree: x264's AVX-512 mb-tree code reads
        # uninitialised memory, so with it the bytes depend on what the process allocated before (seen with
        # x264 core 165: MALLOC_PERTURB_=85 vs unset gives other bytes; mbtree=0 or asm=avx2 does not). mb-tree
        # only moves bits between frames; at these CRFs the loss is small.
        s.options = {"crf": str(crf), "x264-params": "mbtree=0"}
        s.codec_context.thread_count = 1
        s.codec_context.thread_type = "NONE"  # no slice threads either
        for img in frames:
            for p in s.encode(av.VideoFrame.from_ndarray(img, format="rgb24")):
                c.mux(p)
        for p in s.encode():  # flush
            c.mux(p)
