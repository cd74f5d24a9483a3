"""Wan 2.2 A14B as diffusers ships it (Wan2.2-T2V-A14B-Diffusers: transformer/ = the high-noise expert,
transformer_2/ = the low-noise one, model_index.json's boundary_ratio) goes the official root's way through main():
--mode sample with the diffusers root as --dit_path gives the very video of the official root (the same weights)
at that boundary, and another video at the official default boundary."""
import json

import pytest

import train_wan as W
from data.video import read_clip
from tests import checks
from tests.procs import script_runner
from tests.test_wan22_a14b import make_a14b
from tests.test_wan_loading import save_diffusers

wan = script_runner("train_wan.py")


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    return checks.official_folder(tmp_path_factory, "Wan2.2-T2V-A14B-tiny", make_a14b)


def test_diffusers_root_samples_as_the_official_root(folder, tmp_path):
    root = tmp_path / "Wan2.2-T2V-A14B-tiny-Diffusers"
    for official, sub in (("high_noise_model", "transformer"), ("low_noise_model", "transformer_2")):
        save_diffusers(W.load_dit(f"{folder['ckpt']}/{official}"), root / sub)
    (root / "model_index.json").write_text(json.dumps({"_class_name": "WanPipeline", "boundary_ratio": 0.6}))
    # 4 steps at shift 1: sigmas 1, 0.75, 0.5, 0.25; boundary 0.6 gives the high-noise expert two, 0.875 one
    flags = ["--mode", "sample", "--ckpt_dir", folder["ckpt"], "--sample_prompts", "a blue square moving up",
             "--sample_steps", "4", "--sample_shift", "1", "--sample_guidance_high", "4", "--height", "32", "--width",
             "32", "--frames", "5", "--dtype", "bf16", "--cache_dir", folder["cache"]]
    wan(*flags, "--boundary", "0.6", "--out_dir", str(tmp_path / "official"))
    wan(*flags, "--dit_path", str(root), "--out_dir", str(tmp_path / "diffusers"))
    wan(*flags, "--out_dir", str(tmp_path / "default"))
    a, b, c = (read_clip(str(tmp_path / d / "samples" / "step_00000000_0.mp4"), 0, 5, 16, (32, 32))
               for d in ("official", "diffusers", "default"))
    assert (a - b).abs().max() == 0
    assert (a - c).abs().float().mean() > 0.001, (a - c).abs().float().mean()
