"""The frozen base of a LoRA run stored in float8 (e4m3) and upcast where it is used: half the memory of a bf16
base, a quarter of an fp32 one. Model-agnostic: it converts every nn.Linear (or subclass, e.g. a LoRA layer that
keeps its base in `.weight`) whose weight is frozen; trainable weights, biases, norms and anything that is not a
Linear are left as they are.

    n, before, after = quantize_frozen_linears(model.blocks, torch.bfloat16)   # after LoRA, before FSDP2

How: each such weight W (out, in) becomes W8 (out, in) float8_e4m3fn and a per-output-row scale s (out, 1), with
W ~ W8 * s. It is a torch.nn.utils.parametrize parametrization, so `linear.weight` still reads as a
(out, in) tensor in the compute dtype (model code that does F.linear(x, self.weight) or reads
`self.weight.dtype` runs unchanged); each read upcasts that one weight, and the upcast copy is freed once the
matmul that used it is done. Peak memory holds the float8 base plus the upcast weight(s) in flight, never an upcast
copy of the whole base. A read only for the dtype is a whole upcast too, so the scripts read a block's compute dtype
off a bias (a parameter, in the compute dtype under FSDP2 as the weight is): each float8 weight is upcast once per
forward (and once more in a checkpointed block's recompute), which the memory tests count.

Choices, and why:
- Per-row scales, not per-tensor: the rows of a fused projection (q | k | v, or HunyuanVideo's linear1 = qkv | mlp)
  differ in magnitude; one scale per tensor lets the largest row set it and pushes the small rows toward e4m3's
  subnormals (below 2^-6 x scale), where the relative precision falls. One scale per row gives every row e4m3's
  full normal range. Cost: `out` fp32 numbers per weight.
- Power-of-two scales (s = 2^ceil(log2(row max / 448))): W8 * s is then exact in bf16 and fp32, so the upcast adds
  no rounding of its own; the only error is e4m3's (a relative step of 2^-3, so at most 2^-4 per element on normal
  values). A row's max lands in [224, 448] instead of at 448: no loss, e4m3's relative precision is the same at
  every normal exponent.
- The float8 tensors are non-persistent buffers, not parameters: FSDP2 shards and casts parameters only, so they
  are outside its mixed-precision policy (it would otherwise upcast them, unscaled, for its all-gather) and are
  never gathered; state_dict() and the DCP checkpoints (trainable weights only) do not carry them, as they do not
  carry a frozen base today: the base comes from the released weights again on resume. `fully_shard` and `.to()`
  move them to the device like any buffer. They are not sharded, so this is for a one-process run (the caller
  enforces it: across N GPUs FSDP2 already shards the bf16 base N ways).
- No float8 matmul: there is none on CPU, and the upcast-then-matmul path is the same on every device.
- Autograd keeps the tensors the backward needs; F.linear's backward needs the weight, so WITHOUT activation
  checkpointing every upcast weight stays alive until the backward and the memory saved is spent again. With
  checkpointing per block the forward keeps nothing and the recompute upcasts one block's weights at a time. The
  numbers are right either way; the memory win needs checkpointing.
"""
import torch
import torch.nn as nn
from torch.nn.utils import parametrize

E4M3 = torch.float8_e4m3fn
E4M3_MAX = torch.finfo(E4M3).max  # 448


def quantize(w):
    """(out, in) -> (W8 (out, in) e4m3, s (out, 1) fp32 powers of two) with W ~ W8 * s, every |W / s| <= 448."""
    w = w.detach().float()
    amax = w.abs().amax(dim=1, keepdim=True)
    scale = torch.where(amax > 0, torch.exp2(torch.ceil(torch.log2(amax / E4M3_MAX))), torch.ones_like(amax))
    return (w / scale).to(E4M3), scale  # / a power of two is exact; .to rounds to nearest (even)


class Upcast(nn.Module):
    """The parametrization: W8 (out, in) e4m3 -> W8 * s in `dtype`, exact (s is a power of two)."""

    def __init__(self, scale, dtype):
        super().__init__()
        self.register_buffer("scale", scale, persistent=False)  # (out, 1) fp32
        self.dtype = dtype

    def forward(self, w8):
        return w8.to(self.dtype) * self.scale.to(self.dtype)


def is_float8(linear):
    return parametrize.is_parametrized(linear, "weight") and isinstance(linear.parametrizations.weight[0], Upcast)


def quantize_frozen_linears(module, compute_dtype):
    """Store the frozen weight of every nn.Linear under `module` in float8 (see the top of the file); the
    forward upcasts it to `compute_dtype`. Call it on real weights (after loading, before FSDP2 and the optimizer).
    -> (number of weights converted, their bytes before, their bytes after, scales included)."""
    n = before = after = 0
    for m in list(module.modules()):
        if not isinstance(m, nn.Linear) or parametrize.is_parametrized(m, "weight") or m.weight.requires_grad:
            continue
        w = m.weight
        w8, scale = quantize(w)
        before += w.numel() * w.element_size()
        after += w8.numel() * w8.element_size() + scale.numel() * scale.element_size()
        del m.weight  # the Parameter goes; a buffer takes its name, then the parametrization takes the buffer
        m.register_buffer("weight", w8, persistent=False)
        parametrize.register_parametrization(m, "weight", Upcast(scale, compute_dtype), unsafe=True)  # dtype changes
        plist = m.parametrizations.weight
        plist.register_buffer("original", plist.original, persistent=False)  # registered persistent: make it not
        n += 1
    return n, before, after


def float8_bytes(module):
    """Bytes of the float8 weights and their scales under `module` (what quantize_frozen_linears made)."""
    total = 0
    for m in module.modules():
        if isinstance(m, nn.Linear) and is_float8(m):
            p = m.parametrizations.weight
            total += p.original.numel() * p.original.element_size() + p[0].scale.numel() * 4
    return total
