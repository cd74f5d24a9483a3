"""LoRA: a zero-initialised adapter is the base model bit for bit, training touches only the adapters, and the exported
file (ComfyUI key format + .alpha) gives the same outputs in diffusers (WanPipeline.load_lora_weights) as in our model.
Also read_lora on our file and on a hand-written musubi/kohya file, and the file's header metadata."""
import json

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import save_file

import train_wan as W
from common import lora_file
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


def test_lora_down_up_under_any_prefix(exported, tmp_path):
    """Kijai's / lightx2v's Wan LoRAs: `diffusion_model.X.lora_down.weight` / `.lora_up.weight` (+ .alpha), which
    ComfyUI loads: the same adapters as our lora_A / lora_B names."""
    path, _, _, _ = exported
    sd, rank, alpha = W.read_lora(path)
    f = str(tmp_path / "kijai.safetensors")
    out = {"diffusion_model." + k.replace(".lora_A.", ".lora_down.").replace(".lora_B.", ".lora_up."): v
           for k, v in sd.items()}
    out.update({"diffusion_model." + k[: -len(".lora_A.weight")] + ".alpha": torch.tensor(ALPHA)
                for k in sd if k.endswith(".lora_A.weight")})
    save_file(out, f)
    got, rank2, alpha2 = W.read_lora(f)
    assert (rank2, alpha2) == (rank, alpha) and set(got) == set(sd) and all(torch.equal(got[k], sd[k]) for k in sd)


def test_diffusers_named_lora_maps_back(exported, tmp_path):
    """A LoRA in diffusers' names (`transformer.blocks.1.attn2.to_out.0.lora_A.weight`), made here by diffusers' own
    converter from our file: renamed back by the DiT loader's table, the same per-module deltas."""
    from diffusers import WanPipeline
    path, _, _, _ = exported
    sd, rank, alpha = W.read_lora(path)
    conv = WanPipeline.lora_state_dict(path)  # alpha / rank folded in, no .alpha: scale 1
    assert "transformer.blocks.0.attn1.to_q.lora_A.weight" in conv
    f = str(tmp_path / "diffusers.safetensors")
    save_file({k: v.contiguous() for k, v in conv.items()}, f)
    got, rank2, alpha2 = W.read_lora(f)
    assert (rank2, alpha2) == (RANK, float(RANK)) and set(got) == set(sd)
    want, have = deltas(sd, rank, alpha), deltas(got, rank2, alpha2)
    for mod in want:
        torch.testing.assert_close(have[mod], want[mod], rtol=1e-6, atol=1e-7)


def test_full_weight_deltas_are_collected_or_refused(tmp_path):
    """`.diff` (added to X.weight) and `.diff_b` (to X.bias): common/lora_file.py hands them to a caller that asks
    (diffs=) and refuses them, naming the file and a key, for one that does not (the other scripts)."""
    from common import lora_file
    f = str(tmp_path / "lightx2v.safetensors")
    save_file({"diffusion_model.blocks.0.self_attn.q.lora_down.weight": torch.ones(2, 128),
               "diffusion_model.blocks.0.self_attn.q.lora_up.weight": torch.ones(128, 2),
               "diffusion_model.blocks.0.norm3.diff": torch.full((128,), 0.5),
               "diffusion_model.blocks.0.self_attn.k.diff_b": torch.full((128,), 0.25)}, f)
    with pytest.raises(ValueError, match=r"lightx2v.safetensors: full-weight deltas .* e.g. blocks.0.norm3.diff"):
        lora_file.read_lora(f)
    diffs = {}
    sd, rank, _ = W.read_lora(f, diffs)
    assert rank == 2 and set(sd) == {"blocks.0.self_attn.q.lora_A.weight", "blocks.0.self_attn.q.lora_B.weight"}
    assert set(diffs) == {"blocks.0.norm3.weight", "blocks.0.self_attn.k.bias"}
    assert torch.equal(diffs["blocks.0.self_attn.k.bias"], torch.full((128,), 0.25))


def toy_file(path, sd, cfg):
    """A DiT file as our exports write it: official keys, the config in the header (the toy's 8x8 patches)."""
    import dataclasses
    save_file({k: v.contiguous() for k, v in sd.items()}, str(path),
              metadata={"wan_config": json.dumps(dataclasses.asdict(cfg))})


def test_sample_applies_deltas_and_outside_adapters_as_merged_weights(tmp_path):
    """--mode sample --lora with a file that has block adapters, .diff / .diff_b deltas and an adapter outside the
    blocks (head.head, which add_lora does not wrap): the video equals the one of the weights with the deltas and
    the outside adapter merged in by hand, sampled with the block adapters alone."""
    from data.video import read_clip
    from tests.procs import script_runner
    wan = script_runner("train_wan.py")
    base = tiny_dit(preset="toy")
    cfg, sd = base.cfg, base.state_dict()
    toy_file(tmp_path / "base.safetensors", sd, cfg)
    g = torch.Generator().manual_seed(4)
    rank, alpha = 2, 4.0
    ad = {}
    for mod in ("blocks.0.self_attn.q", "blocks.3.ffn.2", "head.head"):
        out_f, in_f = sd[mod + ".weight"].shape
        ad[mod + ".lora_A.weight"] = torch.randn(rank, in_f, generator=g) * 0.3
        ad[mod + ".lora_B.weight"] = torch.randn(out_f, rank, generator=g) * 0.3
    diff = {"blocks.1.norm3.weight": torch.randn(cfg.dim, generator=g) * 0.2,
            "blocks.2.cross_attn.k.bias": torch.randn(cfg.dim, generator=g) * 0.2}
    file_sd = {"diffusion_model." + k.replace(".lora_A.", ".lora_down.").replace(".lora_B.", ".lora_up."): v
               for k, v in ad.items()}
    file_sd.update({"diffusion_model." + m + ".alpha": torch.tensor(alpha) for m in
                    ("blocks.0.self_attn.q", "blocks.3.ffn.2", "head.head")})
    file_sd["diffusion_model.blocks.1.norm3.diff"] = diff["blocks.1.norm3.weight"]
    file_sd["diffusion_model.blocks.2.cross_attn.k.diff_b"] = diff["blocks.2.cross_attn.k.bias"]
    save_file(file_sd, str(tmp_path / "all.safetensors"))
    merged = dict(sd)
    for k, d in diff.items():
        merged[k] = sd[k] + d
    merged["head.head.weight"] = sd["head.head.weight"] + (alpha / rank) * ad["head.head.lora_B.weight"] @ \
        ad["head.head.lora_A.weight"]
    toy_file(tmp_path / "merged.safetensors", merged, cfg)
    lora_file.write_lora(str(tmp_path / "blocks.safetensors"), {k: v for k, v in ad.items() if k.startswith("blocks.")},
                         alpha, dtype=torch.float32)
    flags = ["--preset", "toy", "--mode", "sample", "--sample_prompts", "a red circle moving left", "--sample_steps",
             "2", "--cache_dir", str(tmp_path / "cache")]
    wan(*flags, "--dit_path", str(tmp_path / "base.safetensors"), "--lora", str(tmp_path / "all.safetensors"),
        "--out_dir", str(tmp_path / "a"))
    wan(*flags, "--dit_path", str(tmp_path / "merged.safetensors"), "--lora", str(tmp_path / "blocks.safetensors"),
        "--out_dir", str(tmp_path / "b"))
    wan(*flags, "--dit_path", str(tmp_path / "base.safetensors"), "--out_dir", str(tmp_path / "c"))
    a, b, c = (read_clip(str(tmp_path / d / "samples" / "step_00000000_0.mp4"), 0, 5, 4, (16, 16)) for d in "abc")
    assert torch.equal(a, b)
    assert (a - c).abs().mean() > 0.01  # and the file does change the video


@pytest.mark.parametrize("key, says", [
    ("diffusion_model.blocks.0.cross_attn.k_img.lora_down.weight", "does not have (no such Linear, or weight): "
     "['blocks.0.cross_attn.k_img']"),  # a Wan 2.1 i2v LoRA on a model without the image projections
    ("diffusion_model.blocks.9.self_attn.q.lora_down.weight", "['blocks.9.self_attn.q']"),  # a deeper model's block
    ("diffusion_model.blocks.0.norm1.diff", "['blocks.0.norm1.weight']"),  # norm1 has no weight in Wan
])
def test_a_lora_the_model_cannot_take_is_one_line(tmp_path, key, says):
    base = tiny_dit(preset="toy")
    toy_file(tmp_path / "base.safetensors", base.state_dict(), base.cfg)
    dim = base.cfg.dim
    sd = {"diffusion_model.blocks.0.self_attn.q.lora_down.weight": torch.ones(2, dim),
          "diffusion_model.blocks.0.self_attn.q.lora_up.weight": torch.ones(dim, 2),
          key: torch.ones(2, dim) if "lora_down" in key else torch.ones(dim)}
    if "lora_down" in key:
        sd[key.replace("lora_down", "lora_up")] = torch.ones(dim, 2)
    save_file(sd, str(tmp_path / "bad.safetensors"))
    # check_args, as main() calls it first (in this process: the module's gloo group must outlive the check)
    args = W.parse(W.Args, ["--preset", "toy", "--mode", "sample", "--dit_path", str(tmp_path / "base.safetensors"),
                            "--lora", str(tmp_path / "bad.safetensors"), "--sample_prompts", "a"],
                   presets={"toy": W.TOY_ARGS})
    with pytest.raises(W.UserError) as e:
        W.check_args(args)
    msg = str(e.value)
    assert "\n" not in msg and msg.startswith(f"{tmp_path / 'bad.safetensors'}: adapters on modules this model "
                                              "does not have") and says in msg, msg


def partial_lora(path, cfg, rank=2, alpha=4.0, seed=5):
    """A LoRA file on blocks.0.self_attn.q and blocks.1.ffn.2 only (ComfyUI keys + .alpha) -> its adapters."""
    g = torch.Generator().manual_seed(seed)
    ad = {}
    for mod, (o, i) in (("blocks.0.self_attn.q", (cfg.dim, cfg.dim)), ("blocks.1.ffn.2", (cfg.dim, cfg.ffn_dim))):
        ad[mod + ".lora_A.weight"] = torch.randn(rank, i, generator=g).to(torch.bfloat16).float()
        ad[mod + ".lora_B.weight"] = torch.randn(o, rank, generator=g).to(torch.bfloat16).float()
    lora_file.write_lora(str(path), ad, alpha)
    return ad


def check_args_of(argv):
    args = W.parse(W.Args, argv, presets={"toy": W.TOY_ARGS})
    W.check_args(args)
    return args


def test_init_lora_takes_the_files_rank_alpha_and_targets(tmp_path):
    base = tiny_dit(preset="toy")
    toy_file(tmp_path / "base.safetensors", base.state_dict(), base.cfg)
    partial_lora(tmp_path / "l.safetensors", base.cfg)
    args = check_args_of(["--preset", "toy", "--dit_path", str(tmp_path / "base.safetensors"), "--init_lora",
                          str(tmp_path / "l.safetensors")])
    assert (args.lora_rank, args.lora_alpha, args.lora_targets) == (2, 4.0, "ffn.2,self_attn.q")


@pytest.mark.parametrize("flags, says", [
    (["--mode", "sample", "--sample_prompts", "a", "--init_lora", "L"], "--init_lora starts a training run's adapter "
     "from a file; to sample with one use --lora"),
    (["--init_lora", "L", "--lora_rank", "8"], "--init_lora L: rank 2, alpha 4.0, targets ffn.2,self_attn.q; leave "
     "--lora_rank, --lora_alpha and --lora_targets out or give the file's"),
    (["--init_lora", "D"], "--init_lora D: its full-weight deltas (.diff / .diff_b) or adapters outside the blocks "
     "cannot train as LoRA adapters: merge it into the base with --base_lora"),
    (["--base_lora", "high=L"], "--base_lora high=L: high= names a part of the model: this model has no parts"),
    (["--base_lora", "L:0.5,nowhere.safetensors"], "--base_lora nowhere.safetensors: no such file"),
    (["--init_lora", "nowhere.safetensors"], "--init_lora nowhere.safetensors: no such file or folder"),
    (["--lora_plus", "4"], "--lora_plus 4.0: the multiple of --lr at which a LoRA's B matrices learn, > 0, for a "
     "LoRA run"),
    (["--lora_plus", "0", "--init_lora", "L"], "--lora_plus 0.0: the multiple"),
    (["--mode", "bench", "--base_lora", "L"], "--base_lora merges a LoRA into the base of a training or sampling run"),
])
def test_init_and_base_lora_mistakes_are_one_line(tmp_path, monkeypatch, flags, says):
    monkeypatch.chdir(tmp_path)
    base = tiny_dit(preset="toy")
    toy_file(tmp_path / "base.safetensors", base.state_dict(), base.cfg)
    ad = partial_lora(tmp_path / "L", base.cfg)
    save_file({"diffusion_model." + k: v for k, v in ad.items()} | {"diffusion_model.blocks.0.norm3.diff":
              torch.ones(base.cfg.dim)}, str(tmp_path / "D"))
    with pytest.raises(W.UserError) as e:
        check_args_of(["--preset", "toy", "--dit_path", str(tmp_path / "base.safetensors"), *flags])
    assert "\n" not in str(e.value) and says in str(e.value), str(e.value)


def test_init_lora_of_some_blocks_trains_the_others_from_a_fresh_adapter(tmp_path, toy):
    """--init_lora with a file on two modules only (the toy, 1 step at lr 0): the export holds the file's adapters
    unchanged and, on every other target of the file, the fresh init's (A random, B zero: an adapter that can learn;
    zeros in both would never move)."""
    from tests.procs import SMALL, script_runner
    wan = script_runner("train_wan.py")
    base = tiny_dit(preset="toy")
    toy_file(tmp_path / "base.safetensors", base.state_dict(), base.cfg)
    ad = partial_lora(tmp_path / "l.safetensors", base.cfg)
    wan(*SMALL, "--data", toy["data"], "--cache_dir", toy["cache"], "--dit_path", str(tmp_path / "base.safetensors"),
        "--init_lora", str(tmp_path / "l.safetensors"), "--max_steps", "1", "--lr", "0", "--out_dir",
        str(tmp_path / "o"))
    got, rank, alpha = W.read_lora(str(tmp_path / "o" / "lora.safetensors"))
    assert (rank, alpha) == (2, 4.0)
    assert sorted(got) == sorted(f"blocks.{i}.{m}.lora_{x}.weight" for i in range(base.cfg.num_layers)
                                 for m in ("self_attn.q", "ffn.2") for x in "AB")
    for k, v in got.items():
        if k in ad:
            assert torch.equal(v, ad[k]), k
        else:
            assert (v.abs().sum() == 0) == (".lora_B." in k), k
