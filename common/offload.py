"""The frozen tensors of a stack of blocks kept in CPU memory (pinned when CUDA is there) and copied to the device
just ahead of use, one block at a time: the device holds the blocks in flight, not the whole frozen base.
Model-agnostic: any list of modules called in order (a ModuleList, or several chained, e.g. HunyuanVideo's
[*double_blocks, *single_blocks]).

    offload_blocks([*model.double_blocks, *model.single_blocks], device, prefetch=1)   # after loading, before FSDP2

What moves: in each block, every parameter that does not require grad and every buffer (a LoRA run's base weights,
biases and norms, float8 weights and scales from common/float8.py). What stays: the trainable parameters (LoRA
adapters), resident on the device and trained as before. The moved tensors are unregistered from their modules and
kept as plain attributes under the same names (`linear.weight` still reads as a tensor): FSDP2 (which shards
parameters and moves registered tensors to the device), `.to()`, `to_empty()`, state_dict() and the DCP
checkpoints no longer see them. So it is for one-process LoRA runs; the caller refuses world > 1 and a full
fine-tune (there is nothing frozen to move there; FSDP2 shards instead).

How: a forward pre-hook on block i installs its device copy (copied now, or already prefetched) and starts
copying the next `prefetch` blocks on a side CUDA stream, so the copy overlaps block i's compute; the forward hook
puts the CPU tensors back, dropping the device copy (record_stream keeps its memory from reuse until the kernels
that read it are done). The direction follows the calls: in the backward of activation checkpointing (--ac) the
recompute calls blocks N-1 ... 0, the same hooks run, and the prefetch goes down. On CPU the same steps run with
plain synchronous copies (`device` cpu: a real copy, so the tests exercise the swap), giving bitwise the plain
module's outputs and gradients.

Host memory: torch's caching host allocator rounds every pinned tensor up to a power of two (HunyuanVideo 13B:
23.2 GiB of bf16 base -> 31.3 GiB pinned). Not fixed here: one pinned buffer per block rounds worse; registering
plain memory with cudaHostRegister would be exact but is untested without a GPU.

Without activation checkpointing it is still exact, but autograd keeps each block's device copy for its backward
(F.linear saves its weight), so the device ends up holding the whole base after all: use it with --ac.
"""
import torch


class BlockOffload:
    def __init__(self, blocks, device, prefetch=1):
        self.blocks, self.device, self.prefetch = list(blocks), torch.device(device), prefetch
        self.cuda = self.device.type == "cuda"
        self.stream = torch.cuda.Stream(self.device) if self.cuda else None
        self.host = []  # per block: [(module, name, CPU tensor)]
        self.ready = {}  # block index -> (device tensors, CUDA event or None): copied or in flight
        self.last = None  # the block called last: the direction of the next prefetch
        self.bytes = 0
        seen, alive = {}, []  # id(tensor) -> its CPU copy: a tensor shared by two modules stays one tensor
        for b in self.blocks:
            entries = []
            for mod in b.modules():
                frozen = [(n, t) for n, t in mod._parameters.items() if t is not None and not t.requires_grad]
                frozen += [(n, t) for n, t in mod._buffers.items() if t is not None]
                for name, t in frozen:
                    alive.append(t)  # until the loop ends: no id is reused while `seen` is keyed by ids
                    if id(t) not in seen:
                        host = t.detach().to("cpu", copy=True)  # own storage, never the caller's
                        seen[id(t)] = host.pin_memory() if torch.cuda.is_available() else host
                        self.bytes += host.numel() * host.element_size()
                    mod._parameters.pop(name, None)
                    mod._buffers.pop(name, None)
                    mod._non_persistent_buffers_set.discard(name)
                    setattr(mod, name, seen[id(t)])  # a plain attribute now: not a parameter, not a buffer
                    entries.append((mod, name, seen[id(t)]))
            self.host.append(entries)
        for i, b in enumerate(self.blocks):
            b.register_forward_pre_hook(lambda m, args, i=i: self._before(i))
            b.register_forward_hook(lambda m, args, out, i=i: self._after(i))

    def _copy(self, i):
        """Start copying block i to the device (side stream on CUDA); no-op if it is there or on its way."""
        if i in self.ready or not 0 <= i < len(self.blocks):
            return
        copies = {}  # id(CPU tensor) -> device tensor, shared tensors copied once
        if self.cuda:
            with torch.cuda.stream(self.stream):
                for _, _, h in self.host[i]:
                    if id(h) not in copies:
                        copies[id(h)] = h.to(self.device, non_blocking=True)  # pinned: a true async H2D copy
                event = torch.cuda.Event()
                event.record(self.stream)
        else:
            for _, _, h in self.host[i]:
                if id(h) not in copies:
                    copies[id(h)] = h.clone()
            event = None
        self.ready[i] = ([copies[id(h)] for _, _, h in self.host[i]], event)

    def _before(self, i):
        # direction: up in a forward; down in the recompute of a checkpointed backward (N-1, N-2, ...). The last
        # block turns it: with grad on, a backward follows, so N-2 is fetched; without grad the next call is 0
        n = len(self.blocks)
        if i == 0 or self.last is None:
            step = 1
        elif i == n - 1:
            step = -1 if torch.is_grad_enabled() else 0
        else:
            step = 1 if i > self.last else -1
        self.last = i
        self._copy(i)
        tensors, event = self.ready.pop(i)
        if event is not None:
            compute = torch.cuda.current_stream(self.device)
            compute.wait_event(event)  # the compute of block i starts once its weights are in
            for t in tensors:
                t.record_stream(compute)  # allocated on the side stream, read on this one
        for (mod, name, _), t in zip(self.host[i], tensors):
            setattr(mod, name, t)
        for k in range(1, self.prefetch + 1) if step else ():
            self._copy(i + k * step)  # overlaps block i's compute

    def _after(self, i):
        for mod, name, h in self.host[i]:
            setattr(mod, name, h)  # the device copy goes (autograd keeps what it saved, see the top of the file)


def offload_blocks(blocks, device, prefetch=1):
    """Move the frozen tensors of `blocks` (modules called in this order) to CPU memory and stream them to
    `device` ahead of use (see the top of the file). -> the BlockOffload (its .bytes: the bytes moved off the
    device). Keep no other reference to the moved tensors: the blocks' attributes are the only ones."""
    return BlockOffload(blocks, device, prefetch)
