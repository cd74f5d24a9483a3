"""train_mochi.py's memory flags on the tiny Mochi DiT in bf16 on CPU: --offload 1 gives bitwise the loss and the
adapters' gradients of the plain model (through build_dit, the code main() runs) and the same log through main();
--base_dtype float8 stays within float8's tolerance; a LoRA run through main() trains with each flag (and both); a
resume with both continues exactly; bench runs with both; the flags are refused, in one line, where they do not
apply. The mechanisms themselves: tests/test_common_memory.py. Mirrors tests/test_hunyuan_memory.py."""
import contextlib
import json
import os

import pytest
import torch

import train_mochi as M
from common.log import read_log
from tests import checks
from tests.procs import run_script
from tests.test_mochi_dit import tiny_dit
from tests.test_mochi_main import CLIP, make_official_folder

LORA = ["--lora_rank", "4", "--lr", "5e-2", "--ac", "1", "--timestep_sampling", "uniform", "--caption_dropout", "0"]


def mochi(*flags, check=True):
    return run_script("train_mochi.py", flags, check=check)


mochi.script = "train_mochi.py"  # for checks.check_user_error, which runs main() in this process


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


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    f = checks.official_folder(tmp_path_factory, "mochi-1-preview-tiny", make_official_folder)
    mochi("--mode", "cache", "--ckpt_dir", f["ckpt"], "--data", f["data"], "--cache_dir", f["cache"], *CLIP)
    return f


# ---------------------------------------------------------------------------------------------- the model API

def step(flags, sd, lora):
    """build_dit as main() calls it (bf16, LoRA rank 4 with the adapters `lora`, --ac 1 + flags), one flow loss and
    its backward on fixed inputs (two prompts of different lengths: the text mask) -> (loss, {adapter: gradient})."""
    args = M.Args(preset="tiny", lora_rank=4, ac=1, dtype="bf16", **flags)
    cfg = M.DIT_PRESETS["tiny"]
    g = torch.Generator().manual_seed(5)
    x0, eps = torch.randn(2, 12, 2, 4, 4, generator=g), torch.randn(2, 12, 2, 4, 4, generator=g)
    y = torch.randn(2, cfg.text_len, cfg.t5_dim, generator=g)
    mask = torch.arange(cfg.text_len)[None] < torch.tensor([[16], [5]])
    with world_of_one():
        model = M.build_dit(args, cfg, {**sd, **lora}, torch.device("cpu"), torch.bfloat16)
        loss = M.flow_loss(model, x0, y, mask, torch.tensor([0.3, 0.8]), eps)
        loss.backward()
        grads = {M.clean_name(n): p.grad.full_tensor().float() for n, p in model.named_parameters() if p.requires_grad}
    return loss.item(), grads


@pytest.fixture(scope="module")
def weights():
    sd = {k: v.to(torch.bfloat16) if not M.keep_fp32(k) else v for k, v in tiny_dit().state_dict().items()}
    with torch.device("meta"):
        probe = M.add_lora(M.AsymmDiT(M.DIT_PRESETS["tiny"]), 4, 4)
    g = torch.Generator().manual_seed(3)  # non-zero A and B: both get gradients, the adapters matter
    lora = {k: torch.randn(v.shape, generator=g) * 0.1 for k, v in probe.state_dict().items() if ".lora_" in k}
    return sd, lora


def test_offload_is_bitwise_and_float8_within_tolerance_through_build_dit(weights):
    """float8 against the plain bf16 model, measured: the loss moves by 2.8e-3 relative, all the adapters' gradients
    together by 10.5%, the worst single adapter by 13% (tiny_dit's weights are all O(1)-effect, so every rounding
    shows). Pinned at about 2x: 6e-3, 0.2 and 0.25."""
    sd, lora = weights
    loss0, g0 = step({}, sd, lora)
    loss1, g1 = step({"offload": True}, sd, lora)
    assert loss1 == loss0 and g1.keys() == g0.keys() and all(torch.equal(g1[k], g0[k]) for k in g0)
    assert len(g0) == 2 * (4 + 4 + 3) and all(g.abs().sum() > 0 for g in g0.values())  # every adapter trains
    loss8, g8 = step({"base_dtype": "float8"}, sd, lora)
    a, b = torch.cat([g0[k].flatten() for k in g0]), torch.cat([g8[k].flatten() for k in g0])
    worst = max(((g8[k] - g0[k]).norm() / g0[k].norm()).item() for k in g0)
    assert 0 < abs(loss8 - loss0) / loss0 < 6e-3, (loss8, loss0)
    assert ((b - a).norm() / a.norm()).item() < 0.2
    assert worst < 0.25, worst
    loss9, g9 = step({"base_dtype": "float8", "offload": True}, sd, lora)  # both: bitwise float8 alone
    assert loss9 == loss8 and all(torch.equal(g9[k], g8[k]) for k in g8)



# ---------------------------------------------------------------------------------------------- main()

def test_lora_runs_through_main_with_each_flag(folder, tmp_path):
    """10 steps of LoRA on the tiny official-layout folder in bf16, plain and with each flag: --offload 1 logs the
    plain run's losses and gradient norms exactly (also with float8); float8 within 2% of the plain losses; every
    run trains: over steps 8-10 its loss is below that of a --lr 0 run on the same batches, noise and sigmas (measured,
    plain: 4.95 against 5.25; float8: 4.95). The loss per step moves more with the clip than with training in 10
    steps, so the frozen run is the yardstick, not step 1."""
    common = ["--ckpt_dir", folder["ckpt"], "--data", folder["data"], "--cache_dir", folder["cache"], *CLIP, *LORA,
              "--max_steps", "10"]
    mochi(*common, "--lr", "0", "--out_dir", str(tmp_path / "frozen"))  # the same batches, noise and sigmas, untrained
    frozen = sum(r["loss"] for r in read_log(tmp_path / "frozen") if "loss" in r and r["step"] > 7)
    logs = {}
    for name, flags in {"plain": [], "offload": ["--offload", "1"], "float8": ["--base_dtype", "float8"],
                        "both": ["--offload", "1", "--base_dtype", "float8"]}.items():
        p = mochi(*common, *flags, "--out_dir", str(tmp_path / name))
        logs[name] = [r for r in read_log(tmp_path / name) if "loss" in r]
        assert [r["step"] for r in logs[name]] == list(range(1, 11)), p.stdout[-2000:]
        assert ("offload: " in p.stdout) == ("--offload" in flags), p.stdout[-2000:]
        assert ("float8 base: " in p.stdout) == ("float8" in flags), p.stdout[-2000:]
        last = sum(r["loss"] for r in logs[name][-3:])
        assert last < 0.97 * frozen, (name, [r["loss"] for r in logs[name]])
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
    p = mochi(*common, "--offload", "1", "--out_dir", str(tmp_path / "float8"), "--resume", "1", check=False)
    assert p.returncode == 2 and "base_dtype was 'float8', now None" in p.stderr, p.stderr[-1000:]


def test_resume_with_both_flags_continues_exactly(folder, tmp_path):
    """2 steps + a checkpoint, then on to 4 with --resume 1, equal the uninterrupted 4 steps (the checkpoint holds
    the adapters and AdamW only; the float8 base is made again from --ckpt_dir)."""
    common = ["--ckpt_dir", folder["ckpt"], "--data", folder["data"], "--cache_dir", folder["cache"], *CLIP, *LORA,
              "--offload", "1", "--base_dtype", "float8", "--ckpt_every", "2"]
    mochi(*common, "--max_steps", "4", "--out_dir", str(tmp_path / "whole"))
    mochi(*common, "--max_steps", "2", "--out_dir", str(tmp_path / "resumed"))
    mochi(*common, "--max_steps", "4", "--out_dir", str(tmp_path / "resumed"), "--resume", "1")
    logs = [[(r["loss"], r["grad_norm"]) for r in read_log(tmp_path / d) if "loss" in r] for d in ("whole", "resumed")]
    assert len(logs[0]) == 4 and logs[0] == logs[1]


# random: the 10B's bench rows at tiny size. The blocks' frozen Linears: mod_x, mod_y, qkv_x, qkv_y, proj_x, proj_y
# and the two SwiGLUs' w1, w2 (10), the last block without proj_y and mlp_y (7): the test folder's depth 2 -> 17,
# the tiny preset's depth 3 -> 27
@pytest.mark.parametrize("weights_from, n", [("ckpt_dir", 17), ("random", 27)])
def test_bench_with_both_flags(folder, weights_from, n):
    src = ["--ckpt_dir", folder["ckpt"]] if weights_from == "ckpt_dir" else ["--preset", "tiny"]
    p = mochi("--mode", "bench", *src, *CLIP, "--bench_steps", "1", "--lora_rank", "4", "--ac", "1", "--offload", "1",
              "--base_dtype", "float8")
    res = json.loads([line for line in p.stdout.splitlines() if line.startswith("{")][-1])
    assert res["loss"] == res["loss"] and res["step_s"] > 0 and f"float8 base: {n} frozen Linear" in p.stdout
    assert res["base_dtype"] == "float8" and res["offload"] is True and "offload: " in p.stdout


@pytest.mark.parametrize("flags, says", [
    (["--offload", "1", "--ac", "1"], "--offload 1 converts the frozen base of a LoRA run: add --lora_rank"),
    (["--base_dtype", "float8", "--lora_rank", "4"], "--base_dtype float8 needs --ac 1"),
    (["--offload", "1", "--lora_rank", "4", "--ac", "1", "--compile", "1"], "does not combine with --compile 1"),
    (["--base_dtype", "fp8"], "--base_dtype 'fp8': expected one of auto, float8"),
    (["--mode", "sample", "--sample_prompts", "a", "--base_dtype", "float8"], "--base_dtype float8 is for LoRA "
     "training (--mode train or bench); --mode sample runs without it"),
])
def test_user_errors(folder, tmp_path, flags, says):
    base = ["--ckpt_dir", folder["ckpt"], "--data", folder["data"], "--out_dir", str(tmp_path / "o"), *CLIP]
    checks.check_user_error(mochi, [*base, *flags], says, tmp_path / "o")


def test_refused_with_two_processes(folder, tmp_path):
    p = run_script("train_mochi.py", ["--ckpt_dir", folder["ckpt"], "--data", folder["data"], "--cache_dir",
                                      folder["cache"], "--out_dir", str(tmp_path / "o"), *CLIP, *LORA,
                                      "--offload", "1"], nproc=2, check=False)
    assert p.returncode != 0 and "error: --base_dtype float8 and --offload 1 are for one-process LoRA runs" in \
        p.stderr, p.stderr[-2000:]
