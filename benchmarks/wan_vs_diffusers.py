"""Training-step speed of our Wan DiT vs diffusers' WanTransformer3DModel, side by side in one process, same
weights and shapes (forward + backward, fp32 on CPU / bf16 on GPU), and of ours with torch.compile per block.

    python benchmarks/wan_vs_diffusers.py                      # CPU, a small config (the BENCHMARKS.md rows)
    python benchmarks/wan_vs_diffusers.py --preset 1.3B --frames 21 --height 60 --width 104   # on a GPU

diffusers is a test-only dependency (requirements-test.txt); this script is not part of the runtime."""
import argparse
import os
import sys
import time

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
import train_wan as W  # noqa: E402


def one_step(model, call, x):
    if x.is_cuda:
        torch.cuda.synchronize()
    t0 = time.perf_counter()
    call(model).float().square().mean().backward()
    if x.is_cuda:
        torch.cuda.synchronize()
    model.zero_grad(set_to_none=True)
    return time.perf_counter() - t0


def interleaved(models, steps):
    """Median step time of each (model, call), the models taking turns step by step, so that a slow phase of the
    machine (another process, the clock) hits them all alike. Two warm-up rounds (compile, allocator) first."""
    times = {k: [] for k in models}
    for i in range(steps + 2):
        for k, (m, call, x) in models.items():
            dt = one_step(m, call, x)
            if i >= 2:
                times[k].append(dt)
    return {k: sorted(v)[len(v) // 2] for k, v in times.items()}


def race(ref, ours, call_ref, call_ours, x, blocks, steps, compile=True):
    """Time diffusers' model, ours and (compile) ours with each of its `blocks(model)` compiled in place as the
    scripts' --compile does, interleaved; print ms/step and the ratio to diffusers."""
    import copy
    models = {"diffusers": (ref, call_ref, x), "ours": (ours, call_ours, x)}
    if compile:
        compiled = copy.deepcopy(ours)
        for blk in blocks(compiled):
            blk.compile()
        models["ours + compile"] = (compiled, call_ours, x)
    res = interleaved(models, steps)
    for k, v in res.items():
        print(f"{k:16s} {v * 1000:8.1f} ms/step   {res['diffusers'] / v:5.2f}x diffusers")
    return res


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--preset", default="")
    p.add_argument("--dim", type=int, default=512)
    p.add_argument("--layers", type=int, default=4)
    p.add_argument("--frames", type=int, default=3)  # latent frames
    p.add_argument("--height", type=int, default=16)  # latent height
    p.add_argument("--width", type=int, default=16)
    p.add_argument("--steps", type=int, default=10)
    a = p.parse_args()
    from diffusers import WanTransformer3DModel
    from diffusers.loaders.single_file_utils import convert_wan_transformer_to_diffusers
    torch.manual_seed(0)
    cfg = W.DIT_PRESETS[a.preset] if a.preset else W.WanConfig(dim=a.dim, ffn_dim=a.dim * 4, num_heads=a.dim // 128,
                                                              num_layers=a.layers)
    dev = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    dtype = torch.bfloat16 if dev.type == "cuda" else torch.float32
    ours = W.WanModel(cfg)
    ours.init_weights()
    ref = WanTransformer3DModel(patch_size=cfg.patch_size, num_attention_heads=cfg.num_heads,
                                attention_head_dim=cfg.dim // cfg.num_heads, in_channels=cfg.in_dim,
                                out_channels=cfg.out_dim, text_dim=cfg.text_dim, freq_dim=cfg.freq_dim,
                                ffn_dim=cfg.ffn_dim, num_layers=cfg.num_layers)
    ref.load_state_dict(convert_wan_transformer_to_diffusers(dict(ours.state_dict())), strict=True)
    ours, ref = ours.to(dev, dtype).train(), ref.to(dev, dtype).train()
    x = torch.randn(1, cfg.in_dim, a.frames, a.height, a.width, device=dev, dtype=dtype)
    t = torch.tensor([500.0], device=dev)
    ctx = torch.randn(1, cfg.text_len, cfg.text_dim, device=dev, dtype=dtype)
    L = a.frames * a.height // 2 * a.width // 2
    print(f"device {dev} ({torch.cuda.get_device_name() if dev.type == 'cuda' else os.cpu_count()} "
          f"{'GPU' if dev.type == 'cuda' else 'CPU threads: ' + str(torch.get_num_threads())}), {dtype}, "
          f"dim {cfg.dim} x {cfg.num_layers} layers, {L} video tokens + {cfg.text_len} text tokens")
    race(ref, ours, lambda m: m(x, t, ctx, return_dict=False)[0], lambda m: m(x, t, ctx), x, lambda m: m.blocks,
         a.steps)

if __name__ == "__main__":
    main()
