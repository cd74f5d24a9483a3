"""LoRA: B = 0 is the base model, only adapters train, the default targets are LTX-Video-Trainer's (both attentions'
to_q/k/v/out.0; the FFN by flag), and the exported ComfyUI-format file loads in diffusers with equal outputs."""
import torch

import train_ltx as L
from common import lora_file
from tests.test_ltx_dit import diffusers_twin, randomise, tiny_dit


def inputs(c, seed=3):
    g = torch.Generator().manual_seed(seed)
    x, ctx = torch.randn(2, c.in_channels, 2, 3, 4, generator=g), torch.randn(2, 6, c.caption_channels, generator=g)
    return x, torch.tensor([250.0, 900.0]), ctx, torch.tensor([[1, 1, 1, 1, 0, 0], [1, 1, 0, 0, 0, 0]])


def test_zero_b_is_the_base_and_only_adapters_train():
    base = tiny_dit()
    model = tiny_dit()
    L.add_lora(model, 4, 4)
    model.load_state_dict(L.lora_init_state(model, 0), strict=False)
    args = inputs(base.cfg)
    with torch.no_grad():
        assert torch.equal(base(*args), model(*args))
    trainable = [n for n, p in model.named_parameters() if p.requires_grad]
    assert trainable and all(".lora_" in n for n in trainable)
    mods = {n.rsplit(".lora_", 1)[0].split(".", 2)[2] for n in trainable}
    assert mods == {f"{a}.{m}" for a in ("attn1", "attn2") for m in ("to_q", "to_k", "to_v", "to_out.0")}
    # 2B, rank 32, attention only: 917,504 * r trainable (as LTX-Video-Trainer reports)
    with torch.device("meta"):
        big = L.add_lora(L.Transformer3DModel(L.DIT_PRESETS["2B"]), 32, 32)
    assert sum(p.numel() for p in big.parameters() if p.requires_grad) == 29_360_128
    ffn = L.add_lora(tiny_dit(), 2, 2, L.LORA_TARGETS_FFN)
    assert any(n.endswith("ff.net.0.proj.lora_A.weight") for n, _ in ffn.named_parameters())


def with_and_without(model, ref, base):
    """(our model with the LoRA, diffusers' with its adapter, the plain base) on the same inputs, (B, C, f, h, w)."""
    x, t, ctx, mask = inputs(base.cfg)
    with torch.no_grad():
        ours = model(x, t, ctx, mask, frame_rate=25.0)
        grid = L.rope_grid(2, 3, 4, 25.0, base.cfg.causal_temporal_positioning)[None].repeat(2, 1, 1)
        theirs = ref(x.flatten(2).transpose(1, 2), ctx, t, mask, video_coords=grid, return_dict=False)[0]
        plain = base(x, t, ctx, mask)
    return ours, theirs.transpose(1, 2).reshape(ours.shape), plain


def test_exported_lora_loads_in_diffusers(tmp_path):
    from diffusers import LTXPipeline
    base = tiny_dit()
    ref = diffusers_twin(base)
    model = tiny_dit()
    L.add_lora(model, 4, 8.0, L.LORA_TARGETS_FFN)  # alpha != rank: the .alpha keys carry the scale
    sd = randomise(model, 5).state_dict()
    lsd = {k: v for k, v in sd.items() if ".lora_" in k}
    path = str(tmp_path / "lora.safetensors")
    lora_file.write_lora(path, *L.lora_for_export(lsd, 4, 8.0), dtype=torch.float32)
    # ComfyUI naming: diffusion_model.<official module>.lora_A.weight + .alpha (= rank: the scale 2 is folded into B,
    # because diffusers ignores .alpha for LTX while ComfyUI applies it)
    back, rank, alpha = lora_file.read_lora(path)
    assert rank == 4 and alpha == 4.0 and set(back) == set(lsd)
    assert torch.allclose(back[next(k for k in lsd if "lora_B" in k)], 2 * lsd[next(k for k in lsd if "lora_B" in k)])
    state = LTXPipeline.lora_state_dict(path)
    state = state[0] if isinstance(state, tuple) else state
    ref.load_lora_adapter(state, prefix="transformer", adapter_name="x")
    model = L.add_lora(tiny_dit(), 4, 8.0, L.LORA_TARGETS_FFN)
    model.load_state_dict({**tiny_dit().state_dict(), **lsd}, strict=False)
    ours, theirs, plain = with_and_without(model, ref, base)
    assert (ours - plain).abs().max() > 1e-2  # the adapter does something
    assert (ours - theirs).abs().max() <= 1e-5, (ours - theirs).abs().max()


def test_diffusers_format_lora_file_is_read(tmp_path):
    """A LoRA in diffusers' format, as LTX-Video-Trainer (and finetrainers) save it: PEFT on diffusers' transformer,
    get_peft_model_state_dict, LTXPipeline.save_lora_weights (keys transformer.transformer_blocks.N.<module>.lora_A/B
    .weight, no alpha). read_lora gives the same state dict as the same LoRA in ComfyUI's diffusion_model. keys, and
    our model with it computes what diffusers' model with the adapter computes."""
    from diffusers import LTXPipeline
    from peft import LoraConfig, get_peft_model_state_dict
    base = tiny_dit()
    ref = diffusers_twin(base)
    targets = L.LORA_TARGETS_FFN.split(",")
    ref.add_adapter(LoraConfig(r=4, lora_alpha=4, init_lora_weights=True, target_modules=targets))
    g = torch.Generator().manual_seed(6)
    with torch.no_grad():  # B != 0: an adapter that does something
        for n, p in ref.named_parameters():
            if "lora_" in n:
                p.copy_(torch.randn(p.shape, generator=g) * 0.3)
    LTXPipeline.save_lora_weights(str(tmp_path / "df"), transformer_lora_layers=get_peft_model_state_dict(ref))
    path = str(tmp_path / "df" / "pytorch_lora_weights.safetensors")
    from safetensors import safe_open
    with safe_open(path, "pt") as f:
        keys = list(f.keys())
    assert all(k.startswith("transformer.transformer_blocks.") for k in keys) and len(keys) == 2 * 10 * 2
    sd, rank, alpha = L.read_lora(path)
    comfy = str(tmp_path / "comfy.safetensors")
    lora_file.write_lora(comfy, sd, 4.0, dtype=torch.float32)  # diffusion_model.<module> + .alpha
    sd2, rank2, alpha2 = L.read_lora(comfy)
    assert (rank, alpha) == (rank2, alpha2) == (4, 4.0) and sd.keys() == sd2.keys()
    assert all(torch.equal(sd[k], sd2[k]) for k in sd)
    model = L.add_lora(tiny_dit(), 4, 4.0, L.LORA_TARGETS_FFN)
    model.load_state_dict({**base.state_dict(), **sd})  # strict: every adapter key has its module
    ours, theirs, plain = with_and_without(model, ref, base)
    assert (ours - plain).abs().max() > 1e-2
    assert (ours - theirs).abs().max() <= 1e-5, (ours - theirs).abs().max()
