"""LoRA on Mochi: the default targets (qkv_x, qkv_y, proj_x, proj_y; the last block has no proj_y) and Genmo's
parameter count at full size, a zero-initialised adapter is the base model bit for bit, the exported file (ComfyUI
format: diffusion_model.<module>.lora_A/B.weight + .alpha) gives the same outputs when merged by an independent
loader written here after ComfyUI's key mapping, and read_lora on our file and on Genmo's own format."""
import dataclasses
import json

import pytest
import torch
from safetensors.torch import load_file, save_file

import train_mochi as M
from tests.checks import lora_modules, random_lora
from tests.procs import gloo_world_of_one
from tests.test_mochi_dit import inputs, tiny_dit

RANK, ALPHA = 4, 8.0  # alpha != rank: the scale (2) must reach the other side


def run(model, seed=1):
    x, y, mask = inputs(model.cfg, 2, 2, 4, 6, [4, 11], seed=seed)
    with torch.no_grad():
        return model(x, torch.tensor([0.6, 0.2]), y, mask)


def comfy_merge(base_sd, path):
    """An independent LoRA loader after ComfyUI (comfy/lora.py + weight_adapter/lora.py): every model weight `k` is
    reachable as the LoRA key "diffusion_model." + k without ".weight"; it reads `{key}.lora_A.weight`,
    `{key}.lora_B.weight` and `{key}.alpha` and adds alpha / rank * B @ A to the weight."""
    lora = load_file(path)
    out, used = dict(base_sd), set()
    for k in base_sd:
        key = "diffusion_model." + k[: -len(".weight")]
        if k.endswith(".weight") and key + ".lora_A.weight" in lora:
            a, b = lora[key + ".lora_A.weight"].float(), lora[key + ".lora_B.weight"].float()
            scale = float(lora[key + ".alpha"]) / a.shape[0] if key + ".alpha" in lora else 1.0
            out[k] = base_sd[k] + scale * b @ a
            used |= {key + ".lora_A.weight", key + ".lora_B.weight", key + ".alpha"}
    assert used == set(lora), set(lora) - used  # every tensor of the file found its module
    return out


@pytest.fixture(scope="module")
def pg():
    with gloo_world_of_one():  # export_weights gathers through torch.distributed
        yield


@dataclasses.dataclass
class FakeArgs:  # the fields export_weights reads
    lora_rank: int = RANK
    lora_alpha: float = ALPHA
    lora_targets: str = M.LORA_TARGETS
    preset: str = "tiny"


def test_targets_and_full_size_count():
    m = M.add_lora(tiny_dit(), RANK, ALPHA)
    names = lora_modules(m)
    assert len(names) == 4 * m.cfg.depth - 1 and f"blocks.{m.cfg.depth - 1}.attn.proj_y" not in names
    with torch.device("meta"):
        big = M.add_lora(M.AsymmDiT(M.DIT_PRESETS["10B"]), 16, 16)
    lora = {k: v for k, v in big.named_parameters() if ".lora_" in k}
    assert len(lora) == 382 and sum(v.numel() for v in lora.values()) == 25_878_528  # Genmo's rank-16 figures
    assert all(v.requires_grad for v in lora.values())
    assert not any(p.requires_grad for k, p in big.named_parameters() if ".lora_" not in k)


def test_zero_init_is_the_base_model():
    base = run(tiny_dit())
    m = M.add_lora(tiny_dit(), RANK, ALPHA)
    m.load_state_dict(M.lora_init_state(m, seed=0), strict=False)
    assert torch.equal(run(m), base)
    assert all(mod.lora_A.weight.abs().sum() > 0 for mod in lora_modules(m).values())


def test_export_merged_by_independent_loader(pg, tmp_path):
    m = M.add_lora(tiny_dit(), RANK, ALPHA)
    # adapters already bf16-representable: the file stores bf16, so the comparison can be exact to float precision
    m.load_state_dict({k: v.to(torch.bfloat16).float() for k, v in random_lora(m).items()}, strict=False)
    ours = run(m)
    path = str(tmp_path / "lora.safetensors")
    M.export_weights(m, FakeArgs(), m.cfg, path)
    ref = tiny_dit()
    base = ref.state_dict()
    merged = comfy_merge({k: v.clone() for k, v in base.items()}, path)
    ref.load_state_dict(merged)
    err = (run(ref) - ours).abs().max().item()
    print(f"ours vs merged by the ComfyUI-style loader: max diff {err:.2e}")
    assert (run(ref) - run(tiny_dit())).abs().max() > 1e-2  # the adapter does something
    assert err <= 1e-5, err
    sd, rank, alpha = M.read_lora(path)
    assert rank == RANK and alpha == ALPHA and set(sd) == set(random_lora(m))
    m2 = M.add_lora(tiny_dit(), rank, alpha)
    m2.load_state_dict(sd, strict=False)
    assert torch.equal(run(m2), ours)


def test_read_genmo_format(tmp_path):
    m = M.add_lora(tiny_dit(), RANK, ALPHA)
    sd = random_lora(m)
    # Genmo's fine-tuner: no ".weight", rank/alpha per group in the "kwargs" header; here the groups' alphas differ
    genmo = {k[: -len(".weight")]: v.to(torch.bfloat16) for k, v in sd.items()}
    kw = dict(qkv_proj_lora_rank=RANK, qkv_proj_lora_alpha=8, qkv_proj_lora_dropout=0.0, out_proj_lora_rank=RANK,
              out_proj_lora_alpha=2, out_proj_lora_dropout=0.0)
    save_file(genmo, str(tmp_path / "model_200.lora.safetensors"), metadata={"kwargs": json.dumps(kw)})
    got, rank, alpha = M.read_lora(str(tmp_path / "model_200.lora.safetensors"))
    assert rank == RANK and alpha == RANK  # differing scales are folded into B
    for k, v in sd.items():
        scale = 1.0 if ".lora_A" in k else (8 if ".qkv_" in k else 2) / RANK
        assert torch.allclose(got[k], v.to(torch.bfloat16).float() * scale)


def test_fsdp_bf16_keeps_qk_norm_gains_fp32(pg):
    """Under FSDP2 with bf16 blocks, the q/k RMSNorm gains reach the forward in fp32 (their own fp32 units), and
    pos_frequencies (root, fp32) too; the Linears compute in bf16. The sharded model matches the plain one."""
    cfg = M.DIT_PRESETS["tiny"]
    ref = tiny_dit()
    args = M.Args(preset="tiny", lora_rank=0)
    model = M.build_dit(args, cfg, {k: v.clone() for k, v in ref.state_dict().items()}, torch.device("cpu"),
                        torch.bfloat16)
    seen = {}
    for name, mod in model.named_modules():
        if isinstance(mod, M.RMSNorm):
            mod.register_forward_pre_hook(lambda m, a, name=name: seen.setdefault(name, m.weight.dtype) and None)
        if name.endswith("attn.qkv_x"):
            mod.register_forward_pre_hook(lambda m, a, name=name: seen.setdefault(name, m.weight.dtype) and None)
    out = run(model)
    assert {v for k, v in seen.items() if "norm" in k} == {torch.float32}
    assert {v for k, v in seen.items() if "qkv_x" in k} == {torch.bfloat16}
    assert ((out - run(ref)).norm() / run(ref).norm()) < 0.05
