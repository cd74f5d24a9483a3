"""Training-step speed of our HunyuanVideo DiT vs diffusers' HunyuanVideoTransformer3DModel, side by side in one
process, same weights and inputs (forward + backward, fp32 on CPU / bf16 on GPU), and of ours with torch.compile per
block. The weights are ours, every one random (tests/test_hunyuan_dit.tiny_dit), and reach diffusers through the
parity test's own mapping (tests/test_hunyuan_dit.diffusers_twin: diffusers' converter plus the single blocks'
linear1 split); the script first checks that both models give the same output (max |diff| printed).

    python benchmarks/hunyuan_vs_diffusers.py                  # CPU, a small config (the BENCHMARKS.md rows)
    python benchmarks/hunyuan_vs_diffusers.py --hidden 3072 --heads 24 --double 2 --single 4 --text_len 256 \\
        --frames 9 --height 68 --width 120                     # on a GPU: full-width blocks, 33 frames at 544x960

diffusers is a test-only dependency (requirements-test.txt); this script is not part of the runtime."""
import argparse
import os
import sys

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
import train_hunyuan as H  # noqa: E402
from benchmarks.wan_vs_diffusers import race  # noqa: E402  (the shared side-by-side timer)
from tests.test_hunyuan_dit import diffusers_twin, tiny_dit  # noqa: E402  (the parity test's weights and mapping)


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--hidden", type=int, default=512)
    p.add_argument("--heads", type=int, default=4)  # x head_dim 128 (the 13B's): RoPE split (16, 56, 56)
    p.add_argument("--double", type=int, default=2)  # dual-stream blocks
    p.add_argument("--single", type=int, default=2)  # single-stream blocks
    p.add_argument("--text_len", type=int, default=64)  # padded prompt length
    p.add_argument("--text_real", type=str, default="40")  # real tokens per sample, e.g. "40,17" for a batch of 2
    p.add_argument("--frames", type=int, default=3)  # latent frames
    p.add_argument("--height", type=int, default=32)  # latent height (patch 2: 16 tokens)
    p.add_argument("--width", type=int, default=32)
    p.add_argument("--steps", type=int, default=10)
    p.add_argument("--compile", type=int, default=1)
    a = p.parse_args()
    C = a.hidden
    model = tiny_dit(0, "13B", hidden_size=C, heads_num=a.heads, mlp_dim=4 * C, refiner_mlp_dim=4 * C,
                     mm_double_blocks_depth=a.double, mm_single_blocks_depth=a.single,
                     rope_dim_list=H.rope_dims(C // a.heads))  # the release's text widths: 4096 and 768
    ref = diffusers_twin(model)
    cfg = model.cfg
    dev = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    dtype = torch.bfloat16 if dev.type == "cuda" else torch.float32
    ours, ref = model.to(dev, dtype).train(), ref.to(dev, dtype).train()

    lens = [int(n) for n in a.text_real.split(",")]
    B = len(lens)
    g = torch.Generator().manual_seed(1)
    x = torch.randn(B, cfg.in_channels, a.frames, a.height, a.width, generator=g).to(dev, dtype)
    t = torch.full((B,), 500.0, device=dev)
    text = torch.randn(B, a.text_len, cfg.text_states_dim, generator=g).to(dev, dtype)
    mask = (torch.arange(a.text_len)[None] < torch.tensor(lens)[:, None]).long().to(dev)  # right-padded
    vec = torch.randn(B, cfg.text_states_dim_2, generator=g).to(dev, dtype)
    guidance = torch.full((B,), 6000.0, device=dev)  # embedded guidance 6.0 x 1000
    N = a.frames * (a.height // 2) * (a.width // 2)
    print(f"device {dev} ({torch.cuda.get_device_name() if dev.type == 'cuda' else os.cpu_count()} "
          f"{'GPU' if dev.type == 'cuda' else 'CPU threads: ' + str(torch.get_num_threads())}), {dtype}, "
          f"hidden {C} ({a.heads} heads) x {a.double} double + {a.single} single blocks, batch {B}, "
          f"{N} video tokens + {lens} of {a.text_len} text tokens")
    call_ref = lambda m: m(x, t, text, mask, vec, guidance, return_dict=False)[0]  # noqa: E731
    call_ours = lambda m: m(x, t, text, mask, vec, guidance)  # noqa: E731
    with torch.no_grad():
        want = call_ref(ref).float()
        diff = (call_ours(ours).float() - want).abs().max().item()
    print(f"same weights, same output: max |ours - diffusers| = {diff:.2e} (max |output| {want.abs().max():.2f})")
    race(ref, ours, call_ref, call_ours, x, lambda m: [*m.double_blocks, *m.single_blocks], a.steps, a.compile)


if __name__ == "__main__":
    main()
