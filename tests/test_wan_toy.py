"""The README's first command end to end: `python train_wan.py --preset toy` (the data, the cache, the training and
the final samples, all with the toy defaults) writes one sample per sample prompt, and every one shows its prompt:
the caption's colour, a shape visible in every frame, moving the caption's way (data.toy.check_clip).
The whole demo runs, nothing is shortened: about 9 minutes of a 2-core CPU each (12.5 with one core each, two side
by side), so marked slow (left out of the default run; `python -m pytest -q tests/ -m slow`). Twice: with the default seed (the README command as written)
and with --seed 1 (another init, data order and sample noise), so that a recipe that passes by luck fails."""
import json
import os
import subprocess
import sys
import time

import pytest

import train_wan as W
from data.toy import DIRECTIONS, check_clip
from data.video import read_clip

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SCRIPT = os.path.join(ROOT, "train_wan.py")


@pytest.mark.slow
@pytest.mark.parametrize("seed", [None, 1])
def test_toy_demo_samples_show_their_prompts(tmp_path, seed):
    out, cache = tmp_path / "run", tmp_path / "cache"
    # --data is the toy default's own (relative) name, resolved in tmp_path: the script writes the dataset there
    # itself, exactly as the README command does in a fresh checkout
    data = W.TOY_ARGS["data"]
    cmd = [sys.executable, SCRIPT, "--preset", "toy", "--data", data, "--out_dir", str(out), "--cache_dir", str(cache)]
    cmd += [] if seed is None else ["--seed", str(seed)]
    t0 = time.time()
    p = subprocess.run(cmd, cwd=tmp_path, env=dict(os.environ, PYTHONPATH=ROOT), capture_output=True, text=True,
                       timeout=3600)
    took = time.time() - t0
    assert p.returncode == 0, f"exit {p.returncode}\n{p.stdout[-3000:]}\n{p.stderr[-3000:]}"

    args = json.loads((out / "args.json").read_text())
    prompts = [s.strip() for s in args["sample_prompts"].split("|") if s.strip()]
    # the demo's prompts: one per direction, so that every direction's motion is checked
    assert {d for s in prompts for d in DIRECTIONS if d in s.split()} == set(DIRECTIONS), prompts
    frames, size = args["sample_frames"] or args["frames"], (args["height"], args["width"])
    failed = []
    for i, prompt in enumerate(prompts):
        path = out / "samples" / f"step_{args['max_steps']:08d}_{i}.mp4"
        assert path.exists(), f"no sample for {prompt!r}: {path}"
        ok, why = check_clip(read_clip(str(path), 0, frames, args["fps"], size), prompt)
        if not ok:
            failed.append(f"{prompt!r} (sample {i}): {why}")
    assert not failed, f"{len(failed)} of {len(prompts)} samples fail (run took {took:.0f}s):\n" + "\n".join(failed)
