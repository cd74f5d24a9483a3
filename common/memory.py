"""--base_dtype float8 and --offload 1: the one-process LoRA memory options of every script, their rules and their
build step, written once. The mechanisms are common/float8.py (the frozen block Linears stored in e4m3 with row
scales, upcast per use) and common/offload.py (the blocks' frozen tensors in CPU memory, streamed a block ahead).

    memory.check_flags(args)                  # in check_args: where the flags do not apply, one UserError line
    memory.check_world(args, world)           # in main, after the process group: one process only
    memory.prepare(model, [blocks], sd, device, compute_dtype, args)   # in build_dit, before parallelize
"""
import torch

from common import dist as cdist
from common.args import UserError
from common.float8 import quantize_frozen_linears
from common.offload import offload_blocks


def wanted(args):
    return args.base_dtype == "float8" or args.offload


def check_flags(args):
    if not wanted(args):
        return
    what = "--base_dtype float8" if args.base_dtype == "float8" else "--offload 1"
    rules = [
        (args.mode in ("train", "bench"), f"{what} is for LoRA training (--mode train or bench); --mode {args.mode} "
         "runs without it"),
        (args.lora_rank > 0, f"{what} converts the frozen base of a LoRA run: add --lora_rank (a full fine-tune has "
         "no frozen base; across GPUs FSDP2 shards it instead)"),
        (args.ac, f"{what} needs --ac 1: without activation checkpointing autograd keeps every block's "
         "upcast/streamed weights for the backward, and the memory it saves is spent again"),
        (args.ac_interval == 1, f"{what} needs every block checkpointed (--ac_interval 1, not "
         f"{args.ac_interval}): a block that keeps its activations keeps its upcast/streamed weights too"),
        (not (args.offload and args.compile), "--offload 1 does not combine with --compile 1 (its hooks copy blocks "
         "between CUDA streams, outside any compiled graph)"),
    ]
    for ok, msg in rules:
        if not ok:
            raise UserError(msg)


def check_world(args, world):
    if wanted(args) and world > 1:
        raise UserError("--base_dtype float8 and --offload 1 are for one-process LoRA runs (they keep the frozen base "
                        f"whole, unsharded); with {world} processes FSDP2 shards the bf16 base {world} ways instead")


def prepare(model, blocks, sd, device, compute_dtype, args):
    """The weights into the meta-built `model` on the CPU (by assignment: no copy where the dtypes agree; sd ==
    "random": N(0, 0.02) from args.seed, for --mode bench without weights), then the frozen base of `blocks` (a list
    of ModuleLists, in the order the model calls them) converted there, to float8 buffers and/or out of the model
    into CPU memory. The caller then wraps what is still registered with FSDP2 (parallelize), which moves it to the
    device: the device never holds the whole base in bf16. `sd` is emptied once loaded: its references would keep
    the bf16 base alive in host RAM beside the float8 and pinned copies."""
    if sd == "random":
        model.to_empty(device="cpu")
        # drawn on the device a tensor at a time, then copied in: a seeded normal_ runs on one CPU thread, ~9 ns an
        # element, which is two minutes for a 13B base before the bench's first step
        g = torch.Generator(device).manual_seed(args.seed)
        with torch.no_grad():
            for p in model.parameters():
                p.copy_(torch.empty(p.shape, dtype=p.dtype, device=device).normal_(0, 0.02, generator=g))
    else:
        ref = model.state_dict()  # the meta model's dtypes: the same values as the broadcast path copies in
        model.load_state_dict({k: v.to(ref[k].dtype) for k, v in sd.items()}, assign=True)
        sd.clear()
    if args.base_dtype == "float8":
        done = [quantize_frozen_linears(b, compute_dtype) for b in blocks]
        n, before, after = (sum(d[i] for d in done) for i in range(3))  # weights, bytes before, bytes after
        cdist.print0(f"float8 base: {n} frozen Linear weights of the blocks, {before / 2**30:.3g} GiB -> "
                     f"{after / 2**30:.3g} GiB")
    if args.offload:
        off = offload_blocks([blk for b in blocks for blk in b], device, prefetch=1)
        model.offload = off  # a plain attribute (not a module): keeps the streamer with the model
        cdist.print0(f"offload: {off.bytes / 2**30:.3g} GiB of the blocks' frozen base in "
                     f"{off.host_bytes / 2**30:.3g} GiB of {'pinned ' if torch.cuda.is_available() else ''}CPU memory, "
                     "streamed a block ahead")
    return model
