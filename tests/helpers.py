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


# model_type="ti2v": Wan2.2-TI2V-5B's layout (a 48-channel DiT, Wan2.2_VAE.pth); "i2v" / "flf2v": Wan2.1-I2V/FLF2V's
# (a 36-channel DiT with img_emb, and the CLIP .pth, its vision tower TINY_CLIP wide, 257 tokens as the real one)
TINY_CLIP = dict(dim=80, num_heads=1, num_layers=3, mlp_dim=160, patch_size=14, image_size=224)


def _tiny_clip_file(path, seed):
    """The open-clip .pth layout: visual.* (num_layers blocks, post_norm, head; load_clip drops the last block and
    after) beside a textual.* tensor and log_scale that load_clip must ignore."""
    c = W.CLIPConfig(**TINY_CLIP)
    m = _randomise(W.CLIPVision(c), seed)  # builds num_layers - 1 blocks: the last is written from block 0
    sd = {f"visual.{k}": v for k, v in m.state_dict().items()}
    last = f"visual.transformer.{c.num_layers - 1}."
    sd.update({last + k: v.clone() for k, v in m.transformer[0].state_dict().items()})
    g = torch.Generator().manual_seed(seed)
    sd.update({"visual.post_norm.weight": torch.ones(c.dim), "visual.post_norm.bias": torch.zeros(c.dim),
               "visual.head": torch.randn(c.dim, 16, generator=g), "textual.token_embedding.weight": torch.randn(8, 16),
               "log_scale": torch.tensor(4.6)})
    torch.save(sd, path)


def make_official_folder(root, seed=0, model_type="t2v"):
    """Write <root>/config.json, diffusion_pytorch_model.safetensors, Wan2.1_VAE.pth, models_t5_umt5-xxl-enc-bf16.pth
    and google/umt5-xxl/tokenizer.json, with tiny random models whose sizes the loaders read off the files.
    model_type: t2v (Wan2.1-T2V), ti2v (Wan2.2-TI2V-5B: Wan2.2_VAE.pth, 48 channels), i2v / flf2v (Wan2.1: + the
    CLIP .pth)."""
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
    if model_type == "ti2v":
        vae = _randomise(W.Wan22VAE(W.VAE22_PRESETS["tiny"]), seed + 1)
        torch.save(vae.state_dict(), os.path.join(root, "Wan2.2_VAE.pth"))
    else:
        vae = _randomise(W.WanVAE(W.VAEConfig(dim=TINY_VAE_DIM)), seed + 1)
        torch.save(vae.state_dict(), os.path.join(root, "Wan2.1_VAE.pth"))
    dims = dict(ti2v=dict(in_dim=48, out_dim=48), i2v=dict(in_dim=36, img_dim=TINY_CLIP["dim"]),
                flf2v=dict(in_dim=36, img_dim=TINY_CLIP["dim"])).get(model_type, {})
    if "img_dim" in dims:
        _tiny_clip_file(os.path.join(root, W.CLIP_FILE), seed + 3)
    cfg = W.WanConfig(**{**TINY_DIT, **dims}, model_type=model_type)
    dit = W.WanModel(cfg)
    dit.init_weights()
    _randomise(dit, seed + 2)
    save_file({k: v.contiguous() for k, v in dit.state_dict().items()},
              os.path.join(root, "diffusion_pytorch_model.safetensors"))
    with open(os.path.join(root, "config.json"), "w") as f:  # the official file's fields
        json.dump(dict(_class_name="WanModel", _diffusers_version="0.30.0", model_type=model_type, patch_size=[1, 2, 2],
                       dim=cfg.dim, ffn_dim=cfg.ffn_dim, freq_dim=cfg.freq_dim, num_heads=cfg.num_heads,
                       num_layers=cfg.num_layers, in_dim=cfg.in_dim, out_dim=cfg.out_dim, text_len=cfg.text_len,
                       text_dim=cfg.text_dim, window_size=[-1, -1], qk_norm=True, cross_attn_norm=True, eps=cfg.eps), f)
    return root
