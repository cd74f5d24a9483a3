"""--preflight 1 (the default): before the first training step, one forward + backward of the largest micro-batch
the data holds, so that a bucket too large for the device fails in the first minute, with the flags that help,
rather than hours in when the loader first reaches it (users report exactly that: OOMs after thousands of steps).
On CUDA it prints the peak memory against the device's size. Model-agnostic: the script passes the forward +
backward of one micro-batch, as its training loop computes it.

    def loss(b, x0, sigma, eps):  # the script's loss of one cached micro-batch, as its loop computes it
        return flow_loss(model, x0, <text of b>, sigma, eps, ...)
    preflight.check(train, micro, lambda idx: load_batch(...), loss, model, device, args.sp, print0)

Nothing a training step reads is changed: no optimizer step, the gradients dropped afterwards (reduce-scattered
first: the caller runs it with gradient sync on, so nothing stays accumulated inside FSDP2), and no draw from any
generator the training uses (the caller's sigma is fixed and its noise comes from a generator of its own). So a
run with it is bitwise the run without it, which the scripts' tests check.
"""
import time

import torch

from common.args import UserError

HELP = ("--ac 1 (or --ac 2: the block inputs in CPU memory; --ac_interval 1: every block), a smaller --micro_batch, "
        "--sp N across GPUs, for a LoRA on one GPU --base_dtype float8 and --offload 1, or smaller --frames / "
        "--height x --width (the buckets)")


def largest(entries, micro, key=lambda e: tuple(e["bucket"])):
    """entries: cached samples, each with "bucket" [H, W, F] -> (`micro` indices into entries, all of the bucket
    with the most pixels x frames (wrapped if it holds fewer), that bucket). key: what the samples of one batch
    share, (H, W, F, ...) (data/loader.py batch_key); the largest by its first three, then the rest."""
    best = max({key(e) for e in entries}, key=lambda b: (b[0] * b[1] * b[2], b))
    idx = [i for i, e in enumerate(entries) if key(e) == best]
    return (idx * micro)[:micro], best


def check(entries, micro, load, loss, model, device, sp=1, log=print, key=lambda e: tuple(e["bucket"])):
    """The preflight: load(idx) the micro-batch `largest` picks, then loss(batch, x0, sigma, eps) with its latents
    x0 on the device, sigma 0.5 and noise from a generator of its own; backward (x sp, as the loop: common/sp.py),
    with gradient sync on, through `model` (the module trained: set_requires_gradient_sync). -> peak GiB or None."""
    idx, (h, w, f, *_) = largest(entries, micro, key)
    b = load(idx)

    def fwd_bwd():
        x0 = b["latents"].to(device).float()
        eps = torch.randn(x0.shape, generator=torch.Generator(device).manual_seed(0), device=device)
        model.set_requires_gradient_sync(True)  # reduce now: nothing stays accumulated inside FSDP2
        (loss(b, x0, torch.full((len(x0),), 0.5, device=device), eps) * sp).backward()
    return run(fwd_bwd, model, device, f"{len(idx)} x {f} frames at {h}x{w} (the largest bucket)", log)


def run(fwd_bwd, model, device, what, log=print):
    """Run fwd_bwd() (one forward + backward), drop the gradients, print the peak device memory. An out-of-memory
    error becomes a UserError naming `what` (the micro-batch's shape) and the flags that help. -> peak GiB (CUDA)
    or None."""
    cuda = device.type == "cuda"
    if cuda:
        torch.cuda.synchronize(device)
        torch.cuda.reset_peak_memory_stats(device)
    t0 = time.perf_counter()
    try:
        fwd_bwd()
        if cuda:
            torch.cuda.synchronize(device)
    except torch.OutOfMemoryError:
        model.zero_grad(set_to_none=True)
        total = torch.cuda.get_device_properties(device).total_memory / 2**30 if cuda else 0
        raise UserError(f"preflight: one forward + backward of {what} ran out of device memory ({total:.1f} GiB): "
                        f"try {HELP}; --preflight 0 skips this check", this_rank=True) from None
    model.zero_grad(set_to_none=True)
    dt = time.perf_counter() - t0
    if not cuda:
        log(f"preflight: one forward + backward of {what}: {dt:.1f} s (device memory is measured on CUDA only)")
        return None
    peak = torch.cuda.max_memory_allocated(device) / 2**30
    total = torch.cuda.get_device_properties(device).total_memory / 2**30
    log(f"preflight: one forward + backward of {what}: {dt:.1f} s, peak {peak:.1f} GiB of the device's "
        f"{total:.1f} GiB (the optimizer's state comes on top at the first step: 8 bytes per trainable parameter "
        f"for AdamW, sharded across ranks)")
    return peak
