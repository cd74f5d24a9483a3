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

Host memory: torch's caching host allocator rounds every pinned allocation up to a power of two (pinning tensor
by tensor, HunyuanVideo 13B's 23.2 GiB of bf16 base took 31.3 GiB). So the CPU copies are views into a few pinned
chunks whose sizes are powers of two (`pack`: first-fit decreasing into chunks of 256 MiB to 2 GiB), which the
allocator takes as they are: at most 2% over the tensors' bytes for the released models (computed, `pack`). And the
chunks are filled one at a time, each tensor's original dropped as soon as it is copied: host memory peaks at the
base plus one chunk, not at twice the base.

Without activation checkpointing it is still exact, but autograd keeps each block's device copy for its backward
(F.linear saves its weight), so the device ends up holding the whole base after all: use it with --ac.
"""
import weakref

import torch


class BlockOffload:
    def __init__(self, blocks, device, prefetch=1):
        self.blocks, self.device, self.prefetch = list(blocks), torch.device(device), prefetch
        self.cuda = self.device.type == "cuda"
        self.stream = torch.cuda.Stream(self.device) if self.cuda else None
        self.ready = {}  # block index -> (device tensors, CUDA event or None): copied or in flight
        self.last = None  # the block called last: the direction of the next prefetch
        self.installed = set()  # blocks whose device copy is installed in their modules
        uniq, index, users, entries = [], {}, [], []  # the distinct tensors, id -> index, who holds each
        for b in self.blocks:
            entries.append([])
            for mod in b.modules():
                frozen = [(n, t) for n, t in mod._parameters.items() if t is not None and not t.requires_grad]
                frozen += [(n, t) for n, t in mod._buffers.items() if t is not None]
                for name, t in frozen:  # uniq holds every tensor from its first sight on: no id is reused
                    if id(t) not in index:  # a tensor shared by two modules stays one tensor
                        index[id(t)] = len(uniq)
                        uniq.append(t)
                        users.append([])
                    users[index[id(t)]].append((mod, name))
                    entries[-1].append((mod, name, index[id(t)]))
        sizes = [t.numel() * t.element_size() for t in uniq]
        self.bytes = sum(sizes)  # moved off the device
        self.host_bytes = 0  # CPU memory taken by the chunks
        host = [None] * len(uniq)
        pinned = torch.cuda.is_available()
        with torch.no_grad():
            for size, members in pack(sizes):
                chunk = torch.empty(size, dtype=torch.uint8, pin_memory=pinned)
                self.host_bytes += size
                for i, off in members:
                    t = uniq[i]
                    h = chunk[off:off + sizes[i]].view(t.dtype).view(t.shape)  # own storage, never the caller's
                    h.copy_(t)
                    host[i] = h
                    for mod, name in users[i]:
                        mod._parameters.pop(name, None)
                        mod._buffers.pop(name, None)
                        mod._non_persistent_buffers_set.discard(name)
                        setattr(mod, name, h)  # a plain attribute now: not a parameter, not a buffer
                    uniq[i] = t = None  # the original goes now, unless the caller still holds it
        self.host = [[(mod, name, host[i]) for mod, name, i in e] for e in entries]  # per block: [(module, name, CPU)]
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
        for j in self.installed - {i}:  # a block whose forward hook did not run (see _after) gives its copy back now
            self._after(j)
        self._copy(i)
        tensors, event = self.ready.pop(i)
        if event is not None:
            compute = torch.cuda.current_stream(self.device)
            compute.wait_event(event)  # the compute of block i starts once its weights are in
            for t in tensors:
                t.record_stream(compute)  # allocated on the side stream, read on this one
        for (mod, name, _), t in zip(self.host[i], tensors):
            setattr(mod, name, t)
        self.installed.add(i)
        for k in range(1, self.prefetch + 1) if step else ():
            self._copy(i + k * step)  # overlaps block i's compute

    def _after(self, i):
        # The forward hook; but the recompute of a (non-reentrant) checkpoint stops inside the block's forward once
        # it has what the backward needs, and this hook does not run: _before of the next block calls it then (the
        # last one, block 0, keeps its copy to the next forward). Without that every block would keep its device
        # copy to the end of the backward: the whole base on the device.
        for mod, name, h in self.host[i]:
            setattr(mod, name, h)  # the device copy goes (autograd keeps what it saved, see the top of the file)
        self.installed.discard(i)



CHUNKS = [2**k for k in range(28, 32)]  # the chunk sizes tried, 256 MiB ... 2 GiB (powers of two, as the allocator's)
ALIGN = 512  # every tensor starts at a multiple of this in its chunk (any dtype can view it; DMA-friendly)


def _pow2(n):
    return 1 << max(n - 1, 0).bit_length()


def pack(sizes):
    """Byte sizes -> [(chunk bytes, [(item index, byte offset)])]: every item in one chunk, none overlapping, each
    chunk a power of two: the packing of _pack at the chunk size of CHUNKS that takes the least memory (a model's
    few large tensor sizes leave different remainders at different chunk sizes; the largest is also what the host
    holds twice while the chunks fill). Over the tensors' bytes, computed for the full-size blocks: Wan 14B 0.51
    GiB in bf16 (0.15 in float8), HunyuanVideo 13B 0.17 (0.04), Mochi 10B 0.07 (< 0.01), LTX 13B 0; pinned
    tensor by tensor it was 13.8 GiB for Wan 14B (26.2 -> 40.0 GiB)."""
    return min((_pack(sizes, cap) for cap in CHUNKS), key=lambda chunks: sum(size for size, _ in chunks))


def _pack(sizes, cap):
    """First-fit decreasing into chunks of `cap` (an item larger than that gets a chunk of its own, rounded up);
    each chunk then shrinks to the power of two over what it holds, and the last chunk, usually part-filled, is
    packed again at cap / 2, cap / 4, ... (to 1 MiB) while that takes less."""
    order = sorted(range(len(sizes)), key=lambda i: -sizes[i])
    chunks = []  # [capacity, used, [(index, offset)]]
    for i in order:
        need = -(-sizes[i] // ALIGN) * ALIGN
        c = next((c for c in chunks if c[0] - c[1] >= need), None)
        if c is None:
            c = [max(cap, _pow2(need)), 0, []]
            chunks.append(c)
        c[2].append((i, c[1]))
        c[1] += need
    out = [(_pow2(max(used, 1)), members) for _, used, members in chunks]
    if out and cap > 2**20:  # down to 1 MiB: below that a few more chunks are not worth their allocations
        size, members = out[-1]
        again = _pack([sizes[i] for i, _ in members], cap // 2)
        if sum(s for s, _ in again) < size:
            out[-1:] = [(s, [(members[j][0], off) for j, off in m]) for s, m in again]
    return out


def offload_blocks(blocks, device, prefetch=1):
    """Move the frozen tensors of `blocks` (modules called in this order) to CPU memory and stream them to
    `device` ahead of use (see the top of the file). -> the BlockOffload (its .bytes: the bytes moved off the
    device; .host_bytes: the CPU memory its chunks take). Keep no other reference to the moved tensors: each is
    freed once copied, which keeps the host's peak near the base's size."""
    return BlockOffload(blocks, device, prefetch)


class HostStack:
    """Pinned host memory for tensors parked from a forward to its backward (--ac 2, common/fsdp.py
    park_hidden_states): views carved in order from a few power-of-two chunks, instead of one allocation per
    tensor, which the caching host allocator would round up to a power of two (HunyuanVideo at 544x960x129 parks
    60 hidden states of 0.78 GiB: 60 GiB as 1-GiB blocks, 48 GiB here). Each chunk is the power of two over 8
    parked tensors (256 MiB to 8 GiB), so at most the last chunk is part-filled.

    A region is reused once the view carved for it is gone: the checkpoint keeps the view until the backward has
    recomputed from it (or until its graph is freed), and a weakref finalizer marks it free; the space on top of
    the stack returns when everything above it is free too, so two forwards before one backward get two sets of
    regions, never a shared one. The copies are non-blocking on the current CUDA stream: the copy back in the
    recompute is enqueued before the view can go, so a later copy into the same region runs after it (both on the
    default stream: autograd runs a backward op on the stream of its forward; a block run on a side stream would
    need an event here). Nothing reads these views on the host.

    Tensors on the CPU are returned as they are (x.detach(): no copy on a CPU run), unless `copy_cpu` (the tests:
    a real copy, into unpinned chunks of `chunk` bytes)."""

    def __init__(self, chunk=None, copy_cpu=False):
        self.chunk, self.copy_cpu = chunk, copy_cpu
        self.chunks = []  # uint8 host tensors
        self.live = []  # [chunk index, start, end, alive] in the order carved: a stack

    def park(self, x):
        """A detached copy of x in host memory (a view into a chunk; x itself on the CPU unless copy_cpu)."""
        if x.device.type == "cpu" and not self.copy_cpu:
            return x.detach()
        while self.live and not self.live[-1][3]:
            self.live.pop()  # the top of the stack is free again
        n = x.numel() * x.element_size()
        ci, off = (self.live[-1][0], -(-self.live[-1][2] // ALIGN) * ALIGN) if self.live else (0, 0)
        while ci < len(self.chunks) and off + n > self.chunks[ci].numel():
            ci, off = ci + 1, 0  # the rest of this chunk is too small: the next one (it may be a new one)
        if ci == len(self.chunks):
            size = self.chunk or min(max(_pow2(8 * n), 2**28), 2**33)
            self.chunks.append(torch.empty(max(size, _pow2(n)), dtype=torch.uint8,
                                           pin_memory=x.device.type == "cuda"))
        entry = [ci, off, off + n, True]
        self.live.append(entry)
        # a tensor of its own over the chunk's memory, not a view of the chunk: a view would share the chunk's
        # version counter, and the next copy into the chunk would fail autograd's check of the saved inputs
        h = torch.empty(0, dtype=x.dtype, device=self.chunks[ci].device).set_(
            self.chunks[ci].untyped_storage(), off // x.element_size(), x.shape)
        h.copy_(x.detach(), non_blocking=True)
        weakref.finalize(h, entry.__setitem__, 3, False)  # the view gone: its region may be carved again
        return h
