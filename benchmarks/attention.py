"""The two-stream DiTs' joint attention (HunyuanVideo, Mochi) with a text key-padding mask, timed (forward +
backward) the ways it can be computed, at their real shapes: the measurement issues 9 and 10 ask for (compiled
flex_attention vs masked SDPA), for a lent GPU. On a CPU, `--tiny` checks that every way gives the same numbers (flex: its forward only, as it has no CPU backward).

    python benchmarks/attention.py            # on a GPU: one JSON line per shape (ms per call, fwd + bwd)
    python benchmarks/attention.py --tiny     # anywhere: tiny shapes, the agreement check only

Two prompts of different lengths in one batch (micro_batch 2), video tokens first, text right-padded:
- sdpa_masked: one SDPA call over [video; text cut to the longer prompt] with a (B, 1, 1, N+L) key mask, what the
  scripts do when the lengths differ (a mask keeps SDPA off its flash kernel);
- per_sample: one unmasked SDPA call per sample over its own real tokens (upstream's varlen packing, by a loop);
- flex: torch.compile'd flex_attention with a block mask from the same key-padding rule;
- batch1: one sample alone, unmasked (what the scripts run at micro_batch 1: the text is cut to the prompt), for
  scale.
The outputs are compared on the rows that reach the model's output (every video token, each sample's real text).
"""
import argparse
import json
import time

import torch
import torch.nn.functional as F

# name: (video tokens N, heads, head_dim, real text tokens of the two prompts); the text is at most 256 in both
SHAPES = {
    "mochi-480x848x37": (7 * 30 * 53, 24, 128, (120, 60)),
    "hunyuan-544x960x33": (9 * 34 * 60, 24, 128, (90, 40)),
    "hunyuan-544x960x129": (33 * 34 * 60, 24, 128, (90, 40)),
}
TINY = {"tiny": (70, 2, 16, (9, 4))}


def ways(N, lens, compile_flex):
    from torch.nn.attention.flex_attention import create_block_mask, flex_attention
    L = max(lens)
    lens_t = block = None
    flex = torch.compile(flex_attention, dynamic=False) if compile_flex else flex_attention

    def sdpa_masked(q, k, v):  # (B, H, N+L, D)
        keep = torch.arange(N + L, device=q.device)[None] < (N + lens_t)[:, None]  # (B, N+L)
        return F.scaled_dot_product_attention(q, k, v, attn_mask=keep[:, None, None])

    def per_sample(q, k, v):
        out = torch.zeros_like(q)
        for b, n in enumerate(lens):
            out[b:b + 1, :, :N + n] = F.scaled_dot_product_attention(*(t[b:b + 1, :, :N + n] for t in (q, k, v)))
        return out

    def key_padding(b, h, q_idx, kv_idx):
        return kv_idx < N + lens_t[b]

    def flex_masked(q, k, v):  # the block mask is built once (bind), as a model would once a step for all blocks
        return flex(q, k, v, block_mask=block)

    def batch1(q, k, v):
        return F.scaled_dot_product_attention(*(t[:1, :, :N + lens[0]] for t in (q, k, v)))

    def bind(device):
        nonlocal lens_t, block
        lens_t = torch.tensor(lens, device=device)
        block = create_block_mask(key_padding, B=len(lens), H=None, Q_LEN=N + L, KV_LEN=N + L, device=device)
    return {"sdpa_masked": sdpa_masked, "per_sample": per_sample, "flex": flex_masked, "batch1": batch1}, bind


def run(name, N, H, D, lens, device, dtype, iters, compile_flex):
    g = torch.Generator(device).manual_seed(0)
    B, L = len(lens), max(lens)
    q, k, v = (torch.randn(B, H, N + L, D, device=device, dtype=dtype, generator=g) for _ in range(3))
    rows = torch.arange(N + L, device=device)[None] < N + torch.tensor(lens, device=device)[:, None]  # (B, N+L)
    # the padded text rows never reach the model's output: their gradient is zero, as in training
    dout = torch.randn(B, H, N + L, D, device=device, dtype=dtype, generator=g) * rows[:, None, :, None]
    fns, bind = ways(N, lens, compile_flex)
    bind(device)
    res, ref = {"shape": name, "tokens": N, "text": list(lens), "dtype": str(dtype).split(".")[-1]}, None
    for way, fn in fns.items():
        grad = not (way == "flex" and device.type == "cpu")  # flex_attention has no backward on CPU: output only
        leaves = [t.detach().clone().requires_grad_(grad) for t in (q, k, v)]
        out = fn(*leaves)
        if grad:
            out.backward(dout[:out.shape[0], :, :out.shape[2]])
        got = (out.detach(), *(t.grad for t in leaves if grad))
        if way == "sdpa_masked":
            ref = got
        else:  # the output on the rows that matter; the q/k/v gradients only where they reach them
            n, S = out.shape[0], out.shape[2]
            keep = rows[:n, None, :S, None]
            diff = max(((a[:n, :, :S] - b[:n, :, :S]) * keep).abs().max().item() for a, b in zip(got, ref))
            res[f"{way}_maxdiff"] = float(f"{diff:.3g}")
        if device.type == "cuda":
            times = []
            for _ in range(iters):
                for t in leaves:
                    t.grad = None
                start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
                start.record()
                fn(*leaves).backward(dout[:out.shape[0], :, :out.shape[2]])
                end.record()
                torch.cuda.synchronize()
                times.append(start.elapsed_time(end))
            res[f"{way}_ms"] = round(sorted(times)[len(times) // 2], 2)
    return res


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--tiny", action="store_true", help="tiny shapes: the agreement check only (any device)")
    p.add_argument("--iters", type=int, default=5)
    p.add_argument("--compile_flex", type=int, default=None, help="default: 1 on CUDA, 0 on CPU")
    p.add_argument("--out", default="", help="also write the results here, as one JSON list")
    a = p.parse_args(argv)
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    compile_flex = (device.type == "cuda") if a.compile_flex is None else bool(a.compile_flex)
    out = []
    t0 = time.time()
    for name, (N, H, D, lens) in (TINY if a.tiny else SHAPES).items():
        res = run(name, N, H, D, lens, device, dtype, a.iters, compile_flex)
        res["wall_s"] = round(time.time() - t0, 1)
        print(json.dumps(res), flush=True)
        out.append(res)
    if a.out:
        with open(a.out, "w") as f:
            json.dump(out, f, indent=1)
    return out


if __name__ == "__main__":
    main()
