"""train_wan.py's memory flags on the tiny Wan DiT in bf16 on CPU: --offload 1 gives bitwise the loss and the
adapters' gradients of the plain model (through build_dit, the code main() runs) and the same log through main();
--base_dtype float8 stays within float8's tolerance; a LoRA run through main() trains with each flag (and both);
Wan 2.2 A14B: both experts get them, and a resumed run with both flags continues exactly; the flags are refused, in
one line, where they do not apply. The mechanisms themselves: tests/test_common_memory.py."""
import contextlib
import json
import os

import pytest
import torch

import train_wan as W
from common.log import read_log
from tests import checks
from tests.helpers import make_official_folder, tiny_dit
from tests.procs import run_script, script_runner
from tests.test_wan22_a14b import ROUTE, make_a14b

# 32x32 pixels, 5 frames at 16 fps -> latents 16 x 2 x 4 x 4 -> 8 tokens (tests/test_wan_main.py's clip)
CLIP = ["--height", "32", "--width", "32", "--frames", "5", "--fps", "16", "--log_every", "1", "--warmup_steps", "1",
        "--global_batch", "2", "--micro_batch", "1", "--dtype", "bf16"]
LORA = ["--lora_rank", "4", "--lr", "5e-2", "--ac", "1", "--timestep_sampling", "uniform"]

wan = script_runner("train_wan.py")


@contextlib.contextmanager
def world_of_one():
    """A one-process gloo group (common/dist.init) for the block, torn down with the environment it set."""
    from common import dist as cdist
    env = dict(os.environ)
    cdist.init()
    try:
        yield
    finally:
        cdist.cleanup()
        os.environ.clear()
        os.environ.update(env)


def cached(tmp_path_factory, name, make):
    f = checks.official_folder(tmp_path_factory, name, make)
    wan("--mode", "cache", "--ckpt_dir", f["ckpt"], "--data", f["data"], "--cache_dir", f["cache"], *CLIP)
    return f


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    return cached(tmp_path_factory, "Wan2.1-T2V-tiny", make_official_folder)


@pytest.fixture(scope="module")
def a14b(tmp_path_factory):
    return cached(tmp_path_factory, "Wan2.2-T2V-A14B-tiny", make_a14b)


# ---------------------------------------------------------------------------------------------- the model API

def step(flags, sd, lora):
    """build_dit as main() calls it (bf16, LoRA rank 4 with the adapters `lora`, --ac 1, flags), one flow loss and
    its backward on fixed inputs -> (loss, {adapter name: gradient})."""
    args = W.Args(**{"preset": "tiny", "lora_rank": 4, "ac": 1, "dtype": "bf16", **flags})
    cfg = W.DIT_PRESETS["tiny"]
    g = torch.Generator().manual_seed(5)
    x0, eps = torch.randn(2, 16, 2, 4, 4, generator=g), torch.randn(2, 16, 2, 4, 4, generator=g)
    ctx = torch.randn(2, 6, cfg.text_dim, generator=g)
    with world_of_one():
        model = W.build_dit(args, cfg, {**sd, **lora}, torch.device("cpu"), torch.bfloat16)
        loss = W.flow_loss(model, x0, ctx, torch.tensor([0.3, 0.8]), eps)
        loss.backward()
        grads = {W.clean_name(n): p.grad.full_tensor().float() for n, p in model.named_parameters() if p.requires_grad}
    return loss.item(), grads


@pytest.fixture(scope="module")
def weights():
    sd = {k: v.to(torch.bfloat16) for k, v in tiny_dit().state_dict().items()}  # a LoRA's base: read in bf16
    with torch.device("meta"):
        probe = W.add_lora(W.WanModel(W.DIT_PRESETS["tiny"]), 4, 4)
    g = torch.Generator().manual_seed(3)  # non-zero A and B: both get gradients, the adapters matter
    lora = {k: torch.randn(v.shape, generator=g) * 0.1 for k, v in probe.state_dict().items() if ".lora_" in k}
    return sd, lora


def test_offload_is_bitwise_and_float8_within_tolerance_through_build_dit(weights):
    """float8 against the plain bf16 model, measured: the loss moves by 1.4e-4 relative, all the adapters'
    gradients together by 3.9%, the worst single adapter by 7.8%. Pinned at about 2x: 3e-4, 0.08 and 0.16."""
    sd, lora = weights
    loss0, g0 = step({}, sd, lora)
    loss1, g1 = step({"offload": True}, sd, lora)
    assert loss1 == loss0 and g1.keys() == g0.keys() and all(torch.equal(g1[k], g0[k]) for k in g0)
    assert len(g0) == 2 * 2 * 10 and all(g.abs().sum() > 0 for g in g0.values())  # every adapter trains
    loss8, g8 = step({"base_dtype": "float8"}, sd, lora)
    assert 0 < abs(loss8 - loss0) / loss0 < 3e-4, (loss8, loss0)
    a, b = torch.cat([g0[k].flatten() for k in g0]), torch.cat([g8[k].flatten() for k in g0])
    assert ((b - a).norm() / a.norm()).item() < 0.08
    worst = max(((g8[k] - g0[k]).norm() / g0[k].norm()).item() for k in g0)
    assert worst < 0.16, worst
    loss9, g9 = step({"base_dtype": "float8", "offload": True}, sd, lora)  # both: bitwise float8 alone
    assert loss9 == loss8 and all(torch.equal(g9[k], g8[k]) for k in g8)
    loss2, g2 = step({"base_dtype": "float8", "offload": True, "ac": 2}, sd, lora)  # + --ac 2, the 81-frame recipe
    assert loss2 == loss8 and all(torch.equal(g2[k], g8[k]) for k in g8)


# ---------------------------------------------------------------------------------------------- main()

def test_lora_runs_through_main_with_each_flag(folder, tmp_path):
    """10 steps of LoRA on the tiny official-layout folder in bf16, plain and with each flag: --offload 1 logs the
    plain run's losses and gradient norms exactly (also with float8); float8 within 2% of the plain losses; the
    loss falls in every run."""
    common = ["--ckpt_dir", folder["ckpt"], "--data", folder["data"], "--cache_dir", folder["cache"], *CLIP, *LORA,
              "--max_steps", "10"]
    logs = {}
    for name, flags in {"plain": [], "offload": ["--offload", "1"], "float8": ["--base_dtype", "float8"],
                        "both": ["--offload", "1", "--base_dtype", "float8"]}.items():
        p = wan(*common, *flags, "--out_dir", str(tmp_path / name))
        logs[name] = [r for r in read_log(tmp_path / name) if "loss" in r]
        assert [r["step"] for r in logs[name]] == list(range(1, 11)), p.stdout[-2000:]
        assert ("offload: " in p.stdout) == ("--offload" in flags), p.stdout[-2000:]
        assert ("float8 base: 20 frozen Linear" in p.stdout) == ("float8" in flags), p.stdout[-2000:]
        first, last = sum(r["loss"] for r in logs[name][:3]), sum(r["loss"] for r in logs[name][-3:])
        assert last < 0.95 * first, (name, [r["loss"] for r in logs[name]])
        assert os.path.exists(tmp_path / name / "lora.safetensors")
    for a, b in (("plain", "offload"), ("float8", "both")):
        assert [(r["loss"], r["grad_norm"]) for r in logs[a]] == [(r["loss"], r["grad_norm"]) for r in logs[b]]
    for r0, r8 in zip(logs["plain"], logs["float8"]):
        assert abs(r8["loss"] - r0["loss"]) < 0.02 * r0["loss"], (r0, r8)
    with open(tmp_path / "float8" / "run.json") as f:  # float8 changes the math: a resume must keep it
        assert json.load(f)["fingerprint"]["base_dtype"] == "float8"
    with open(tmp_path / "offload" / "run.json") as f:  # offload does not: not in the fingerprint
        assert "base_dtype" not in json.load(f)["fingerprint"]

    # a resume must keep float8 (one line, before any training)
    p = wan(*common, "--offload", "1", "--out_dir", str(tmp_path / "float8"), "--resume", "1", check=False)
    assert p.returncode == 2 and "base_dtype was 'float8', now None" in p.stderr, p.stderr[-1000:]


def test_a14b_resume_with_both_flags_continues_exactly(a14b, tmp_path):
    """Wan 2.2 A14B, both experts (routed by step, boundary 0.5): each expert's blocks get the float8 base and the
    streamer (two lines each); 2 steps + a checkpoint, then on to 4 with --resume 1, equal the uninterrupted 4 steps
    (the checkpoint holds the adapters and AdamW only; the float8 base is made again from --ckpt_dir); both experts
    trained; and --offload 1 alone logs what the plain run logs."""
    common = ["--ckpt_dir", a14b["ckpt"], "--data", a14b["data"], "--cache_dir", a14b["cache"], *CLIP, *LORA, *ROUTE,
              "--ckpt_every", "2"]
    p = wan(*common, "--offload", "1", "--base_dtype", "float8", "--max_steps", "4", "--out_dir", str(tmp_path / "w"))
    assert p.stdout.count("float8 base: 20 frozen Linear") == 2 and p.stdout.count("offload: ") == 2, p.stdout[-2000:]
    for steps in ("2", "4"):
        wan(*common, "--offload", "1", "--base_dtype", "float8", "--max_steps", steps, "--out_dir", str(tmp_path / "r"),
            *(["--resume", "1"] if steps == "4" else []))
    logs = [[(r["loss"], r["grad_norm"], r["expert"]) for r in read_log(tmp_path / d) if "loss" in r] for d in "wr"]
    assert logs[0] == logs[1] and len(logs[0]) == 4 and {r[2] for r in logs[0]} == {"high", "low"}, logs
    for d in ("w", "r"):
        assert sorted(f for f in os.listdir(tmp_path / d) if f.endswith(".safetensors")) == [
            "lora_high_noise.safetensors", "lora_low_noise.safetensors"]
    for name, flags in (("plain", []), ("offload", ["--offload", "1"])):
        wan(*common, *flags, "--max_steps", "4", "--out_dir", str(tmp_path / name))
    plain, off = ([(r["loss"], r["grad_norm"]) for r in read_log(tmp_path / d) if "loss" in r] for d in ("plain",
                                                                                                         "offload"))
    assert plain == off and len(plain) == 4


@pytest.mark.parametrize("weights_from", ["ckpt_dir", "random"])  # random: the 14B benches' path, at tiny size
def test_bench_with_both_flags(folder, weights_from):
    src = ["--ckpt_dir", folder["ckpt"]] if weights_from == "ckpt_dir" else ["--preset", "tiny"]
    p = wan("--mode", "bench", *src, *CLIP, "--bench_steps", "1", "--lora_rank", "4", "--ac", "1", "--offload", "1",
            "--base_dtype", "float8")
    res = json.loads([line for line in p.stdout.splitlines() if line.startswith("{")][-1])
    assert res["loss"] == res["loss"] and res["step_s"] > 0 and "float8 base: 20 frozen Linear" in p.stdout
    assert res["base_dtype"] == "float8" and res["offload"] is True and "offload: " in p.stdout


@pytest.mark.parametrize("flags, says", [
    (["--offload", "1", "--ac", "1"], "--offload 1 converts the frozen base of a LoRA run: add --lora_rank"),
    (["--base_dtype", "float8", "--lora_rank", "4"], "--base_dtype float8 needs --ac 1"),
    (["--offload", "1", "--lora_rank", "4", "--ac", "1", "--compile", "1"], "does not combine with --compile 1"),
    (["--base_dtype", "fp8"], "--base_dtype 'fp8': expected one of auto, float8"),
    (["--mode", "sample", "--sample_prompts", "a", "--offload", "1"], "--offload 1 is for LoRA training (--mode train "
     "or bench); --mode sample runs without it"),
])
def test_user_errors(folder, tmp_path, flags, says):
    base = ["--ckpt_dir", folder["ckpt"], "--data", folder["data"], "--out_dir", str(tmp_path / "o"), *CLIP]
    checks.check_user_error(wan, [*base, *flags], says, tmp_path / "o")


def test_refused_with_two_processes(folder, tmp_path):
    p = run_script("train_wan.py", ["--ckpt_dir", folder["ckpt"], "--data", folder["data"], "--cache_dir",
                                    folder["cache"], "--out_dir", str(tmp_path / "o"), *CLIP, *LORA,
                                    "--offload", "1"], nproc=2, check=False)
    assert p.returncode != 0 and "error: --base_dtype float8 and --offload 1 are for one-process LoRA runs" in \
        p.stderr, p.stderr[-2000:]
