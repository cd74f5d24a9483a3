"""Training-step speed of our LTX-Video DiT vs diffusers' LTXVideoTransformer3DModel, side by side in one process,
same weights and inputs (forward + backward, fp32 on CPU / bf16 on GPU), and of ours with torch.compile per block.
The two outputs are compared first (max abs difference printed), so the timing is of the same computation.

    python benchmarks/ltx_vs_diffusers.py                      # CPU, a small config (the BENCHMARKS.md rows)
    python benchmarks/ltx_vs_diffusers.py --preset 2B --frames 7 --height 16 --width 24   # on a GPU: 768x512x49

diffusers is a test-only dependency (requirements-test.txt); this script is not part of the runtime. The timing
(interleaved medians) is wan_vs_diffusers.py's."""
import argparse
import os
import sys

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import train_ltx as L  # noqa: E402
from wan_vs_diffusers import race  # noqa: E402


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--preset", default="")
    p.add_argument("--heads", type=int, default=8)  # x head_dim 64 (the 2B's): width 512
    p.add_argument("--layers", type=int, default=4)
    p.add_argument("--frames", type=int, default=3)  # latent frames
    p.add_argument("--height", type=int, default=16)  # latent height (x 32 pixels)
    p.add_argument("--width", type=int, default=16)
    p.add_argument("--text_len", type=int, default=128)
    p.add_argument("--steps", type=int, default=10)
    a = p.parse_args()
    from diffusers import LTXVideoTransformer3DModel
    torch.manual_seed(0)
    cfg = L.DIT_PRESETS[a.preset] if a.preset else L.LTXConfig(num_layers=a.layers, num_attention_heads=a.heads,
                                                               cross_attention_dim=a.heads * 64)
    dev = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    dtype = torch.bfloat16 if dev.type == "cuda" else torch.float32
    ours = L.Transformer3DModel(cfg)  # the constructors' random init (init_weights zeroes the output layer)
    ref = LTXVideoTransformer3DModel(in_channels=cfg.in_channels, out_channels=cfg.out_channels,
                                     num_attention_heads=cfg.num_attention_heads,
                                     attention_head_dim=cfg.attention_head_dim,
                                     cross_attention_dim=cfg.cross_attention_dim, num_layers=cfg.num_layers,
                                     caption_channels=cfg.caption_channels)
    renames = [(b, a) for a, b in L.DIFFUSERS_DIT_RENAMES]  # ours -> diffusers: the loader's four renames, reversed
    sd = {}
    for k, v in ours.state_dict().items():
        for x, y in renames:
            k = k.replace(x, y)
        sd[k] = v
    ref.load_state_dict(sd, strict=True)
    ours, ref = ours.to(dev, dtype).train(), ref.to(dev, dtype).train()
    B, f, h, w, fps = 1, a.frames, a.height, a.width, 24.0
    x = torch.randn(B, cfg.in_channels, f, h, w, device=dev, dtype=dtype)
    t = torch.tensor([500.0], device=dev)
    ctx = torch.randn(B, a.text_len, cfg.caption_channels, device=dev, dtype=dtype)
    mask = torch.ones(B, a.text_len, device=dev)
    mask[:, a.text_len // 2:] = 0  # half of the prompt is padding, as with a short prompt
    grid = L.rope_grid(f, h, w, fps, cfg.causal_temporal_positioning, dev)  # the same RoPE positions for diffusers
    coords = grid[None].expand(B, -1, -1)  # (B, 3, N)
    tokens = x.flatten(2).transpose(1, 2)

    def call_ref(m):
        return m(tokens, ctx, t, mask, video_coords=coords, return_dict=False)[0]

    def call_ours(m):
        return m(x, t, ctx, mask, frame_rate=fps)
    with torch.no_grad():
        diff = (call_ours(ours).flatten(2).transpose(1, 2).float() - call_ref(ref).float()).abs().max().item()
    print(f"device {dev} ({torch.cuda.get_device_name() if dev.type == 'cuda' else os.cpu_count()} "
          f"{'GPU' if dev.type == 'cuda' else 'CPU threads: ' + str(torch.get_num_threads())}), {dtype}, "
          f"width {cfg.dim} x {cfg.num_layers} layers, {f * h * w} video tokens + {a.text_len} text tokens; "
          f"outputs differ by {diff:.1e}")
    race(ref, ours, call_ref, call_ours, x, lambda m: m.transformer_blocks, a.steps)


if __name__ == "__main__":
    main()
