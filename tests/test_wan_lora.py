"""LoRA: a zero-initialised adapter is the base model bit for bit, training touches only the adapters, and the exported
file (ComfyUI key format + .alpha) gives the same outputs in diffusers (WanPipeline.load_lora_weights) as in our model.
Also read_lora on our file and on a hand-written musubi/kohya file, and the file's header metadata."""
import json

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import save_file

import train_wan as W
from tests.checks import load_lora, lora_modules, random_lora
from tests.helpers import dit_inputs, tiny_dit
from tests.procs import gloo_world_of_one

RANK, ALPHA = 4, 8.0  # alpha != rank: the scale (2) must reach the other side


def lora_model(sd, rank, alpha, seed=0):
    m = W.add_lora(tiny_dit(seed), rank, alpha)
    load_lora(m, sd)
    return m.eval()


def run(model, inputs):
    with torch.no_grad():
        return model(*inputs).float()


def deltas(sd, rank, alpha):
    """{module: (alpha / rank) * B @ A}: what the adapter adds to the module's weight."""
    return {k[: -len(".lora_A.weight")]: (alpha / rank) * sd[k.replace("lora_A", "lora_B")] @ sd[k]
            for k in sd if k.endswith(".lora_A.weight")}


def diffusers_base(model):
    """diffusers' WanTransformer3DModel with our base weights, through diffusers' own key conversion."""
    from diffusers import WanTransformer3DModel
    from diffusers.loaders.single_file_utils import convert_wan_transformer_to_diffusers
    c = model.cfg
    ref = WanTransformer3DModel(patch_size=c.patch_size, num_attention_heads=c.num_heads,
                                attention_head_dim=c.dim // c.num_heads, in_channels=c.in_dim, out_channels=c.out_dim,
                                text_dim=c.text_dim, freq_dim=c.freq_dim, ffn_dim=c.ffn_dim, num_layers=c.num_layers,
                                eps=c.eps)
    base = {k: v.clone() for k, v in model.state_dict().items() if ".lora_" not in k}
    ref.load_state_dict(convert_wan_transformer_to_diffusers(base), strict=True)
    return ref.eval()


@pytest.fixture(scope="module")
def pg():
    """export_weights gathers through torch.distributed: a gloo world of one (made here, destroyed at the end)."""
    with gloo_world_of_one():
        yield


@pytest.fixture(scope="module")
def exported(pg, tmp_path_factory):
    """(path, args, cfg, fp32 adapter weights) of a random rank-4 alpha-8 LoRA written by export_weights."""
    args = W.Args(lora_rank=RANK, lora_alpha=ALPHA, preset="tiny")
    model = W.add_lora(tiny_dit(), RANK, ALPHA)
    sd = random_lora(model)
    load_lora(model, sd)
    path = str(tmp_path_factory.mktemp("lora") / "lora.safetensors")
    W.export_weights(model, args, model.cfg, path)
    return path, args, model.cfg, sd


def test_zero_init_is_the_base_model():
    model = tiny_dit()
    inputs = dit_inputs(model.cfg)
    before = run(model, inputs)
    base_shapes = {k: v.shape for k, v in model.state_dict().items()}

    W.add_lora(model, rank=RANK, alpha=RANK)
    init = W.lora_init_state(model, seed=0)
    load_lora(model, init)
    assert torch.equal(run(model, inputs), before)  # B = 0: exactly the base, bit for bit

    sd = model.state_dict()
    lora_keys = {k for k in sd if ".lora_" in k}
    assert {k: v.shape for k, v in sd.items() if k not in lora_keys} == base_shapes  # the official names, unchanged
    assert "blocks.0.self_attn.q.weight" in sd
    targets = W.LORA_TARGETS.split(",")
    assert len(targets) == 10
    want = {}
    for i in range(model.cfg.num_layers):
        for t in targets:
            out_f, in_f = base_shapes[f"blocks.{i}.{t}.weight"]
            want[f"blocks.{i}.{t}.lora_A.weight"] = (RANK, in_f)
            want[f"blocks.{i}.{t}.lora_B.weight"] = (out_f, RANK)
    assert {k: tuple(sd[k].shape) for k in lora_keys} == want
    assert set(init) == lora_keys
    assert all(not v.any() for k, v in init.items() if k.endswith(".lora_B.weight"))
    assert all(v.abs().sum() > 0 for k, v in init.items() if k.endswith(".lora_A.weight"))
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert trainable == lora_keys


def test_training_step_changes_only_lora():
    torch.manual_seed(0)
    model = W.add_lora(tiny_dit(), RANK, ALPHA)
    load_lora(model, W.lora_init_state(model, seed=0))
    model.train()
    before = {k: v.detach().clone() for k, v in model.state_dict().items()}
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=1e-2, weight_decay=0.01)
    x0, _, ctx = dit_inputs(model.cfg)
    g = torch.Generator().manual_seed(5)
    for _ in range(2):  # step 1 moves B off zero, step 2 then gives A a gradient
        loss = W.flow_loss(model, x0, ctx, torch.rand(x0.shape[0], generator=g), torch.randn(x0.shape, generator=g))
        opt.zero_grad()
        loss.backward()
        opt.step()
    after = model.state_dict()
    assert set(after) == set(before)
    for k in before:
        if ".lora_" in k:
            assert not torch.equal(after[k], before[k]), f"{k} did not train"
        else:
            assert torch.equal(after[k], before[k]), f"{k} changed"
    assert all(p.grad is None for n, p in model.named_parameters() if ".lora_" not in n)


def test_exported_lora_matches_in_diffusers(exported):
    """The file goes through diffusers' user path: WanPipeline.load_lora_weights -> WanLoraLoaderMixin.lora_state_dict
    -> _convert_non_diffusers_wan_lora_to_diffusers, which folds each module's alpha/rank into A and B (`.alpha` is
    consumed, the PEFT adapter then runs at scale 1), -> transformer.load_lora_adapter."""
    from diffusers import WanPipeline
    path, args, cfg, _ = exported
    sd, rank, alpha = W.read_lora(path)  # the bf16 weights of the file: what diffusers sees too
    ours_model = lora_model(sd, rank, alpha)
    inputs = dit_inputs(cfg)
    ours = run(ours_model, inputs)

    # the converted state dict: diffusers' names, alpha/rank = 2 folded into A (B unscaled), no .alpha left
    conv = WanPipeline.lora_state_dict(path)
    assert len(conv) == len(sd) and all(k.startswith("transformer.blocks.") for k in conv)
    assert not any(k.endswith(".alpha") for k in conv)
    a = conv["transformer.blocks.1.attn2.to_out.0.lora_A.weight"].float()
    assert torch.equal(a, sd["blocks.1.cross_attn.o.lora_A.weight"] * ALPHA / RANK)
    b = conv["transformer.blocks.0.ffn.net.0.proj.lora_B.weight"].float()
    assert torch.equal(b, sd["blocks.0.ffn.0.lora_B.weight"])

    ref = diffusers_base(ours_model)
    pipe = WanPipeline(tokenizer=None, text_encoder=None, vae=None, scheduler=None, transformer=ref)
    pipe.load_lora_weights(path)
    x, t, ctx = inputs
    with torch.no_grad():
        theirs = ref(x, t, ctx, return_dict=False)[0].float()
    err = (ours - theirs).abs().max().item()
    assert err <= 1e-5, err

    # and the comparison is not vacuous: the adapter moves the output, and scale 1 (alpha ignored) would be far off
    base = run(tiny_dit(), inputs)
    assert (ours - base).abs().max().item() > 1e-2
    for m in lora_modules(ours_model).values():
        m.scale = 1.0
    assert (run(ours_model, inputs) - theirs).abs().max().item() > 1e-2


def test_read_lora_round_trip(exported, tmp_path):
    path, args, cfg, sd32 = exported
    sd, rank, alpha = W.read_lora(path)
    assert (rank, alpha) == (RANK, ALPHA)
    assert set(sd) == set(sd32)  # official keys, diffusion_model. stripped, no .alpha
    assert all(sd[k].dtype == torch.float32 and torch.equal(sd[k], sd32[k].to(torch.bfloat16).float()) for k in sd)
    with safe_open(path, "pt") as f:
        keys = set(f.keys())
        assert all(k.startswith("diffusion_model.blocks.") for k in keys)
        assert {k for k in keys if k.endswith(".alpha")} == {
            "diffusion_model." + k[: -len(".lora_A.weight")] + ".alpha" for k in sd if k.endswith(".lora_A.weight")}
        assert f.get_tensor("diffusion_model.blocks.0.self_attn.q.alpha").item() == ALPHA
        assert f.get_tensor("diffusion_model.blocks.0.self_attn.q.lora_A.weight").dtype == torch.bfloat16
    want = deltas(sd, rank, alpha)

    def kohya(alpha_of):
        out = {}
        for k, v in sd.items():
            mod, _, rest = k.rpartition(".lora_")
            name = "lora_unet_" + mod.replace(".", "_")
            out[name + (".lora_down.weight" if rest.startswith("A") else ".lora_up.weight")] = v.to(torch.bfloat16)
            out[name + ".alpha"] = torch.tensor(alpha_of(mod))
        return out

    # musubi's format, one alpha for all modules: the same keys, rank, alpha, tensors
    f1 = str(tmp_path / "musubi.safetensors")
    save_file(kohya(lambda mod: ALPHA), f1)
    sd1, rank1, alpha1 = W.read_lora(f1)
    assert (rank1, alpha1) == (RANK, ALPHA)
    assert set(sd1) == set(sd) and all(torch.equal(sd1[k], sd[k]) for k in sd)

    # per-module alphas: folded into B, scale 1; each module's delta is its own alpha/rank * B @ A
    per = {mod: float(1 + i % 7) for i, mod in enumerate(sorted(want))}
    f2 = str(tmp_path / "musubi_per_module.safetensors")
    save_file(kohya(per.__getitem__), f2)
    sd2, rank2, alpha2 = W.read_lora(f2)
    assert (rank2, alpha2) == (RANK, float(RANK))
    got = deltas(sd2, rank2, alpha2)
    assert set(got) == set(want)
    for mod in want:
        torch.testing.assert_close(got[mod], want[mod] * per[mod] / ALPHA, rtol=1e-6, atol=1e-7)

    # a diffusion-pipe file (no .alpha: scale 1)
    f3 = str(tmp_path / "diffusion_pipe.safetensors")
    save_file({"diffusion_model." + k: v for k, v in sd.items()}, f3)
    sd3, rank3, alpha3 = W.read_lora(f3)
    assert (rank3, alpha3) == (RANK, float(RANK)) and all(torch.equal(sd3[k], sd[k]) for k in sd)

    # the same LoRA in either format gives the same model
    inputs = dit_inputs(cfg)
    torch.testing.assert_close(run(lora_model(sd1, rank1, alpha1), inputs), run(lora_model(sd, rank, alpha), inputs),
                               rtol=0, atol=0)


def test_kohya_names_map_back_for_every_block_linear():
    """musubi (kohya) writes lora_unet_<module path with . -> _>, for every Linear of a block (networks/lora_wan.py:
    all of WanAttentionBlock but norm/head/embedding names), which on Wan 2.1 i2v/flf2v includes cross_attn.k_img and
    .v_img. kohya_module_name must give each its own module name back."""
    import dataclasses
    cfg = dataclasses.replace(W.DIT_PRESETS["tiny"], in_dim=36, model_type="i2v", img_dim=24)
    with torch.device("meta"):
        m = W.WanModel(cfg)
    names = [n for n, mod in m.blocks.named_modules(prefix="blocks") if isinstance(mod, torch.nn.Linear)]
    assert {"blocks.0.cross_attn.k_img", "blocks.1.cross_attn.v_img", "blocks.1.ffn.2"} <= set(names)
    for n in names:
        assert W.kohya_module_name(n.replace(".", "_")) == n
    # and the names a musubi i2v LoRA brings become targets add_lora can put adapters on
    targets = sorted({n.split(".", 2)[2] for n in names})
    with torch.device("meta"):
        W.add_lora(W.WanModel(cfg), 2, 2.0, ",".join(targets))


def test_export_metadata(exported):
    path, args, cfg, _ = exported
    with safe_open(path, "pt") as f:
        meta = f.metadata()
    assert meta["format"] == "pt"
    assert meta["base_model"] == "Wan-t2v-custom"  # the tiny preset; a release's shapes name it (release_name)
    assert int(meta["lora_rank"]) == RANK and float(meta["lora_alpha"]) == ALPHA
    assert meta["lora_targets"] == W.LORA_TARGETS
    a = json.loads(meta["args"])
    assert a["lora_rank"] == RANK and a["lora_alpha"] == ALPHA and a["preset"] == "tiny"
    assert W.Args(**a) == args
    c = json.loads(meta["wan_config"])
    assert W.WanConfig(**{**c, "patch_size": tuple(c["patch_size"])}) == cfg
