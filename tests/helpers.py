"""Small shared test helpers (no fixtures with side effects)."""
import torch

import train_wan as W


def tiny_dit(seed=0, preset="tiny"):
    """A tiny WanModel whose every parameter is random (upstream init zeroes the head and biases; a parity test
    must not let a zero hide a bug)."""
    torch.manual_seed(seed)
    m = W.WanModel(W.DIT_PRESETS[preset])
    m.init_weights()
    with torch.no_grad():
        for p in m.parameters():
            p.add_(torch.randn_like(p) * 0.05)
    return m.eval()


def dit_inputs(cfg, B=2, F=3, H=6, Wd=10, seed=1):
    g = torch.Generator().manual_seed(seed)
    return (torch.randn(B, cfg.in_dim, F, H, Wd, generator=g), torch.tensor([999.0, 17.5][:B]),
            torch.randn(B, cfg.text_len, cfg.text_dim, generator=g))


# A tiny model in the official Wan2.1-T2V-* file layout, so that the real (non-toy) path of main() runs: the VAE
# and umT5 encode into the cache, the DiT loads from config.json + safetensors, samples decode through the VAE.
TINY_DIT = dict(dim=64, ffn_dim=128, num_heads=2, num_layers=2, in_dim=16, out_dim=16, text_dim=32, text_len=512)
TINY_T5 = dict(dim=32, dim_attn=32, dim_ffn=64, num_heads=4, num_layers=2)
TINY_VAE_DIM = 8


def _randomise(model, seed):
    """O(1)-effect random weights everywhere (no zero head, no unit gains): the tiny folder is a 'released' model."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith(("gamma", "norm.weight", "norm1.weight", "norm2.weight", "norm3.weight")):
                p.copy_(1 + 0.1 * torch.randn(p.shape, generator=g))
            elif name.endswith("bias") or p.dim() == 1:
                p.copy_(0.05 * torch.randn(p.shape, generator=g))
            else:
                fan_in = p[0].numel()
                p.copy_(torch.randn(p.shape, generator=g) * (0.5 * fan_in ** -0.5))
    return model


def make_official_folder(root, seed=0):
    """Write <root>/config.json, diffusion_pytorch_model.safetensors, Wan2.1_VAE.pth, models_t5_umt5-xxl-enc-bf16.pth
    and google/umt5-xxl/tokenizer.json, with tiny random models whose sizes the loaders read off the files."""
    import json
    import os

    import tokenizers
    from safetensors.torch import save_file

    from data.toy import BACKGROUNDS, COLORS, DIRECTIONS, SHAPES
    os.makedirs(os.path.join(root, "google", "umt5-xxl"), exist_ok=True)
    words = sorted({*COLORS, *SHAPES, *DIRECTIONS, *BACKGROUNDS, "a", "moving", "on", "background"})
    vocab = {"<pad>": 0, "</s>": 1, "<unk>": 2, **{w: i + 3 for i, w in enumerate(words)}}
    tok = tokenizers.Tokenizer(tokenizers.models.WordLevel(vocab, unk_token="<unk>"))
    tok.normalizer = tokenizers.normalizers.Lowercase()
    tok.pre_tokenizer = tokenizers.pre_tokenizers.Whitespace()
    tok.save(os.path.join(root, "google", "umt5-xxl", "tokenizer.json"))
    torch.manual_seed(seed)
    t5 = _randomise(W.T5Encoder(W.T5Config(vocab=len(vocab) + 5, **TINY_T5)), seed)
    torch.save(t5.state_dict(), os.path.join(root, W.WAN_T5_CHECKPOINT))
    vae = _randomise(W.WanVAE(W.VAEConfig(dim=TINY_VAE_DIM)), seed + 1)
    torch.save(vae.state_dict(), os.path.join(root, "Wan2.1_VAE.pth"))
    cfg = W.WanConfig(**TINY_DIT)
    dit = W.WanModel(cfg)
    dit.init_weights()
    _randomise(dit, seed + 2)
    save_file({k: v.contiguous() for k, v in dit.state_dict().items()},
              os.path.join(root, "diffusion_pytorch_model.safetensors"))
    with open(os.path.join(root, "config.json"), "w") as f:  # the official file's fields
        json.dump(dict(_class_name="WanModel", _diffusers_version="0.30.0", model_type="t2v", patch_size=[1, 2, 2],
                       dim=cfg.dim, ffn_dim=cfg.ffn_dim, freq_dim=cfg.freq_dim, num_heads=cfg.num_heads,
                       num_layers=cfg.num_layers, in_dim=cfg.in_dim, out_dim=cfg.out_dim, text_len=cfg.text_len,
                       text_dim=cfg.text_dim, window_size=[-1, -1], qk_norm=True, cross_attn_norm=True, eps=cfg.eps), f)
    return root
