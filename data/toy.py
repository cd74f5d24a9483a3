"""The embedded toy dataset: coloured shapes moving the way the caption says, e.g. "a red circle moving left on
a gray background". A tiny model trained on it should first get the colour right (it fills a large part of the
frame), then the shape, then the direction: a quick check that text conditioning works at all.

    root = make_toy_dataset("toy_data")          # then: python train_wan.py --data toy_data ...

Defaults, and why: 64 clips (the 6 colours take turns, so each has 10 or 11 clips; no colour x shape x
direction combination repeats until n > 72), 64x64 pixels (8x8 latents for an 8x VAE, i.e. 4x4 tokens per latent frame
with a 2x2 patch: small enough for a CPU), 17 frames at 16 fps (17 = 4*4+1 = 8*2+1, so Wan/Hunyuan and LTX use
every frame; Mochi's 6k+1 takes the first 13). The shape travels half the frame width over the clip.
Generation takes about a second. Frames are drawn with numpy (4x4 supersampled edges) from a seeded generator
and written as h264 mp4 + .txt captions, so the same seed gives the same files. A marker file (.toy_complete,
holding the parameters) makes a second call a no-op; a call with other parameters rewrites the dataset.
"""
import glob
import json
import os

import numpy as np
import torch
import torch.distributed as dist

from data.video import write_video

COLORS = {"red": (230, 30, 30), "green": (30, 190, 40), "blue": (30, 60, 235), "yellow": (245, 220, 20),
          "cyan": (20, 220, 230), "magenta": (225, 30, 215)}
SHAPES = ("circle", "square", "triangle")
DIRECTIONS = {"left": (-1, 0), "right": (1, 0), "up": (0, -1), "down": (0, 1)}  # (dx, dy), y grows downwards
BACKGROUNDS = ("gray", "black", "white", "gradient")  # gray levels only, so no shape colour blends into them
SS = 4  # supersampling factor for anti-aliased edges


def _background(name, size, rng):
    if name == "gradient":  # dark to light gray along a random axis
        ramp = np.linspace(30, 220, size, dtype=np.float32)
        img = np.broadcast_to(ramp[None, :] if rng.random() < 0.5 else ramp[:, None], (size, size))
    else:
        img = np.full((size, size), {"gray": 128, "black": 20, "white": 235}[name], np.float32)
    return np.repeat(img[:, :, None], 3, axis=2)  # (S, S, 3)


def _alpha(shape, cx, cy, r, size):
    """Coverage of the shape centred at (cx, cy) with 'radius' r, (S, S) in [0, 1]."""
    c = (np.arange(size * SS, dtype=np.float32) + 0.5) / SS  # supersample centres, in pixel units
    x, y = c[None, :] - cx, c[:, None] - cy
    if shape == "circle":
        m = x ** 2 + y ** 2 <= r ** 2
    elif shape == "square":
        m = (np.abs(x) <= 0.85 * r) & (np.abs(y) <= 0.85 * r)  # 0.85: about the circle's area
    else:  # triangle, apex up: widens from the apex (y = -r) to the base (y = 0.8 r)
        m = (y <= 0.8 * r) & (np.abs(x) <= (y + r) / 1.8)
    return m.reshape(size, SS, size, SS).mean(axis=(1, 3))


def toy_clip(color, shape, direction, background, size, frames, rng):
    """uint8 (3, F, S, S) of one clip. The centre moves from 1/4 to 3/4 of the frame along the direction."""
    dx, dy = DIRECTIONS[direction]
    r = size * 0.17
    across = rng.uniform(0.35, 0.65) * size  # position on the other axis
    along = np.linspace(0.25, 0.75, frames) * size
    along = along if dx + dy > 0 else size - along
    bg = _background(background, size, rng)
    out = np.empty((frames, size, size, 3), np.float32)
    for t in range(frames):
        cx, cy = (along[t], across) if dx else (across, along[t])
        a = _alpha(shape, cx, cy, r, size)[:, :, None]
        out[t] = bg * (1 - a) + np.array(COLORS[color], np.float32) * a
    return torch.from_numpy(out.round().astype(np.uint8)).permute(3, 0, 1, 2)  # (3, F, S, S)


def make_toy_dataset(root, n=64, size=64, frames=17, fps=16, seed=0):
    """Write toy_000.mp4 + toy_000.txt, ... into `root` (skipped if already complete). Returns root."""
    params = dict(n=n, size=size, frames=frames, fps=fps, seed=seed, version=2)
    marker = os.path.join(root, ".toy_complete")
    rank = dist.get_rank() if dist.is_available() and dist.is_initialized() else 0
    if rank == 0 and not _complete(marker, params):
        os.makedirs(root, exist_ok=True)
        for f in glob.glob(os.path.join(root, "toy_*.mp4")) + glob.glob(os.path.join(root, "toy_*.txt")):
            os.remove(f)  # a previous toy set with other parameters
        rng = np.random.default_rng(seed)
        colors, pairs = list(COLORS), [(s, d) for s in SHAPES for d in DIRECTIONS]
        perms = [rng.permutation(len(pairs)) for _ in colors]  # per colour, its 12 (shape, direction) in a random order
        for i in range(n):
            c = i % len(colors)  # colours take turns: each gets n/6 clips, +-1
            color, (shape, direction) = colors[c], pairs[perms[c][i // len(colors) % len(pairs)]]
            background = BACKGROUNDS[rng.integers(len(BACKGROUNDS))]
            clip = toy_clip(color, shape, direction, background, size, frames, rng)
            name = os.path.join(root, f"toy_{i:03d}")
            write_video(name + ".mp4", clip, fps, crf=12)
            with open(name + ".txt", "w") as f:
                f.write(f"a {color} {shape} moving {direction} on a {background} background\n")
        with open(marker, "w") as f:  # last: an interrupted run has no marker and starts over
            json.dump(params, f)
    if dist.is_available() and dist.is_initialized():
        dist.barrier()  # the other ranks wait for rank 0's files
    return root


def _complete(marker, params):
    try:
        with open(marker) as f:
            return json.load(f) == params
    except (OSError, ValueError):
        return False
