"""LoRA on the double/single-block Linears (a zero adapter is the base bit for bit, the full-size counts, the
exported file loads in diffusers with equal outputs, musubi/kohya files read back), flow matching and the
official Euler sampler with shift and embedded guidance."""
import torch
from safetensors import safe_open
from safetensors.torch import save_file

import train_hunyuan as H
from common.lora_file import write_lora
from tests.checks import load_lora, lora_modules, random_lora
from tests.test_hunyuan_dit import diffusers_twin, inputs, tiny_dit

RANK, ALPHA = 4, 8.0  # alpha != rank: the scale (2) must reach the other side


def test_zero_init_is_the_base_model():
    base = tiny_dit()
    x = inputs(base.cfg)
    with torch.no_grad():
        want = base(*x)
    m = H.add_lora(tiny_dit(), RANK, ALPHA)
    load_lora(m, H.lora_init_state(m, seed=0))
    with torch.no_grad():
        assert torch.equal(m(*x), want)
    assert all(p.requires_grad == (".lora_" in n) for n, p in m.named_parameters())
    # the base keys are unchanged: the adapters sit inside the official modules
    assert {k for k in m.state_dict() if ".lora_" not in k} == set(base.state_dict())


def test_full_size_lora_counts():
    with torch.device("meta"):
        m = H.add_lora(H.HunyuanVideoDiT(H.DIT_PRESETS["13B"]), 32, 32)
    mods = lora_modules(m)
    assert len(mods) == 240  # musubi-tuner's default set (its networks/lora.py)
    assert sum(p.numel() for n, p in m.named_parameters() if ".lora_" in n) == 117_964_800
    with torch.device("meta"):
        m = H.add_lora(H.HunyuanVideoDiT(H.DIT_PRESETS["13B"]), 32, 32,
                       H.LORA_TARGETS + ",img_mod.linear,txt_mod.linear,modulation.linear")
    assert len(lora_modules(m)) == 320  # diffusion-pipe's set
    assert sum(p.numel() for n, p in m.named_parameters() if ".lora_" in n) == 161_218_560


def test_exported_lora_matches_in_diffusers(tmp_path):
    """Our file through diffusers' user path: HunyuanVideoLoraLoaderMixin.lora_state_dict (its converter from the
    original names) -> transformer.load_lora_adapter. Not on linear1: diffusers' converter splits a single block's
    linear1 lora_B at a hard-coded hidden size of 3072, which the tiny model can't have."""
    from diffusers import HunyuanVideoPipeline
    targets = H.LORA_TARGETS.replace(",linear1", "")
    m = H.add_lora(tiny_dit(), RANK, ALPHA, targets)
    load_lora(m, random_lora(m))
    sd = {k: v for k, v in m.state_dict().items() if ".lora_" in k}
    f = str(tmp_path / "lora.safetensors")
    write_lora(f, sd, ALPHA, metadata={"lora_rank": RANK}, fold_alpha=True)  # as export_weights writes it
    with safe_open(f, "pt") as fh:
        keys = set(fh.keys())
    assert "diffusion_model.double_blocks.0.img_attn_qkv.lora_A.weight" in keys
    assert not any(k.endswith(".alpha") for k in keys)
    # ours, from the file (bf16 weights, alpha folded: read back at scale 1)
    sd2, rank, alpha = H.read_lora(f)
    assert (rank, alpha) == (RANK, float(RANK))
    ours = load_lora(H.add_lora(tiny_dit(), rank, alpha, targets), sd2).eval()
    # diffusers: the base through its converter, then the LoRA file through its LoRA loader
    ref = diffusers_twin(tiny_dit())
    conv = HunyuanVideoPipeline.lora_state_dict(f)
    ref.load_lora_adapter(conv, prefix="transformer", adapter_name="ours")
    x = inputs(m.cfg)
    with torch.no_grad():
        a, b = ours(*x), ref(*x, return_dict=False)[0]
        base = tiny_dit()(*x)
    err = (a - b).abs().max().item()
    assert err <= 1e-5, err
    assert (a - base).abs().max() > 1e-2  # the adapter moves the output


def test_read_lora_kohya_and_prefixes(tmp_path):
    m = H.add_lora(tiny_dit(), RANK, ALPHA, H.LORA_TARGETS + ",img_mod.linear,modulation.linear")
    sd = random_lora(m)
    # musubi/kohya: lora_unet_<module path with _>.lora_down/.lora_up + .alpha
    kohya = {}
    for k, v in sd.items():
        mod, kind = k.rsplit(".lora_", 1)
        flat = "lora_unet_" + mod.replace(".", "_")
        kohya[flat + (".lora_down.weight" if kind.startswith("A") else ".lora_up.weight")] = v
        kohya[flat + ".alpha"] = torch.tensor(ALPHA)
    save_file(kohya, str(tmp_path / "kohya.safetensors"))
    got, rank, alpha = H.read_lora(str(tmp_path / "kohya.safetensors"))
    assert (rank, alpha) == (RANK, ALPHA) and set(got) == set(sd)
    assert all(torch.equal(got[k], sd[k]) for k in sd)
    # diffusion-pipe's PEFT file: transformer.<official path>, no alpha
    save_file({"transformer." + k: v for k, v in sd.items()}, str(tmp_path / "dp.safetensors"))
    got, rank, alpha = H.read_lora(str(tmp_path / "dp.safetensors"))
    assert (rank, alpha) == (RANK, float(RANK)) and set(got) == set(sd)


def test_diffusers_lora_is_refused_in_one_line(tmp_path):
    """A diffusers-format LoRA (our file through diffusers' own converter, HunyuanVideoLoraLoaderMixin.lora_state_dict:
    transformer.transformer_blocks.N.attn.to_q.lora_A.weight) is refused naming the formats that load, not with
    "LoRA on modules outside the blocks"."""
    import pytest
    from diffusers import HunyuanVideoPipeline

    from common.args import UserError
    m = H.add_lora(tiny_dit(), RANK, ALPHA, H.LORA_TARGETS.replace(",linear1", ""))
    f, g = str(tmp_path / "ours.safetensors"), str(tmp_path / "diffusers.safetensors")
    write_lora(f, random_lora(m), ALPHA, fold_alpha=True)
    conv = HunyuanVideoPipeline.lora_state_dict(f)
    assert any(k.startswith("transformer.transformer_blocks.0.attn.to_q.lora_A") for k in conv)
    save_file({k: v.clone() for k, v in conv.items()}, g)  # (its q/k/v share one lora_A tensor)
    with pytest.raises(UserError, match="diffusers-format LoRA.*not supported; the formats that load: ComfyUI"):
        H.read_lora(g)
    H.check_lora_layout(f)  # ours passes


def test_lora_for_merges_what_add_lora_cannot_adapt(tmp_path):
    """lora_for (--lora, --init_lora, --base_lora): an adapter outside the blocks (txt_in.input_embedder) and a
    .diff_b become deltas ((alpha / rank) B @ A, the delta itself), the blocks' adapters stay adapters; merged with
    multiplier 0.5 each lands scaled; --init_lora refuses such a file in one line (naming --base_lora)."""
    import pytest

    from common import lora_file
    from common.args import UserError, parse
    m = tiny_dit()
    sd = m.state_dict()
    g = torch.Generator().manual_seed(0)
    out, blk = "txt_in.input_embedder", "double_blocks.0.img_attn_qkv"
    ab = {n: (torch.randn(RANK, sd[n + ".weight"].shape[1], generator=g),
              torch.randn(sd[n + ".weight"].shape[0], RANK, generator=g)) for n in (out, blk)}
    d = torch.randn(sd["final_layer.linear.bias"].shape, generator=g)
    f = {f"diffusion_model.{n}.{k}": v for n, (a, b) in ab.items()
         for k, v in (("lora_A.weight", a), ("lora_B.weight", b), ("alpha", torch.tensor(ALPHA)))}
    save_file({**f, "diffusion_model.final_layer.linear.diff_b": d}, str(tmp_path / "l.safetensors"))
    lsd, diffs, rank, alpha = H.lora_for(str(tmp_path / "l.safetensors"), m.cfg)
    assert (rank, alpha) == (RANK, ALPHA) and sorted(lsd) == [blk + ".lora_A.weight", blk + ".lora_B.weight"]
    assert sorted(diffs) == ["final_layer.linear.bias", out + ".weight"]
    merged = dict(sd)
    lora_file.merge(merged, lsd, rank, alpha, diffs, 0.5)
    for n, (a, b) in ab.items():
        assert torch.allclose(merged[n + ".weight"], sd[n + ".weight"] + 0.5 * ALPHA / RANK * b @ a, atol=1e-5)
    assert torch.allclose(merged["final_layer.linear.bias"], sd["final_layer.linear.bias"] + 0.5 * d)
    with pytest.raises(UserError, match="cannot train as LoRA adapters: merge it into the base with --base_lora"):
        H.check_args(parse(H.Args, ["--preset", "tiny", "--encoders", "toy", "--data", "x", "--init_lora",
                                    str(tmp_path / "l.safetensors")]))


def test_flow_convention():
    x0, noise = torch.randn(2, 16, 1, 4, 4), torch.randn(2, 16, 1, 4, 4)
    seen = {}

    def model(xt, t, *text):
        seen["xt"], seen["t"] = xt, t
        return noise - x0  # the true velocity
    loss = H.flow_loss(model, x0, (), torch.tensor([1.0, 0.0]), noise, None)
    assert loss == 0
    assert torch.equal(seen["xt"][0], noise[0]) and torch.equal(seen["xt"][1], x0[1])  # sigma 1 = noise
    assert seen["t"].tolist() == [1000.0, 0.0]
    s = torch.linspace(0, 1, 11)
    sh = H.shift_sigma(s, 7.0)
    assert sh[0] == 0 and sh[-1] == 1 and (sh[1:] > sh[:-1]).all() and (sh[1:-1] > s[1:-1]).all()
    g = torch.Generator().manual_seed(0)
    assert ((H.sample_sigmas(1000, "logit_normal", generator=g) - 0.5).abs() < 0.5).all()
    assert H.embedded_guidance(6.0, 2).tolist() == [6016.0, 6016.0]  # bf16(6) * 1000 in bf16, as upstream
    assert H.embedded_guidance(1.0, 1).tolist() == [1000.0]


def test_sampler_matches_diffusers_schedule():
    """The schedule and Euler loop against diffusers' FlowMatchEulerDiscreteScheduler(shift 7) with the sigmas the
    HunyuanVideo pipeline passes it (linspace(1, 0, N + 1)[:-1]): same timesteps, same steps, same result."""
    import numpy as np
    from diffusers import FlowMatchEulerDiscreteScheduler
    N = 10
    sched = FlowMatchEulerDiscreteScheduler(shift=7.0)
    sched.set_timesteps(sigmas=np.linspace(1.0, 0.0, N + 1)[:-1])
    ours = H.sampling_sigmas(N, 7.0)
    assert (sched.sigmas - ours).abs().max() < 1e-6
    assert (sched.timesteps - ours[:-1] * 1000).abs().max() < 1e-3

    class Fake(torch.nn.Module):  # a velocity that depends on x and t, and records the guidance it gets
        guidance_in = True

        def forward(self, x, t, states, mask, pooled, g):
            self.g = g
            return torch.sin(x) * (t / 1000).view(-1, 1, 1, 1, 1) + states.mean()
    fake, noise = Fake(), torch.randn(1, 16, 1, 4, 4, generator=torch.Generator().manual_seed(0))
    text = (torch.ones(1, 3, 8), torch.ones(1, 3), torch.zeros(1, 8))
    out = H.sample_euler(fake, noise, text, steps=N, shift=7.0, embedded_scale=6.0)
    assert fake.g.tolist() == [6016.0]
    x = noise.clone()
    for t in sched.timesteps:
        x = sched.step(fake(x, t.view(1), *text, None), t, x).prev_sample
    assert (out - x).abs().max() < 1e-5


def test_true_cfg_batches_uncond_first():
    class Fake(torch.nn.Module):
        guidance_in = None

        def forward(self, x, t, states, mask, pooled, g):
            assert g is None and x.shape[0] == 2
            return states.mean(dim=(1, 2)).view(-1, 1, 1, 1, 1).expand_as(x)
    noise = torch.zeros(1, 16, 1, 2, 2)
    cond = (torch.full((1, 3, 8), 1.0), torch.ones(1, 3), torch.zeros(1, 8))
    neg = (torch.full((1, 3, 8), 0.0), torch.ones(1, 3), torch.zeros(1, 8))
    # v = 0 + 3 * (1 - 0) = 3 everywhere; Euler from sigma 1 to 0 moves x by -3
    out = H.sample_euler(Fake(), noise, cond, neg, steps=4, shift=1.0, cfg_scale=3.0)
    assert torch.allclose(out, torch.full_like(out, -3.0))
