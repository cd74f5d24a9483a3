"""data/toy.py's encoder pair and clip checker: check_clip accepts every ground-truth toy clip (also through an mp4
round trip at the sizes the toy preset trains at) and rejects wrong colour, wrong or no motion and a vanishing
shape; toy_encoders is deterministic (in every process), zero-padded, and tells captions apart."""
import json
import os
import subprocess
import sys
import tempfile

import numpy as np
import pytest
import torch

from data.toy import (
    BACKGROUNDS,
    COLORS,
    DIRECTIONS,
    SHAPES,
    check_clip,
    measure_clip,
    toy_clip,
    toy_encoders,
)
from data.video import read_clip, write_video

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def caption(color, shape, direction, background="gray"):
    return f"a {color} {shape} moving {direction} on a {background} background"


def clip(color="red", shape="circle", direction="right", background="gray", size=32, frames=9, seed=0):
    return toy_clip(color, shape, direction, background, size, frames, np.random.default_rng(seed))  # uint8


# --- check_clip on ground truth ---

def test_check_clip_accepts_every_ground_truth_clip():
    """Every colour x direction x background (the shapes take turns), uint8 as drawn and as float in [-1, 1]."""
    rng = np.random.default_rng(0)
    for i, color in enumerate(COLORS):
        for j, direction in enumerate(DIRECTIONS):
            for k, background in enumerate(BACKGROUNDS):
                shape = SHAPES[(i + j + k) % len(SHAPES)]
                v = toy_clip(color, shape, direction, background, 32, 9, rng)
                cap = caption(color, shape, direction, background)
                for video in (v, v.float() / 127.5 - 1):
                    ok, why = check_clip(video, cap)
                    assert ok, (cap, why)


@pytest.mark.parametrize("size,frames,fps", [(16, 9, 8), (32, 9, 8), (16, 5, 4)])
def test_check_clip_accepts_ground_truth_through_mp4(tmp_path, size, frames, fps):
    """As the toy dataset stores its clips (64x64, 17 frames at 16 fps, h264) and as training reads them back
    (resized, resampled): the chroma subsampling and the resize blur the edges, the check still passes."""
    rng = np.random.default_rng(1)
    for i, color in enumerate(COLORS):
        for j, direction in enumerate(DIRECTIONS):
            shape, background = SHAPES[(i + j) % 3], BACKGROUNDS[(i * 4 + j) % 4]
            path = str(tmp_path / f"{color}_{direction}.mp4")
            write_video(path, toy_clip(color, shape, direction, background, 64, 17, rng), 16, crf=12)
            v = read_clip(path, 0, frames, fps, (size, size))
            ok, why = check_clip(v, caption(color, shape, direction, background))
            assert ok, (color, direction, background, why)


def test_measure_clip_finds_the_shape():
    """The centroid goes from 1/4 to 3/4 of the frame along the direction and stays put across; the colour is
    the shape's; uint8 and float inputs measure the same."""
    for direction, (dx, dy) in DIRECTIONS.items():
        v = clip("blue", "square", direction, "white", size=64, frames=5)
        m = measure_clip(v)
        assert m["mask"].shape == (5, 64, 64) and len(m["area"]) == 5 and len(m["centroid"]) == 5
        (x0, y0), (x1, y1) = m["centroid"][0], m["centroid"][-1]
        along0, along1 = (x0, x1) if dx else (y0, y1)
        start, end = (0.25, 0.75) if dx + dy > 0 else (0.75, 0.25)
        assert abs(along0 - start) < 0.02 and abs(along1 - end) < 0.02, (direction, m["centroid"])
        assert abs((y1 - y0) if dx else (x1 - x0)) < 0.01
        assert max(abs(a - b) for a, b in zip(m["color"], COLORS["blue"])) < 15
        assert 0.15 < min(m["area"]) and max(m["area"]) < 0.21  # the square is (1.7 * RADIUS)^2 = 0.18 of the frame
        mf = measure_clip(v.float() / 127.5 - 1)
        assert torch.equal(mf["mask"], m["mask"]) and np.allclose(mf["color"], m["color"], atol=1e-3)


# --- check_clip on edited clips ---

def test_check_clip_rejects_wrong_colour():
    v = clip("red", "circle", "right")
    ok, why = check_clip(v, caption("green", "circle", "right"))
    assert not ok and "colour" in why and "red" in why, why
    swapped = v[[2, 0, 1]]  # channels rotated: red (230, 30, 30) becomes (30, 230, 30), a green
    ok, why = check_clip(swapped, caption("red", "circle", "right"))
    assert not ok and "colour" in why, why


def test_check_clip_rejects_wrong_or_no_motion():
    v = clip("yellow", "triangle", "down", "black")
    assert check_clip(v, caption("yellow", "triangle", "down", "black"))[0]
    cases = {
        "reversed": (v.flip(1), "down"),  # moves up
        "wrong axis": (v, "left"),  # moves down, caption says left
        "static": (v[:, :1].expand_as(v).clone(), "down"),  # the first frame held
        "half way": (torch.cat([v[:, :2], v[:, 2:3].expand(-1, 7, -1, -1)], 1), "down"),  # stops at 0.375
    }
    for name, (video, direction) in cases.items():
        ok, why = check_clip(video, caption("yellow", "triangle", direction, "black"))
        assert not ok and "moved" in why, (name, why)


def test_check_clip_rejects_a_vanishing_shape():
    v = clip("magenta", "circle", "up")
    for t in ([8], [4, 5, 6, 7, 8], [0]):  # fades out at the end, from the middle, or appears late
        gone = v.clone().float()
        gone[:, t] = gone[:, t].mean(0, keepdim=True)  # every channel -> the pixel's gray: no colour left
        ok, why = check_clip(gone.round().to(torch.uint8), caption("magenta", "circle", "up"))
        assert not ok and "not visible" in why and f"frame {t[0]}" in why, (t, why)
    faint = (v.float() - 128) * 0.15 + 128  # a faint ghost of the shape everywhere: below the saturation floor
    ok, why = check_clip(faint.round().to(torch.uint8), caption("magenta", "circle", "up"))
    assert not ok and "not visible" in why, why


def test_check_clip_needs_colour_and_direction_in_the_caption():
    with pytest.raises(ValueError):
        check_clip(clip(), "a circle moving right")
    with pytest.raises(ValueError):
        check_clip(clip(), "a red circle")


# --- toy_encoders ---

PROMPTS = [caption(c, s, d, b) for c in COLORS for s in SHAPES for d in DIRECTIONS for b in BACKGROUNDS]


def test_toy_encoders_shapes_padding_and_the_empty_prompt():
    enc_v, dec_v, enc_t, settings = toy_encoders(64, 16)
    x = enc_t(["a red circle moving right on a gray background", "", "A  Red circle."])
    assert x.shape == (3, 16, 64) and x.dtype == torch.float32
    nonzero = x.abs().sum(-1) > 0  # (B, L): which rows carry something
    # 9 words + the end row, then zeros (as umT5's zero-padded output)
    assert nonzero[0].tolist() == [True] * 10 + [False] * 6
    # "" -> the end row alone; it is the same end row that closes every caption
    assert nonzero[1].tolist() == [True] + [False] * 15
    assert torch.equal(x[1, 0], x[0, 9])
    # lower-cased, split on whitespace, punctuation stripped: "A  Red circle." == "a red circle"
    assert torch.equal(x[2], enc_t(["a red circle"])[0])
    # unknown words share the <unk> row; a caption longer than text_len keeps its end row
    assert torch.equal(enc_t(["a purple circle"]), enc_t(["a orange circle"]))
    assert not torch.equal(enc_t(["a purple circle"]), enc_t(["a red circle"]))
    long = enc_t([" ".join(["red"] * 40)])[0]
    assert (long.abs().sum(-1) > 0).all() and torch.equal(long[-1], x[0, 9]) and torch.equal(long[0], x[0, 1])
    # the rows: norm sqrt(text_dim), and distinct words orthogonal (what makes them easy to read)
    rows = x[0, :10]
    assert torch.allclose(rows.norm(dim=-1), torch.full((10,), 8.0), atol=1e-4)
    gram = rows @ rows.T
    same = torch.tensor([[a == b for b in "a red circle moving right on a gray background </s>".split()]
                         for a in "a red circle moving right on a gray background </s>".split()])
    assert torch.allclose(gram[~same], torch.zeros(()), atol=1e-3) and torch.allclose(gram[same], torch.tensor(64.0))
    # the video side: pixel space
    v = torch.rand(1, 3, 5, 8, 8) * 2 - 1
    z = enc_v(v)
    assert torch.equal(z, v) and z.data_ptr() != v.data_ptr()
    assert torch.equal(dec_v(torch.tensor([[-3.0, 0.5, 2.0]])), torch.tensor([[-1.0, 0.5, 1.0]]))
    # settings: JSON-able, versioned, and they tell the encodings apart (the cache key)
    assert json.loads(json.dumps(settings)) == settings and "version" in settings
    assert toy_encoders(32, 16)[3] != settings and toy_encoders(64, 8)[3] != settings


def test_toy_encoders_tell_every_toy_caption_apart():
    enc_t = toy_encoders(64, 16)[2]
    x = enc_t(PROMPTS + [""])  # 6 x 3 x 4 x 4 = 288 captions and the empty prompt
    flat = x.flatten(1)
    d = torch.cdist(flat, flat)
    assert (d + torch.eye(len(flat)) * 1e9).min() > 1.0  # no two alike
    # and the bag of words (the mean over the rows, what a uniform attention sees) tells them apart as well
    bag = x.mean(1)
    db = torch.cdist(bag, bag)
    assert (db + torch.eye(len(bag)) * 1e9).min() > 0.1


def test_toy_encoders_are_deterministic_in_every_process():
    """Same numbers from two calls and from another process with another PYTHONHASHSEED (the embedding is seeded by
    sha1 of the word, never by hash(), which differs between processes; the cache depends on it)."""
    a = toy_encoders(64, 16)[2](PROMPTS[:20])
    b = toy_encoders(64, 16)[2](PROMPTS[:20])
    assert torch.equal(a, b)
    with tempfile.TemporaryDirectory() as d:
        out = os.path.join(d, "x.pt")
        code = ("import sys, torch; from data.toy import toy_encoders; "
                "torch.save(toy_encoders(64, 16)[2](sys.argv[2:]), sys.argv[1])")
        env = dict(os.environ, PYTHONPATH=ROOT, PYTHONHASHSEED="12345")
        subprocess.run([sys.executable, "-c", code, out, *PROMPTS[:20]], check=True, env=env, cwd=ROOT, timeout=120)
        assert torch.equal(torch.load(out), a)
