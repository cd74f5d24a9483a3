"""Training-step speed of our Mochi AsymmDiT vs diffusers' MochiTransformer3DModel, side by side in one process,
same weights and shapes (forward + backward, fp32 on CPU / bf16 on GPU), and of ours with torch.compile per block.
The weights are diffusers' own random init, renamed to the official keys by train_mochi's loader map; the script
first checks that both models give the same output (max |diff| printed).

    python benchmarks/mochi_vs_diffusers.py                    # CPU, a small config (the BENCHMARKS.md rows)
    python benchmarks/mochi_vs_diffusers.py --dim 3072 --dim_y 1536 --heads 24 --layers 4 --t5_dim 4096 \\
        --text_len 256 --frames 7 --height 60 --width 106      # on a GPU: full-width blocks, 37-frame latents

diffusers is a test-only dependency (requirements-test.txt); this script is not part of the runtime."""
import argparse
import dataclasses
import os
import sys

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
import train_mochi as M  # noqa: E402
from benchmarks.wan_vs_diffusers import race  # noqa: E402  (the shared side-by-side timer)


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--dim", type=int, default=768)  # visual width; keep dim and dim_y multiples of 96 (equal FFNs)
    p.add_argument("--dim_y", type=int, default=384)
    p.add_argument("--heads", type=int, default=6)
    p.add_argument("--layers", type=int, default=4)
    p.add_argument("--t5_dim", type=int, default=512)
    p.add_argument("--text_len", type=int, default=64)  # padded prompt length
    p.add_argument("--text_real", type=str, default="40")  # real tokens per sample, e.g. "40,17" for a batch of 2
    p.add_argument("--frames", type=int, default=3)  # latent frames
    p.add_argument("--height", type=int, default=40)  # latent height
    p.add_argument("--width", type=int, default=40)
    p.add_argument("--steps", type=int, default=10)
    p.add_argument("--compile", type=int, default=1)
    a = p.parse_args()
    from diffusers import MochiTransformer3DModel
    torch.manual_seed(0)
    dev = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    dtype = torch.bfloat16 if dev.type == "cuda" else torch.float32
    ref = MochiTransformer3DModel(num_attention_heads=a.heads, attention_head_dim=a.dim // a.heads,
                                  num_layers=a.layers, pooled_projection_dim=a.dim_y, text_embed_dim=a.t5_dim,
                                  max_sequence_length=a.text_len)
    with torch.no_grad():  # diffusers starts the learned RoPE frequencies at zero (no rotation): give them values
        ref.pos_frequencies.normal_(0, 0.3)
    sd = M.official_from_diffusers({k: v.clone() for k, v in ref.state_dict().items()})
    cfg = dataclasses.replace(M.dit_config_from({k: tuple(v.shape) for k, v in sd.items()}), text_len=a.text_len)
    ours = M.AsymmDiT(cfg)
    ours.load_state_dict(sd, strict=True)
    ours, ref = ours.to(dev, dtype).train(), ref.to(dev, dtype).train()

    lens = [int(n) for n in a.text_real.split(",")]
    B = len(lens)
    x = torch.randn(B, cfg.in_channels, a.frames, a.height, a.width, device=dev, dtype=dtype)
    sigma = torch.full((B,), 0.5, device=dev)
    y = torch.randn(B, a.text_len, a.t5_dim, device=dev, dtype=dtype)
    mask = (torch.arange(a.text_len)[None] < torch.tensor(lens)[:, None]).to(dev)
    N = a.frames * (a.height // 2) * (a.width // 2)
    print(f"device {dev} ({torch.cuda.get_device_name() if dev.type == 'cuda' else os.cpu_count()} "
          f"{'GPU' if dev.type == 'cuda' else 'CPU threads: ' + str(torch.get_num_threads())}), {dtype}, "
          f"dim {cfg.dim_x}/{cfg.dim_y} x {cfg.depth} layers, batch {B}, {N} video tokens + {lens} of "
          f"{a.text_len} text tokens")
    call_ref = lambda m: m(x, y, 1000 * (1 - sigma), mask, return_dict=False)[0]  # noqa: E731
    call_ours = lambda m: m(x, sigma, y, mask)  # noqa: E731
    with torch.no_grad():
        diff = (call_ours(ours).float() - call_ref(ref).float()).abs().max().item()
    print(f"same weights, same output: max |ours - diffusers| = {diff:.2e}")
    race(ref, ours, call_ref, call_ours, x, lambda m: m.blocks, a.steps, a.compile)


if __name__ == "__main__":
    main()
