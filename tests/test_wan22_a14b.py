"""Wan 2.2 A14B's two experts in train_wan.py: a tiny test-made root in the official layout (high_noise_model/ and
low_noise_model/, each a DiT folder; the Wan 2.1 VAE and umT5 beside them), bf16 on CPU. --expert both: each step is
routed to one expert (step_expert), and between two checkpoints only that expert's LoRA and optimizer state change;
one LoRA file per expert; the samples switch expert at the boundary. --expert high trains that one alone. In-process:
the sigma ranges and masses, and Experts' routing by t."""
import os
import shutil
import types

import pytest
import torch
from safetensors import safe_open

import train_wan as W
from common.log import read_log
from data.video import read_clip
from tests import checks
from tests.helpers import make_official_folder
from tests.procs import script_runner

CLIP = ["--height", "32", "--width", "32", "--frames", "5", "--fps", "16", "--log_every", "1", "--warmup_steps", "1",
        "--global_batch", "2", "--micro_batch", "1", "--dtype", "bf16"]
# uniform sigmas and boundary 0.5: each expert gets about half of the steps
ROUTE = ["--timestep_sampling", "uniform", "--boundary", "0.5", "--seed", "0"]

wan = script_runner("train_wan.py")


def make_a14b(root):
    """The T2V-A14B layout: two DiTs of the same shapes (different weights) in their folders, shared VAE and umT5."""
    make_official_folder(root)
    other = root + "-other"
    make_official_folder(other, seed=7)
    for expert, src in (("high_noise_model", root), ("low_noise_model", other)):
        os.makedirs(os.path.join(root, expert))
        for f in ("config.json", "diffusion_pytorch_model.safetensors"):
            shutil.move(os.path.join(src, f), os.path.join(root, expert, f))
    shutil.rmtree(other)
    return root


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    return checks.official_folder(tmp_path_factory, "Wan2.2-T2V-A14B-tiny", make_a14b)


def _flat(d, prefix=""):
    out = {}
    for k, v in d.items():
        if isinstance(v, dict):
            out.update(_flat(v, f"{prefix}{k}/"))
        elif torch.is_tensor(v):
            out[f"{prefix}{k}"] = v
    return out


def _checkpoint(out, step):
    from torch.distributed.checkpoint.format_utils import dcp_to_torch_save
    f = out / f"ckpt{step}.pt"
    dcp_to_torch_save(str(out / "checkpoints" / f"step_{step:08d}"), str(f))
    return _flat(torch.load(f, weights_only=False))


def test_sigma_ranges_masses_and_routing():
    assert W.sigma_range("high", 0.875) == (0.875, 1.0) and W.sigma_range("low", 0.9) == (0.0, 0.9)
    assert W.sigma_mass("uniform", 1.0, 0.5, 1.0) == pytest.approx(0.5)
    assert W.sigma_mass("logit_normal", 1.0, 0.5, 1.0) == pytest.approx(0.5)
    assert W.sigma_mass("uniform", 3.0, 0.75, 1.0) == pytest.approx(0.5)  # shift 3 puts sigma 0.75 at u = 0.5
    args = types.SimpleNamespace(seed=0, timestep_sampling="logit_normal", shift=1.0, caption_dropout=0.0)
    s, _ = W.training_draws(args, 3, 0, 64, "cpu", 0.875, 1.0)
    assert (s >= 0.875).all() and (s < 1).all()
    s, _ = W.training_draws(args, 3, 0, 64, "cpu", 0.0, 0.875)
    assert (s < 0.875).all()
    assert torch.equal(W.training_draws(args, 3, 0, 8, "cpu")[0], W.training_draws(args, 3, 0, 8, "cpu", 0, 1)[0])
    # the share of steps per expert is the sigma mass above the boundary
    args.timestep_sampling = "uniform"
    routes = [W.step_expert(args, k, {"high": "", "low": ""}, 0.75) for k in range(2000)]
    assert routes.count("high") / 2000 == pytest.approx(0.25, abs=0.03)
    assert W.step_expert(args, 0, {"low": ""}, 0.75) == "low"

    class Const(torch.nn.Module):
        def __init__(self, v):
            super().__init__()
            self.v = v

        def forward(self, x, t, context, y=None, clip_fea=None):
            return torch.full_like(x, self.v)
    m = W.Experts(Const(1.0), Const(2.0), 0.875)
    x = torch.zeros(2, 1, 1, 1, 1)
    assert m(x, torch.tensor([875.0, 999.0]), None).unique().tolist() == [1.0]
    assert m(x, torch.tensor([874.0, 10.0]), None).unique().tolist() == [2.0]
    with pytest.raises(ValueError, match="straddles"):
        m(x, torch.tensor([900.0, 10.0]), None)


def test_both_experts_each_step_changes_only_its_expert(folder, tmp_path):
    common = ["--ckpt_dir", folder["ckpt"], "--data", folder["data"], "--cache_dir", folder["cache"], *CLIP, *ROUTE]
    out = tmp_path / "both"
    wan(*common, "--out_dir", str(out), "--max_steps", "6", "--ckpt_every", "1", "--keep", "0", "--lora_rank", "4",
        "--lr", "5e-2", "--sample_prompts", "a red circle moving left", "--sample_steps", "4")
    log = [r for r in read_log(out) if "loss" in r]
    args = types.SimpleNamespace(seed=0, timestep_sampling="uniform", shift=1.0)
    want = [W.step_expert(args, s - 1, {"high": "", "low": ""}, 0.5) for s in range(1, 7)]
    assert [r["expert"] for r in log] == want and {"high", "low"} <= set(want[1:]), want
    for s in range(2, 7):  # step s trained want[s - 1]: its tensors moved, the other expert's are bit-equal
        a, b = _checkpoint(out, s - 1), _checkpoint(out, s)
        on, off = want[s - 1], {"high": "low", "low": "high"}[want[s - 1]]
        mine = [k for k in b if f"{on}." in k and "lora_B" in k and k.endswith(("weight", "exp_avg"))]  # A's grads: 0
        assert mine and all(not torch.equal(a.get(k, torch.zeros_like(b[k])), b[k]) for k in mine), (s, on)
        other = [k for k in a if f"{off}." in k]
        assert other and all(torch.equal(a[k], b[k]) for k in other), (s, off)
        assert not any(f"{off}." in k for k in set(b) - set(a))  # no optimizer state appears for the idle expert
    for e in ("high", "low"):
        lsd, rank, _ = W.read_lora(str(out / f"lora_{e}_noise.safetensors"))
        assert rank == 4 and max(v.abs().max().item() for k, v in lsd.items() if ".lora_B." in k) > 0
        with safe_open(str(out / f"lora_{e}_noise.safetensors"), "pt") as f:
            assert f.metadata()["base_model"] == f"Wan-t2v-custom-{e}-noise"  # which model the file goes on
    assert not os.path.exists(out / "lora.safetensors")
    assert os.path.exists(out / "samples" / "step_00000006_0.mp4")
    # --mode sample --lora: the run folder puts each file on its expert; the two files swapped, or none, differ
    videos = {}
    for name, lora in (("folder", [str(out)]), ("swapped", [f"{out}/lora_low_noise.safetensors,"
                                                            f"{out}/lora_high_noise.safetensors"]), ("none", [])):
        s_out = tmp_path / f"s_{name}"
        wan("--mode", "sample", "--ckpt_dir", folder["ckpt"], "--cache_dir", folder["cache"], *CLIP[:8],
            "--dtype", "bf16", "--sample_prompts", "a red circle moving left", "--sample_steps", "3", "--out_dir",
            str(s_out), *(["--lora", *lora] if lora else []))
        videos[name] = read_clip(str(s_out / "samples" / "step_00000000_0.mp4"), 0, 5, 16, (32, 32)).float()
    assert not torch.equal(videos["folder"], videos["none"]) and not torch.equal(videos["folder"], videos["swapped"])
    # resumed to 8: both experts and the optimizer come back from the checkpoint, the routing goes on
    wan(*common, "--out_dir", str(out), "--max_steps", "8", "--ckpt_every", "1", "--keep", "0", "--lora_rank", "4",
        "--lr", "5e-2", "--resume", "1")
    log = [r for r in read_log(out) if "loss" in r]
    assert [r["step"] for r in log] == list(range(1, 9))
    assert [r["expert"] for r in log] == [W.step_expert(args, s, {"high": "", "low": ""}, 0.5) for s in range(8)]

    # --init_lora from the run folder and --base_lora high=/low= put each file on its expert: 6 untrained steps (lr
    # 0, fp32) see the same losses both ways, and other losses with the two files swapped
    one = [*common, "--dtype", "fp32", "--max_steps", "6", "--lr", "0"]  # the last --dtype counts
    high, low = f"{out}/lora_high_noise.safetensors", f"{out}/lora_low_noise.safetensors"
    runs = {"init": ["--init_lora", str(out)], "base": ["--base_lora", f"low={low},high={high}", "--lora_rank", "4"],
            "swapped": ["--base_lora", f"high={low},low={high}", "--lora_rank", "4"]}
    got = {}
    for name, flags in runs.items():
        wan(*one, *flags, "--out_dir", str(tmp_path / name))
        got[name] = [r["loss"] for r in read_log(tmp_path / name) if "loss" in r]
    assert {r["expert"] for r in read_log(tmp_path / "init") if "loss" in r} == {"high", "low"}
    for a, b, c in zip(got["init"], got["base"], got["swapped"]):
        assert abs(a - b) <= 1e-5 * abs(a) and abs(a - c) > 1e-4 * abs(a), got


def test_one_expert_trains_alone_on_its_range(folder, tmp_path):
    common = ["--ckpt_dir", folder["ckpt"], "--data", folder["data"], "--cache_dir", folder["cache"], *CLIP, *ROUTE]
    out = tmp_path / "high"
    wan(*common, "--out_dir", str(out), "--max_steps", "2", "--lora_rank", "4", "--lr", "5e-2", "--expert", "high")
    assert [r["expert"] for r in read_log(out) if "loss" in r] == ["high", "high"]
    assert sorted(f for f in os.listdir(out) if f.endswith(".safetensors")) == ["lora_high_noise.safetensors"]
    # --mode sample on the A14B root: both experts, switched at the boundary
    wan("--mode", "sample", "--ckpt_dir", folder["ckpt"], "--sample_prompts", "a blue square moving up",
        "--sample_steps", "3", "--height", "32", "--width", "32", "--frames", "5", "--dtype", "bf16", "--cache_dir", folder["cache"],
        "--out_dir", str(tmp_path / "s"))
    assert os.path.exists(tmp_path / "s" / "samples" / "step_00000000_0.mp4")


def test_expert_needs_an_a14b_folder(tmp_path):
    t2v = make_official_folder(str(tmp_path / "t2v"))
    flags = ["--ckpt_dir", t2v, "--data", str(tmp_path), "--expert", "high", "--out_dir", str(tmp_path / "o")]
    checks.check_user_error(wan, flags, "--expert high: --ckpt_dir is not a Wan 2.2 A14B", tmp_path / "o")
    flags = ["--ckpt_dir", t2v, "--data", str(tmp_path), "--sample_guidance_high", "4", "--out_dir",
             str(tmp_path / "o")]
    checks.check_user_error(wan, flags, "--sample_guidance_high 4.0: the guidance of the high-noise expert's steps, "
                            "for a Wan 2.2 A14B --ckpt_dir", tmp_path / "o")


def test_one_and_two_processes_route_alike(folder, tmp_path):
    """Under torchrun every rank runs the step's expert (FSDP2's collectives need all ranks in the same one): 1 and 2
    processes log the same experts, losses and gradient norms."""
    from tests.procs import close, run_script
    flags = ["--ckpt_dir", folder["ckpt"], "--data", folder["data"], "--cache_dir", folder["cache"], *CLIP, *ROUTE,
             "--global_batch", "4", "--lora_rank", "4", "--lr", "5e-2", "--max_steps", "4"]
    run_script("train_wan.py", [*flags, "--out_dir", str(tmp_path / "p1")])
    run_script("train_wan.py", [*flags, "--out_dir", str(tmp_path / "p2")], nproc=2)
    a, b = ([r for r in read_log(tmp_path / d) if "loss" in r] for d in ("p1", "p2"))
    assert [r["expert"] for r in a] == [r["expert"] for r in b] and len({r["expert"] for r in a}) == 2
    assert all(close(x["loss"], y["loss"]) and close(x["grad_norm"], y["grad_norm"], 1e-3) for x, y in zip(a, b))


def test_exports_name_the_release_they_were_trained_on():
    # the header's base_model: each release by its shapes; the A14B experts (the 14B's shapes) by the expert
    want = {("1.3B", ""): "Wan2.1-T2V-1.3B", ("14B", ""): "Wan2.1-T2V-14B", ("i2v-14B", ""): "Wan2.1-I2V-14B",
            ("flf2v-14B", ""): "Wan2.1-FLF2V-14B", ("ti2v-5B", ""): "Wan2.2-TI2V-5B",
            ("t2v-A14B", "high"): "Wan2.2-T2V-A14B-high-noise", ("t2v-A14B", "low"): "Wan2.2-T2V-A14B-low-noise",
            ("i2v-A14B", "low"): "Wan2.2-I2V-A14B-low-noise", ("tiny", ""): "Wan-t2v-custom"}
    assert {k: W.release_name(W.DIT_PRESETS[k[0]], k[1]) for k in want} == want


@pytest.mark.parametrize("solver", ["unipc", "euler"])
@pytest.mark.parametrize("low, high, boundary, shift", [(3.0, 4.0, 0.875, 12.0), (1.0, 3.5, 0.9, 5.0)])
def test_the_high_noise_steps_take_their_own_guidance(monkeypatch, solver, low, high, boundary, shift):
    """--sample_guidance_high: with guidance (low, high, boundary) each step of the sampler guides with `high`
    exactly on the steps the high-noise expert computes (Experts' own switch, t >= boundary * 1000) and with `low` on
    the others, as upstream's sample_guide_scale (low, high). Fake experts give velocity 1 for the prompt and 0 for
    the negative one, so each step's guided velocity is its scale; low 1 skips the negative batch (no guidance)."""
    called = []

    class Fake(torch.nn.Module):
        def __init__(self, name):
            super().__init__()
            self.name = name

        def forward(self, x, t, context, y=None, clip_fea=None):
            called.append(self.name)
            return context.mean(dim=(1, 2)).view(-1, 1, 1, 1, 1).expand_as(x).clone()  # (B, C, F, H, W)
    seen, real = [], W.velocity

    def recording(model, x, sigma, context, neg_context, guidance):
        v = real(model, x, sigma, context, neg_context, guidance)
        seen.append(v.unique().tolist())
        return v
    monkeypatch.setattr(W, "velocity", recording)  # the samplers look it up in the module at every step
    sample = W.sample_unipc if solver == "unipc" else W.sample_euler
    ctx, neg = torch.ones(1, 3, 4), torch.zeros(1, 3, 4)
    sample(W.Experts(Fake("high"), Fake("low"), boundary), torch.randn(1, 2, 2, 2, 2), ctx, neg, steps=12,
           guidance=(low, high, boundary), shift=shift)
    assert len(seen) == len(called) == 12 and {"high", "low"} == set(called), called
    assert [s == [high] for s in seen] == [c == "high" for c in called], (seen, called)
    assert all(s == [low] for s, c in zip(seen, called) if c == "low")
    seen.clear()  # a plain scale: every step the same, as before the flag
    sample(W.Experts(Fake("high"), Fake("low"), boundary), torch.randn(1, 2, 2, 2, 2), ctx, neg, steps=12,
           guidance=high, shift=shift)
    assert seen == [[high]] * 12


# slow: the default run keeps the sampler's per-expert guidance (the test above) on the model API
@pytest.mark.slow
def test_sample_guidance_high_reaches_the_samples(folder, tmp_path):
    """--mode sample on the A14B root (3 UniPC steps, shift 5: t 999 and 909 on the high-noise expert, 714 on the
    low): --sample_guidance_high equal to --sample_guidance gives the video of no flag, another scale another video."""
    videos = {}
    for name, extra in (("none", []), ("same", ["--sample_guidance_high", "5"]),
                        ("high", ["--sample_guidance_high", "9"])):
        wan("--mode", "sample", "--ckpt_dir", folder["ckpt"], "--cache_dir", folder["cache"], *CLIP[:8],
            "--dtype", "bf16", "--sample_prompts", "a red circle moving left", "--sample_steps", "3",
            "--sample_guidance", "5", "--out_dir", str(tmp_path / name), *extra)
        videos[name] = read_clip(str(tmp_path / name / "samples" / "step_00000000_0.mp4"), 0, 5, 16, (32, 32)).float()
    assert torch.equal(videos["none"], videos["same"]) and not torch.equal(videos["none"], videos["high"])
