"""The embedded toy dataset: coloured shapes moving the way the caption says, e.g. "a red circle moving left on
a gray background". A tiny model trained on it should first get the colour right (it fills a large part of the
frame), then the shape, then the direction: a quick check that text conditioning works at all.

    root = make_toy_dataset("toy_data")          # then: python train_wan.py --data toy_data ...

Defaults, and why: 64 clips. The first four are DEMO_PROMPTS, one per direction: the prompts the toy presets
sample, so that a few minutes of training on a CPU can show them (a model this small, from scratch, reproduces
the clips it trained on long before it composes a colour, shape, direction and background it never saw
together). After them the 6 colours take turns (10 clips each at n = 64), and among those no colour x shape x
direction combination repeats until n > 76. 64x64 pixels, 17 frames at 16 fps (17 = 4*4+1 = 8*2+1, so
Wan/Hunyuan and LTX use every frame; Mochi's 6k+1 takes the first 13). The shape (RADIUS) travels half the frame
side over the clip, through the middle of the frame: a caption gives one clip (only the gradient's axis is drawn at
random), so what the model must learn from a caption is the clip itself, not a spread of places. Generation takes
about a second. Frames are drawn with numpy (4x4 supersampled edges) from a seeded generator and written as h264
mp4 + .txt captions, so the same seed gives the same files. A marker file (.toy_complete, holding the parameters)
makes a second call a no-op; a call with other parameters rewrites the dataset.
"""
import glob
import hashlib
import json
import os
import string

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
# The prompts the toy presets sample (--sample_prompts), one per direction; also the dataset's first four clips.
DEMO_PROMPTS = ("a red circle moving right on a gray background", "a blue square moving down on a gray background",
                "a green triangle moving left on a black background", "a yellow circle moving up on a white background")


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


# The shape's 'radius', a fraction of the frame side. Large on purpose: a from-scratch model learns where the shape
# is in each frame (the motion) from the pixels it covers; at 0.25 (version 4) the Wan toy moved 31 of 32 demo samples
# their caption's way at step 3,000, where at 0.17 it took 6,000 (a stripped-down loop, 8 samples a prompt). At 0.25
# the shape centred at 1/4 of the frame touches the edge: as large as the path allows.
RADIUS = 0.25


def toy_clip(color, shape, direction, background, size, frames, rng):
    """uint8 (3, F, S, S) of one clip. The centre moves from 1/4 to 3/4 of the frame along the direction, on the
    frame's middle line; `rng` draws the gradient background's axis."""
    dx, dy = DIRECTIONS[direction]
    r = size * RADIUS
    across = 0.5 * size  # position on the other axis
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
    params = dict(n=n, size=size, frames=frames, fps=fps, seed=seed, version=4)
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
            if i < len(DEMO_PROMPTS):
                w = toy_words(DEMO_PROMPTS[i])  # a {color} {shape} moving {direction} on a {background} background
                color, shape, direction, background = w[1], w[2], w[4], w[7]
            else:
                j = i - len(DEMO_PROMPTS)
                c = j % len(colors)  # colours take turns: each gets (n - 4)/6 clips, +-1
                color, (shape, direction) = colors[c], pairs[perms[c][j // len(colors) % len(pairs)]]
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


# -----------------------------------------------------------------------------------------------------
# The toy's encoder pair (pixel space + a fixed word embedding) and a checker for generated clips. Model-agnostic:
# a training script passes encode_video / encode_text to data/cache.py and decodes its samples with decode_video.

FILLER = ("a", "moving", "on", "background")  # the other words of every caption
TOY_TEXT_VERSION = 1  # bump when the embedding below changes: it is part of the cache key (`settings`)


def _word_vector(word, dim):
    """A fixed Gaussian (dim,) for `word`, seeded from sha1 (Python's hash() of a str differs between processes)."""
    seed = int.from_bytes(hashlib.sha1(f"toy-text-v{TOY_TEXT_VERSION}:{word}".encode()).digest()[:8], "little")
    return torch.randn(dim, generator=torch.Generator().manual_seed(seed % 2**63), dtype=torch.float64)


def toy_words(text):
    """Caption -> lower-cased words, punctuation stripped at both ends ("Red," -> "red"); empty pieces dropped."""
    return [w for w in (p.strip(string.punctuation) for p in text.lower().split()) if w]


def toy_encoders(text_dim, text_len):
    """-> (encode_video, decode_video, encode_text, settings) for the toy: pixel space and a fixed word embedding.

    encode_video(video float (1, 3, F, H, W) in [-1, 1]) -> a clone (the "latent" is the video itself);
    decode_video(z (B, 3, F, H, W)) -> z clamped to [-1, 1];
    encode_text(list of B str) -> float32 (B, text_len, text_dim): one row per word, then an end-of-text row, then
    zeros (as umT5's output is zero-padded). "" gives the end row alone: the unconditional context of caption
    dropout and classifier-free guidance. Words outside the vocabulary share an <unk> row; past text_len - 1 words
    the caption is cut (the end row always stays).

    Why it is easy to read: the rows of the vocabulary (every colour, shape, direction, background and filler word,
    <end>, <unk>) are orthogonal (a QR of their seeded Gaussians) and all of norm sqrt(text_dim), i.e. entries of
    unit variance. So even a cross-attention that still attends uniformly (as at init) hands each video token the
    mean of the rows, a bag of words from which one linear map reads off colour, shape and direction exactly.
    text_dim must be at least the vocabulary size (25) for that; below it the rows are merely random.
    """
    vocab = sorted({*COLORS, *SHAPES, *DIRECTIONS, *BACKGROUNDS, *FILLER}) + ["<end>", "<unk>"]
    raw = torch.stack([_word_vector(w, text_dim) for w in vocab])  # (V, D)
    if text_dim >= len(vocab):
        q, r = torch.linalg.qr(raw.T)  # q (D, V): orthonormal columns spanning the same space
        rows = (q * torch.sign(torch.diagonal(r))).T  # the sign fix makes the QR unique, hence reproducible
    else:
        rows = raw / raw.norm(dim=1, keepdim=True)
    table = (rows * text_dim ** 0.5).float()  # (V, D), each row of norm sqrt(D)
    index = {w: i for i, w in enumerate(vocab)}
    settings = dict(model="wan-toy", vae="pixels", text="toy-words", version=TOY_TEXT_VERSION,
                    text_dim=text_dim, text_len=text_len)

    def encode_text(prompts):
        out = torch.zeros(len(prompts), text_len, text_dim)
        for b, p in enumerate(prompts):
            ids = [index.get(w, index["<unk>"]) for w in toy_words(p)][: text_len - 1] + [index["<end>"]]
            out[b, : len(ids)] = table[ids]
        return out

    return (lambda v: v.clone()), (lambda z: z.clamp(-1, 1)), encode_text, settings


def measure_clip(video, spread=60.0):
    """Find the shape in a clip (3, F, H, W), uint8 or float in [-1, 1]. The backgrounds are gray levels (channel
    spread 0), the shapes saturated colours (spread >= 160 of 255), so the shape's mask per frame is the pixels
    whose max - min over the channels exceeds `spread` (in 0..255). Returns
      mask (F, H, W) bool; area: per frame, the mask's fraction of the frame;
      color: mean RGB (0..255) over the mask of all frames (None if empty);
      centroid: per frame (x, y) in units of the frame side, 0..1, y downwards (None where the mask is empty)."""
    v = video.float() if video.dtype == torch.uint8 else (video.float() + 1) * 127.5  # (3, F, H, W) in 0..255
    mask = (v.amax(0) - v.amin(0)) > spread  # (F, H, W)
    F_, H, W = mask.shape
    area = mask.flatten(1).float().mean(1)  # (F,)
    ys = (torch.arange(H, dtype=torch.float32) + 0.5) / H  # pixel centres
    xs = (torch.arange(W, dtype=torch.float32) + 0.5) / W
    centroid = []
    for t in range(F_):
        n = mask[t].sum()
        centroid.append(None if n == 0 else ((mask[t] * xs[None, :]).sum().item() / n.item(),
                                             (mask[t] * ys[:, None]).sum().item() / n.item()))
    color = v[:, mask].mean(1).tolist() if mask.any() else None  # (3,)
    return dict(mask=mask, area=area.tolist(), color=color, centroid=centroid)


def nearest_color(rgb):
    """The COLORS name closest to rgb in chroma (the colour minus its gray mean, compared by cosine): blending a
    colour with any gray scales its chroma without turning it, so a blurry shape's edge still counts as its colour."""
    c = torch.tensor(rgb, dtype=torch.float32)
    c = c - c.mean()
    best, name = -2.0, None
    for k, ref in COLORS.items():
        r = torch.tensor(ref, dtype=torch.float32)
        r = r - r.mean()
        cos = (c @ r / (c.norm() * r.norm() + 1e-6)).item()
        if cos > best:
            best, name = cos, k
    return name


def check_clip(video, caption, min_area=0.02, min_move=0.25):
    """Does the clip (3, F, H, W) show what the caption says? -> (ok, why). ok iff
      - the shape is visible in EVERY frame (mask area >= min_area of the frame; the true shapes cover 0.11-0.20),
      - its mean colour's nearest COLORS entry is the caption's colour,
      - its centroid moves along the caption's direction by more than min_move of the frame side from the first to
        the last frame (the true clips move 0.5), and by more than it moves across.
    `why` says what failed (or, when ok, what was measured)."""
    words = toy_words(caption)
    color = next((w for w in words if w in COLORS), None)
    direction = next((w for w in words if w in DIRECTIONS), None)
    if color is None or direction is None:
        raise ValueError(f"caption names no toy colour or direction: {caption!r}")
    m = measure_clip(video)
    for t, a in enumerate(m["area"]):
        if a < min_area:
            return False, f"shape not visible in frame {t} (area {a:.3f} < {min_area})"
    got = nearest_color(m["color"])
    if got != color:
        rgb = ", ".join(f"{c:.0f}" for c in m["color"])
        return False, f"colour is {got} (mean RGB {rgb}), not {color}"
    dx, dy = DIRECTIONS[direction]
    (x0, y0), (x1, y1) = m["centroid"][0], m["centroid"][-1]
    along = (x1 - x0) * dx + (y1 - y0) * dy  # >0: the caption's way
    across = abs((x1 - x0) * dy + (y1 - y0) * dx)
    if along <= min_move or along <= across:
        return False, f"moved {along:+.2f} along {direction} and {across:.2f} across (need > {min_move} and > across)"
    return True, f"{color}, moved {along:+.2f} {direction} ({across:.2f} across), min area {min(m['area']):.3f}"
