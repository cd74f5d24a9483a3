"""common/: flags (help from comments, no prefix matching, preset tables, one-line user errors), the LR schedule and
the EMA, seeded noise (the same in every process), the run folder's ownership and resume checks, checkpoint
verification, weight-file key checks."""
import json
import os
import re
import subprocess
import sys
from dataclasses import dataclass

import pytest
import torch

from common import noise, run
from common.args import UserError, cli, field_comments, parse
from common.schedule import EMA

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@dataclass
class A:
    preset: str = "big"  # which architecture
    max_steps: int = 10  # optimizer steps (100% of them)
    flag: bool = False  # a switch
    lr: float = 0.1


def test_flags_parse_help_and_presets(capsys):
    assert parse(A, ["--max_steps", "3", "--flag=true", "--lr", "1e-3"]) == A(max_steps=3, flag=True, lr=1e-3)
    with pytest.raises(SystemExit):
        parse(A, ["--max_step", "20"])  # no prefix matching: a typo is an error, not another flag
    assert "unrecognized arguments: --max_step" in capsys.readouterr().err
    assert field_comments(A) == {"preset": "which architecture", "max_steps": "optimizer steps (100% of them)",
                                 "flag": "a switch"}
    with pytest.raises(SystemExit):
        parse(A, ["--help"])
    out = capsys.readouterr().out
    assert "optimizer steps (100% of them) (default: 10)" in " ".join(out.split())
    # a preset's table becomes the defaults; the command line still wins
    table = {"toy": dict(max_steps=600, lr=3.0)}
    assert parse(A, ["--preset", "toy"], presets=table) == A(preset="toy", max_steps=600, lr=3.0)
    assert parse(A, ["--preset=toy", "--max_steps", "5"], presets=table) == A(preset="toy", max_steps=5, lr=3.0)
    assert parse(A, ["--max_steps", "5"], presets=table) == A(max_steps=5)


def test_user_error_is_one_line_and_exit_2(capsys):
    def main():
        raise UserError("--height 30: must be a multiple of 16")
    with pytest.raises(SystemExit) as e:
        cli(main)
    assert e.value.code == 2
    assert capsys.readouterr().err == "error: --height 30: must be a multiple of 16\n"


def test_user_error_of_one_rank_is_printed_by_that_rank(capsys, monkeypatch):
    # one GPU of 4 out of memory in the preflight: rank 2 alone knows, so rank 2 says it (rank 0 would be silent)
    # and ends at once (os._exit: no teardown that could wait for the other ranks)
    def exit_now(code):
        raise SystemExit(("os._exit", code))
    monkeypatch.setattr(os, "_exit", exit_now)
    monkeypatch.setenv("RANK", "2")
    monkeypatch.setenv("WORLD_SIZE", "4")

    def main(this_rank):
        raise UserError("preflight: out of device memory", this_rank=this_rank)
    for this_rank, said, code in ((True, "error (rank 2): preflight: out of device memory\n", ("os._exit", 2)),
                                  (False, "", 2)):
        with pytest.raises(SystemExit) as e:
            cli(lambda: main(this_rank))
        assert e.value.code == code and capsys.readouterr().err == said
    monkeypatch.setenv("RANK", "0")  # one process: the usual exit (nothing to wait for), the usual line
    monkeypatch.setenv("WORLD_SIZE", "1")
    with pytest.raises(SystemExit) as e:
        cli(lambda: main(True))
    assert e.value.code == 2 and capsys.readouterr().err == "error: preflight: out of device memory\n"


ONE_RANK_FAILS = """
import torch.distributed as dist
from common import dist as cdist
from common.args import UserError, cli


def main():
    rank, world, _ = cdist.init()
    if rank == 1:  # as a preflight out of memory on one GPU: the others are left waiting in a collective
        raise UserError("preflight: out of device memory", this_rank=True)
    dist.barrier()  # rank 1 never comes


cli(main)
"""


def test_one_rank_user_error_ends_the_torchrun(tmp_path):
    """Through torchrun on 2 gloo processes: rank 1 raises a this_rank UserError while rank 0 waits in a barrier.
    Rank 1 says it in one line and exits 2 at once; torchrun then stops rank 0 and fails (no hang: the timeout).
    (On gloo rank 0's barrier fails too, when its peer goes; on NCCL it would wait until torchrun's SIGTERM.)"""
    from tests.procs import run_script
    script = tmp_path / "one_rank_fails.py"
    script.write_text(ONE_RANK_FAILS)
    p = run_script(str(script), [], nproc=2, check=False, timeout=300)
    assert p.returncode != 0 and "error (rank 1): preflight: out of device memory" in p.stderr, p.stderr[-2000:]
    # torchrun's summary: the first failure is rank 1's exit code 2, not a crash of its teardown
    assert re.search(r"rank\s*: 1 \(local_rank: 1\)\s*exitcode\s*: 2\b", p.stderr), p.stderr[-2000:]


def test_ema_follows_then_averages():
    p = torch.nn.Parameter(torch.zeros(3))
    ema = EMA([("w", p)], decay=0.9)
    with torch.no_grad():
        p.fill_(1.0)
    ema.update()  # first update: decay min(0.9, 1/10) = 0.1 -> 0.9 of the way
    assert torch.allclose(ema.shadow[0], torch.full((3,), 0.9))
    for _ in range(200):
        ema.update()
    assert torch.allclose(ema.shadow[0], torch.ones(3))
    with torch.no_grad():
        p.fill_(5.0)
    ema.update()  # now the full decay: 0.1 of the way
    assert torch.allclose(ema.shadow[0], torch.full((3,), 1.4))
    ema.swap()
    assert torch.allclose(p, torch.full((3,), 1.4)) and torch.allclose(ema.shadow[0], torch.full((3,), 5.0))
    ema.swap()
    sd = ema.state_dict()
    other = EMA([("w", torch.nn.Parameter(torch.zeros(3)))], decay=0.9)
    other.load_state_dict(sd)
    assert other.updates == ema.updates and torch.equal(other.shadow[0], ema.shadow[0])


def test_seeded_noise_is_the_same_in_another_process():
    a = noise.randn((4,), 0, 7, 3, "noise")
    code = "import sys; sys.path.insert(0, %r); from common import noise; print(noise.randn((4,), 0, 7, 3, 'noise')" \
           ".tolist())" % ROOT
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True,
                         env=dict(os.environ, PYTHONHASHSEED="123")).stdout
    assert json.loads(out) == a.tolist()
    assert not torch.equal(a, noise.randn((4,), 0, 7, 4, "noise"))  # another index, other noise
    assert noise.seed_of(0, 1, 2) == noise.seed_of(0, 1, 2) != noise.seed_of(0, 2, 1)


def test_run_folder_ownership_and_resume_checks(tmp_path):
    out = str(tmp_path / "r")
    run.claim(out, resume=False)  # nothing there: fine
    fp = dict(data="abc", seed=0, global_batch=8)
    run.start_or_resume(out, fp, resume=False, rank=0)
    with pytest.raises(UserError, match="already holds a run .*run.json.*--resume 1"):
        run.claim(out, resume=False)
    run.claim(out, resume=True)
    run.start_or_resume(out, fp, resume=True, rank=0)  # the same settings: fine
    with pytest.raises(UserError) as e:
        run.start_or_resume(out, dict(fp, seed=1, global_batch=16), resume=True, rank=0)
    assert "global_batch was 8, now 16" in str(e.value) and "seed was 0, now 1" in str(e.value)


def test_check_keys_names_the_keys():
    from common.weights import check_keys
    with pytest.raises(KeyError) as e:
        check_keys({"a.weight", "b.weight"}, {"a.weight": 0, "c.weight": 0}, "x.safetensors", hint="hint!")
    assert "missing: [b.weight]" in str(e.value) and "unexpected: [c.weight]" in str(e.value)
    assert "x.safetensors" in str(e.value) and "hint!" in str(e.value)


def test_a_damaged_checkpoint_is_never_resumed(tmp_path):
    """Two checkpoints; the newer one loses a shard / gets a broken extra.json: latest_valid names the damage and
    takes the older one."""
    from common import ckpt
    from torch.distributed.fsdp import fully_shard

    from tests.procs import gloo_world_of_one
    with gloo_world_of_one():
        model = torch.nn.Linear(4, 4)
        fully_shard(model)
        opt = torch.optim.AdamW(model.parameters())
        model(torch.randn(2, 4)).sum().backward()
        opt.step()
        out = str(tmp_path)
        (tmp_path / "checkpoints" / "step_00000007.tmp").mkdir(parents=True)  # a crash cut its writing short
        for step in (1, 2):
            ckpt.save(out, step, model, opt, {"step": step})
        assert ckpt.latest_valid(out) == 2 and sorted(os.listdir(tmp_path / "checkpoints")) == [
            "step_00000001", "step_00000002"]  # the next save removed the half
        d = tmp_path / "checkpoints" / "step_00000002"
        shard = next(f for f in os.listdir(d) if f.endswith(".distcp"))
        with open(d / shard, "r+b") as f:
            f.truncate(4)
        said = []
        assert ckpt.latest_valid(out, log=said.append) == 1
        assert "step_00000002" in said[0] and "missing or truncated" in said[0]
        # the run resumes from step 1 (2 is damaged) and saves step 2 again with --keep 1: the new step 2 replaces
        # the damaged one, and only it is kept
        ckpt.save(out, 2, model, opt, {"step": 2}, keep=1)
        assert ckpt.complete_checkpoints(out) == [2] and ckpt.latest_valid(out) == 2
        # a damaged step 5 that --resume skipped (from step 2) is not counted by --keep: saving step 3 keeps step 3
        ckpt.save(out, 5, model, opt, {"step": 5})
        (tmp_path / "checkpoints" / "step_00000005" / "extra.json").write_text("{not json")
        ckpt.save(out, 3, model, opt, {"step": 3}, keep=1)
        assert ckpt.complete_checkpoints(out) == [3, 5] and ckpt.latest_valid(out) == 3
        (tmp_path / "checkpoints" / "step_00000003" / "extra.json").write_text("{not json")
        assert ckpt.latest_valid(out, log=said.append) is None and "unreadable" in said[-1]


def test_no_common_file_knows_a_model():
    for f in os.listdir(os.path.join(ROOT, "common")):
        if f.endswith(".py"):
            src = open(os.path.join(ROOT, "common", f)).read()
            assert not re.search(r"^\s*(from|import) (data|train_\w+)\b", src, re.M), f
            assert len(src.splitlines()) <= 250, f


@pytest.mark.parametrize("name,tflops", [("NVIDIA H100 80GB HBM3", 989), ("NVIDIA H100 PCIe", 756),
                                         ("NVIDIA H100 NVL", 835), ("NVIDIA H200", 989), ("NVIDIA H200 NVL", 835),
                                         ("NVIDIA L40S", 362), ("NVIDIA L40", 181), ("NVIDIA A100-SXM4-80GB", 312),
                                         ("Some Future GPU", None)])
def test_mfu_peak_is_the_cards_own(monkeypatch, name, tflops):
    # the first substring that matches decides: a PCIe or NVL card must not get its SXM sibling's peak
    from common.perf import device_peak_flops
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda device=None: name)
    got = device_peak_flops(torch.device("cuda"))
    assert got == (tflops * 1e12 if tflops else None)
    assert device_peak_flops(torch.device("cuda"), 100.0) == 100e12  # --peak_tflops wins


def _hsdp_rank():
    import torch.distributed as dist
    from common import fsdp
    world = dist.get_world_size()
    for shard, ndim, local in ((1, 2, (8, 4)), (0, 1, (4, 4)), (2, 1, (4, 4))):
        torch.manual_seed(0)
        m = torch.nn.Sequential(torch.nn.ModuleList([torch.nn.Linear(4, 8)]))
        fsdp.parallelize(m, m[0], torch.float32, shard=shard)
        w = m[0][0].weight
        assert w.device_mesh.ndim == ndim and tuple(w.to_local().shape) == local, (shard, w.device_mesh, w.shape)
        assert tuple(w.shape) == (8, 4)
    assert fsdp.fsdp_mesh(1) is fsdp.fsdp_mesh(1) and fsdp.fsdp_mesh(world) is None  # one mesh a degree


def test_shard_degree_is_the_mesh():
    """--shard (common/fsdp.py): 1 on 2 processes is a (2, 1) mesh where each rank holds the whole weight (HSDP as
    DDP); 0 and the world size are FSDP2's 1-D mesh, each rank half. A degree that does not divide the world is a
    UserError of common/sp.py data_parallel, before any work. (The end-to-end math: tests/test_wan_train.py.)"""
    from common import sp
    from tests.procs import spawn_gloo
    spawn_gloo(_hsdp_rank)
    from types import SimpleNamespace
    base = dict(sp=1, micro_batch=1, global_batch=4, mode="train")
    with pytest.raises(UserError, match=r"--shard 3 must divide the number of processes \(4\)"):
        sp.data_parallel(SimpleNamespace(shard=3, **base), 0, 4, 8)
    with pytest.raises(UserError, match="--shard -1"):
        sp.data_parallel(SimpleNamespace(shard=-1, **base), 0, 4, 8)


def test_a_cut_off_log_line_does_not_stop_a_resume(tmp_path):
    """A kill during an append leaves half a line at the end of log.jsonl: resuming from step 1 keeps the whole
    lines up to it and drops the rest."""
    from common.log import RunLog, read_log
    (tmp_path / "log.jsonl").write_text('{"step": 1, "loss": 0.5}\n{"step": 2, "loss": 0.4}\n{"step": 3, "lo')
    assert read_log(tmp_path) == [{"step": 1, "loss": 0.5}, {"step": 2, "loss": 0.4}]
    RunLog(str(tmp_path), start_step=1).log({"step": 2, "loss": 0.25}, echo=None)
    assert read_log(tmp_path) == [{"step": 1, "loss": 0.5}, {"step": 2, "loss": 0.25}]


def test_a_lora_that_does_not_fit_the_model_names_the_keys():
    from common.lora_file import check_fits
    with torch.device("meta"):
        model = torch.nn.Sequential(torch.nn.Linear(4, 6), torch.nn.LayerNorm(6))
    ok = {"0.lora_A.weight": torch.zeros(2, 4), "0.lora_B.weight": torch.zeros(6, 2)}
    check_fits("l.safetensors", ok, 2, model, diffs={"1.weight": torch.zeros(6)})
    with pytest.raises(ValueError, match=r"l.safetensors: adapters on modules this model does not have .*\['1', '5'\]"):
        extra = {"1.lora_A.weight": torch.zeros(2, 6), "5.lora_A.weight": torch.zeros(2, 4)}
        check_fits("l.safetensors", {**ok, **extra}, 2, model)  # 1 is a LayerNorm, 5 is not there
    with pytest.raises(ValueError, match=r"does not have .*\['2.bias'\]"):
        check_fits("l.safetensors", ok, 2, model, diffs={"2.bias": torch.zeros(6)})
    with pytest.raises(ValueError, match=r"shapes that do not fit this model: 0.lora_A.weight \(2, 8\) vs \(2, 4\)"):
        check_fits("l.safetensors", {**ok, "0.lora_A.weight": torch.zeros(2, 8)}, 2, model)


def test_a_merged_lora_is_the_adapted_model():
    """lora_file.merge (--base_lora): the merged Linear computes what the Linear plus its adapter does, times the
    multiplier; deltas add to weights and biases; each weight keeps its dtype."""
    from common.lora_file import merge
    g = torch.Generator().manual_seed(0)
    lin = torch.nn.Linear(5, 3)
    sd = {"0.weight": lin.weight.detach().clone(), "0.bias": lin.bias.detach().clone(),
          "1.weight": torch.ones(3, dtype=torch.bfloat16)}
    A, B = torch.randn(2, 5, generator=g), torch.randn(3, 2, generator=g)
    x = torch.randn(4, 5, generator=g)
    merged = dict(sd)
    merge(merged, {"0.lora_A.weight": A, "0.lora_B.weight": B}, 2, 3.0,
          diffs={"0.bias": torch.full((3,), 0.5), "1.weight": torch.full((3,), 0.25)}, mult=0.5)
    want = lin(x) + 0.5 * (3.0 / 2) * (x @ A.T @ B.T) + 0.25  # the bias delta x mult
    got = torch.nn.functional.linear(x, merged["0.weight"], merged["0.bias"])
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6)
    assert merged["1.weight"].dtype == torch.bfloat16
    assert torch.equal(merged["1.weight"].float(), torch.full((3,), 1.125))
    assert torch.equal(sd["0.weight"], lin.weight)  # merge replaces the entries: the caller's tensors stay


def test_lora_lists_parse():
    from common.lora_file import parse_list
    assert parse_list("a.safetensors, dir/b.safetensors:0.5,c.safetensors:-1") == [
        ("", "a.safetensors", 1.0), ("", "dir/b.safetensors", 0.5), ("", "c.safetensors", -1.0)]
    assert parse_list("high=h.safetensors:2,l.safetensors", names=("high", "low")) == [
        ("high", "h.safetensors", 2.0), ("", "l.safetensors", 1.0)]
    assert parse_list("odd:name.safetensors") == [("", "odd:name.safetensors", 1.0)]  # not a number: part of the path
    assert parse_list("runs/a=b/l.safetensors") == [("", "runs/a=b/l.safetensors", 1.0)]  # = inside a path
    with pytest.raises(UserError, match="--base_lora mid=x.safetensors: mid= names a part of the model: high, low"):
        parse_list("mid=x.safetensors", names=("high", "low"))
    with pytest.raises(UserError, match="this model has no parts"):
        parse_list("high=x.safetensors")
    with pytest.raises(UserError, match="--base_lora :2: expected PATH or PATH:MULTIPLIER"):
        parse_list(":2")


def test_a_lora_file_that_is_not_one_is_one_line(tmp_path):
    from common.lora_file import read_lora
    (tmp_path / "cut.safetensors").write_bytes(b"garbage")
    with pytest.raises(ValueError, match=r"cut.safetensors: not a readable .safetensors file \(.*header"):
        read_lora(str(tmp_path / "cut.safetensors"))
    with pytest.raises(ValueError, match="a folder, where a .safetensors file was expected"):
        read_lora(str(tmp_path))


def test_read_safetensors_dequantizes_comfyui_fp8_scaled(tmp_path):
    """A ComfyUI fp8_scaled file (any model's: mochi_preview_fp8_scaled, t5xxl_fp8_e4m3fn_scaled) reads back
    dequantized, weight.float() x scale then the dtype asked for; a plain float8 tensor is just cast; markers go."""
    from safetensors.torch import save_file
    from common.weights import read_safetensors
    g = torch.Generator().manual_seed(0)
    w = torch.randn(4, 3, generator=g)
    scale = w.abs().max() / 448
    w8 = (w / scale).to(torch.float8_e4m3fn)
    plain = torch.randn(5, generator=g).to(torch.float8_e4m3fn)
    save_file({"a.weight": w8, "a.scale_weight": scale.reshape(()), "a.scale_input": torch.ones(()),
               "b.weight": plain, "c.bias": torch.ones(3), "scaled_fp8": torch.empty(0, dtype=torch.float8_e4m3fn)},
              str(tmp_path / "f.safetensors"))
    for dtype in (None, torch.bfloat16):
        sd = read_safetensors([str(tmp_path / "f.safetensors")], dtype)
        assert set(sd) == {"a.weight", "b.weight", "c.bias"}
        assert torch.equal(sd["a.weight"], (w8.float() * scale).to(dtype or torch.float32))
        assert torch.equal(sd["b.weight"], plain.to(dtype) if dtype else plain)
        assert sd["c.bias"].dtype == (dtype or torch.float32)
