"""Mochi: Genmo's own LoRA files (the fine-tuner's .safetensors and .pt) applied as upstream applies them, checked
against W + alpha / r * B @ A merged by hand and against our own file carrying the same adapters, also through
main() --mode sample; a diffusers-layout DiT folder (transformer/ of MochiTransformer3DModel, saved by diffusers
itself) through load_dit against diffusers' model and the official layout, and through main() --dit_path."""
import dataclasses
import json
import os

import pytest
import torch
from safetensors.torch import save_file

import train_mochi as M
from common import lora_file
from tests import checks
from tests.test_mochi_dit import diffusers_twin, inputs, tiny_dit
from tests.test_mochi_main import folder, mochi  # noqa: F401  (the tiny official-layout folder, a module fixture)

# the two groups of Genmo's kwargs, deliberately different in rank and in alpha / rank
KW = dict(qkv_proj_lora_rank=4, qkv_proj_lora_alpha=8, qkv_proj_lora_dropout=0.0, out_proj_lora_rank=2,
          out_proj_lora_alpha=3, out_proj_lora_dropout=0.0)


def run(model, seed=1):
    x, y, mask = inputs(model.cfg, 2, 2, 4, 6, [4, 11], seed=seed)
    with torch.no_grad():
        return model(x, torch.tensor([0.6, 0.2]), y, mask)


def genmo_adapters(base, kw, seed=5):
    """{module: (A (r, in), B (out, r), alpha / r)} for Genmo's four targets of `base` (the last block has no proj_y),
    values bf16-representable so that the bf16 file holds them exactly."""
    g = torch.Generator().manual_seed(seed)
    out = {}
    for i in range(base.cfg.depth):
        for name in ("qkv_x", "qkv_y", "proj_x", "proj_y"):
            lin = getattr(base.blocks[i].attn, name, None)
            if not isinstance(lin, torch.nn.Linear):
                continue
            group = "qkv_proj" if name.startswith("qkv") else "out_proj"
            r = kw[f"{group}_lora_rank"]
            a = (torch.randn(r, lin.in_features, generator=g) * 0.2).bfloat16().float()
            b = (torch.randn(lin.out_features, r, generator=g) * 0.2).bfloat16().float()
            out[f"blocks.{i}.attn.{name}"] = (a, b, kw[f"{group}_lora_alpha"] / r)
    return out


def write_genmo(path, adapters, kw):
    """The fine-tuner's file, by hand: `<module>.lora_A` / `.lora_B` (no `.weight`) in bf16, kwargs in the header
    (.safetensors) or {"state_dict", "kwargs"} (.pt)."""
    sd = {}
    for m, (a, b, _) in adapters.items():
        sd[m + ".lora_A"], sd[m + ".lora_B"] = a.bfloat16(), b.bfloat16()
    if path.endswith(".safetensors"):
        save_file(sd, path, metadata={"kwargs": json.dumps(kw)})
    else:
        torch.save({"state_dict": sd, "kwargs": kw}, path)
    return path


def merge(sd, adapters):
    """W + alpha / r * B @ A written into each adapted weight of the state dict (Genmo's eval-time merge)."""
    sd = dict(sd)
    for m, (a, b, s) in adapters.items():
        sd[m + ".weight"] = sd[m + ".weight"] + s * b @ a
    return sd


def merged_by_hand(adapters):
    ref = tiny_dit()
    ref.load_state_dict(merge(ref.state_dict(), adapters))
    return ref


def with_lora_file(path):
    """What --mode sample --lora does with the file: read_lora, LoRA on the modules it names, adapters loaded."""
    sd, rank, alpha = M.read_lora(path)
    targets = ",".join(sorted({k.split(".", 2)[2].rsplit(".lora_", 1)[0] for k in sd}))
    m = M.add_lora(tiny_dit(), rank, alpha, targets)
    missing, unexpected = m.load_state_dict(sd, strict=False)
    assert not unexpected and not any(".lora_" in k for k in missing), (unexpected, missing)
    return m


@pytest.mark.parametrize("ext", [".safetensors", ".pt"])
def test_genmo_lora_equals_the_hand_merge(tmp_path, ext):
    adapters = genmo_adapters(tiny_dit(), KW)
    assert len(adapters) == 4 * 3 - 1  # no proj_y in the last block
    path = write_genmo(str(tmp_path / f"model_200.lora{ext}"), adapters, KW)
    ours, ref, base = run(with_lora_file(path)), run(merged_by_hand(adapters)), run(tiny_dit())
    err = (ours - ref).abs().max().item()
    print(f"Genmo {ext} (qkv r4 a8, out r2 a3) vs W + alpha/r B@A by hand: max diff {err:.2e}, "
          f"adapter effect {(ref - base).abs().max():.2e}")
    assert (ref - base).abs().max() > 1e-2 and err <= 1e-5, err


def test_genmo_safetensors_and_pt_and_our_format_agree(tmp_path):
    kw = dict(KW, out_proj_lora_rank=4, out_proj_lora_alpha=8)  # one rank and alpha: our format can carry it as is
    adapters = genmo_adapters(tiny_dit(), kw)
    st = run(with_lora_file(write_genmo(str(tmp_path / "g.lora.safetensors"), adapters, kw)))
    pt = run(with_lora_file(write_genmo(str(tmp_path / "g.pt"), adapters, kw)))
    sd = {}
    for m, (a, b, _) in adapters.items():
        sd[m + ".lora_A.weight"], sd[m + ".lora_B.weight"] = a, b
    path = str(tmp_path / "ours.safetensors")
    lora_file.write_lora(path, sd, 8.0)
    assert M.read_lora(path)[1:] == (4, 8.0) == M.read_lora(str(tmp_path / "g.pt"))[1:]
    mine = run(with_lora_file(path))
    assert torch.equal(st, pt) and torch.equal(st, mine)
    err = (st - run(merged_by_hand(adapters))).abs().max().item()
    print(f"Genmo (one group scale) = ours bit for bit; vs the hand merge: max diff {err:.2e}")
    assert err <= 1e-5


def test_genmo_header_defaults_and_errors(tmp_path):
    adapters = genmo_adapters(tiny_dit(), KW)
    path = str(tmp_path / "nokw.safetensors")
    save_file({m + s: t.bfloat16() for m, (a, b, _) in adapters.items() for s, t in ((".lora_A", a), (".lora_B", b))},
              path)
    # no kwargs: scale 1 for every module (what ComfyUI assumes for these files)
    ones = {m: (a, b, 1.0) for m, (a, b, _) in adapters.items()}
    assert (run(with_lora_file(path)) - run(merged_by_hand(ones))).abs().max() <= 1e-5
    bad = write_genmo(str(tmp_path / "bad.safetensors"), adapters, dict(KW, out_proj_lora_rank=8))
    with pytest.raises(ValueError, match="out_proj_lora_rank=8"):
        M.read_lora(bad)


# --- a diffusers-layout DiT through load_dit ---------------------------------------------------------------------

@pytest.fixture(scope="module")
def diffusers_folder(tmp_path_factory):
    """tiny_dit()'s weights in a MochiTransformer3DModel, written by diffusers' save_pretrained into a pipeline-style
    folder (root/transformer/), sharded (index + several files); and the same weights as an official dit.safetensors."""
    root = tmp_path_factory.mktemp("mochi-diffusers")
    official = tiny_dit()
    ref = diffusers_twin(official)
    ref.save_pretrained(str(root / "transformer"), max_shard_size="300KB", safe_serialization=True)
    save_file({k: v.contiguous() for k, v in official.state_dict().items()}, str(root / "official.safetensors"))
    return root, ref


def test_diffusers_folder_is_sharded_and_named_as_diffusers(diffusers_folder):
    root, _ = diffusers_folder
    files = sorted(p.name for p in (root / "transformer").iterdir())
    assert "config.json" in files and "diffusion_pytorch_model.safetensors.index.json" in files
    assert sum(f.endswith(".safetensors") for f in files) > 1, files


@pytest.mark.parametrize("where", ["transformer", "pipeline"])
def test_diffusers_dit_loads_and_matches(diffusers_folder, where):
    root, ref = diffusers_folder
    model = M.load_dit(str(root / "transformer") if where == "transformer" else str(root))
    official = M.load_dit(str(root / "official.safetensors"))
    assert model.cfg == M.DIT_PRESETS["tiny"]  # text_len 16 from config.json (an official file carries none: 256)
    assert official.cfg == dataclasses.replace(model.cfg, text_len=256)
    a, b = model.state_dict(), official.state_dict()
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)  # every tensor renamed back exactly
    c = model.cfg
    worst = 0.0
    for T, H, W, lengths in [(2, 6, 10, [5, 11]), (3, 4, 6, [0, 7]), (1, 8, 4, [16, 3])]:
        x, y, mask = inputs(c, 2, T, H, W, lengths)
        sigma = torch.tensor([0.93, 0.21])
        with torch.no_grad():
            ours, theirs = model(x, sigma, y, mask), ref(x, y, 1000 * (1 - sigma), mask, return_dict=False)[0]
            assert torch.equal(ours, official(x, sigma, y, mask))
        worst = max(worst, (ours - theirs).abs().max().item())
    print(f"load_dit(diffusers {where}/) vs diffusers MochiTransformer3DModel: max diff {worst:.2e}; "
          "vs the official-layout load: bit-equal")
    assert worst <= 1e-5, worst


def test_a_file_of_the_diffusers_folder_is_the_folder(diffusers_folder, tmp_path):
    """--dit_path at one shard of diffusers' transformer/ folder reads the whole folder (its config.json, every
    shard); the same weights in one file without a config.json are refused, saying what to give instead."""
    root, ref = diffusers_folder
    shard = sorted((root / "transformer").glob(M.DIFFUSERS_WEIGHTS + "*.safetensors"))[0]
    a, b = M.load_dit(str(shard)).state_dict(), M.load_dit(str(root / "official.safetensors")).state_dict()
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    save_file({k: v.contiguous() for k, v in ref.state_dict().items()}, str(tmp_path / "mochi.safetensors"))
    with pytest.raises(KeyError, match="diffusers-format MochiTransformer3DModel weights without their config.json"):
        M.load_dit(str(tmp_path / "mochi.safetensors"))


def test_diffusers_lora_is_refused_in_one_line(tmp_path):
    """A diffusers-format Mochi LoRA (PEFT on the split to_q / to_k / to_v, as diffusers' save_lora_weights writes
    it: transformer.transformer_blocks.N.attn1.to_q.lora_A.weight) is refused naming the formats that load, not with
    "LoRA on modules outside the blocks"."""
    from common.args import UserError
    keys = {"transformer.transformer_blocks.0.attn1.to_q.lora_A.weight": torch.zeros(4, 64),
            "transformer.transformer_blocks.0.attn1.to_q.lora_B.weight": torch.zeros(64, 4)}
    save_file(keys, str(tmp_path / "pytorch_lora_weights.safetensors"))
    with pytest.raises(UserError, match="diffusers-format LoRA.*not supported; the formats that load: ComfyUI"):
        M.read_lora(str(tmp_path / "pytorch_lora_weights.safetensors"))


def test_diffusers_dit_in_bf16_keeps_upstream_fp32_tensors(diffusers_folder):
    root, _ = diffusers_folder
    cfg, sd = M.read_dit_checkpoint(str(root / "transformer"), torch.bfloat16)
    assert {k for k, v in sd.items() if v.dtype == torch.float32} == {k for k in sd if M.keep_fp32(k)}
    assert len([k for k in sd if M.keep_fp32(k)]) == 1 + 4 * cfg.depth


def test_diffusers_folder_missing_a_part_is_named(diffusers_folder, tmp_path):
    root, ref = diffusers_folder
    sd = {k: v for k, v in ref.state_dict().items() if k != "transformer_blocks.1.attn1.to_k.weight"}
    (tmp_path / "transformer").mkdir()
    save_file({k: v.contiguous() for k, v in sd.items()}, str(tmp_path / "transformer" /
                                                              "diffusion_pytorch_model.safetensors"))
    (tmp_path / "transformer" / "config.json").write_text((root / "transformer" / "config.json").read_text())
    with pytest.raises(KeyError, match="blocks.1.attn.qkv_x.weight"):
        M.load_dit(str(tmp_path))


def test_sample_with_a_genmo_pt_lora_is_the_merged_model(folder, tmp_path):  # noqa: F811
    """main() --mode sample --lora <Genmo .pt> (groups of different rank and scale) gives the video of the DiT with
    the adapters merged by hand (fp32; the mp4s are compared), and not the base model's."""
    from data.video import read_clip
    dit = os.path.join(folder["ckpt"], M.DIT_FILE)
    base = M.load_dit(folder["ckpt"])
    adapters = genmo_adapters(base, KW)
    lora = write_genmo(str(tmp_path / "model_200.lora.pt"), adapters, KW)
    save_file({k: v.contiguous() for k, v in merge(base.state_dict(), adapters).items()},
              str(tmp_path / "merged.safetensors"))
    clips = {}
    for name, path, extra in (("lora", dit, ["--lora", lora]), ("merged", str(tmp_path / "merged.safetensors"), []),
                              ("base", dit, [])):
        mochi(*checks.sample_flags(["--ckpt_dir", folder["ckpt"]], path, folder["cache"], 7, "--dtype", "fp32",
                                   "--out_dir", str(tmp_path / name), *extra))
        clips[name] = read_clip(str(tmp_path / name / "samples" / "step_00000000_0.mp4"), 0, 7, 30, (32, 32))
    same, effect = ((clips["lora"] - clips[k]).abs().mean().item() for k in ("merged", "base"))
    print(f"sample: Genmo .pt LoRA vs merged by hand: mean |diff| {same:.2e}; vs the base model {effect:.2e}")
    assert effect > 0.02 and same < effect / 20, (same, effect)


def test_sample_from_a_diffusers_transformer_folder(folder, tmp_path):  # noqa: F811
    """main() --mode sample --dit_path <diffusers transformer/ folder> gives the official dit.safetensors' video.
    (The folder is written here from the test's key map: the main test's DiT widths are not ones diffusers' FFN
    rounding can build; the diffusers-made folder is checked above.)"""
    from data.video import read_clip
    from tests.test_mochi_dit import to_diffusers
    base = M.load_dit(folder["ckpt"])
    d = tmp_path / "transformer"
    d.mkdir()
    save_file({k: v.contiguous() for k, v in to_diffusers(base.state_dict(), base.cfg.depth).items()},
              str(d / "diffusion_pytorch_model.safetensors"))
    (d / "config.json").write_text(json.dumps({"_class_name": "MochiTransformer3DModel", "max_sequence_length": 256}))
    clips = []
    for name, path in (("diffusers", str(d)), ("official", os.path.join(folder["ckpt"], M.DIT_FILE))):
        mochi(*checks.sample_flags(["--ckpt_dir", folder["ckpt"]], path, folder["cache"], 7, "--dtype", "fp32",
                                   "--out_dir", str(tmp_path / name)))
        clips.append(read_clip(str(tmp_path / name / "samples" / "step_00000000_0.mp4"), 0, 7, 30, (32, 32)))
    assert torch.equal(*clips)


def test_genmo_plain_pt_as_the_fine_tuner_writes_it(tmp_path):
    """demos/fine_tuner/train.py with save_safetensors: false does torch.save(model_sd, model_N.lora.pt): the bare
    {module.lora_A/B: tensor} dict, no "state_dict"/"kwargs" wrapper (that wrapper is what pipelines.py reads)."""
    kw = dict(KW, qkv_proj_lora_alpha=4, out_proj_lora_alpha=2)  # alpha = rank: what scale 1 (no kwargs) means
    adapters = genmo_adapters(tiny_dit(), kw)
    path = str(tmp_path / "model_200.lora.pt")
    torch.save({m + s: t.bfloat16() for m, (a, b, _) in adapters.items() for s, t in ((".lora_A", a), (".lora_B", b))},
               path)
    err = (run(with_lora_file(path)) - run(merged_by_hand(adapters))).abs().max().item()
    assert err <= 1e-5, err
