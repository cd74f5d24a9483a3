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
