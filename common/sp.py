"""Ulysses sequence parallelism (--sp N): N ranks share one batch and split its video tokens, so a clip too long
for one device's activations trains across N. Model-agnostic: the model calls shard() after embedding the tokens,
attention() instead of its self-attention's SDPA, and gather() before un-embedding; everything between acts on the
rank's own tokens (per-token linears, norms, modulations, cross-attention to the replicated text).

    group = sp.new_groups(N)                     # every rank calls it; ranks r*N ... r*N+N-1 form one group
    x = sp.shard(x, group)                       # (B, L, C) -> (B, ceil(L/N), C): this rank's tokens, zero-padded
    y = sp.attention(q, k, v, group, L)          # q/k/v (B, L/N, H, D) local -> (B, L/N, H, D), over all L keys
    x = sp.gather(x, group, L)                   # (B, L/N, C) -> (B, L, C), padding dropped

How attention works (DeepSpeed-Ulysses): an all-to-all turns (B, L/N, H, D) by tokens into (B, L, H/N, D) by heads,
each rank attends over the whole sequence for its H/N heads, and the inverse all-to-all brings the tokens back. So H
must divide by N. A sequence that does not divide by N is zero-padded at the end and the padded keys are masked
(SDPA with a boolean mask; exact, and only then): buckets of any size work.

Gradients: the loss is computed from the gathered (B, L, ...) output, the same on every rank of the group, and
gather's backward keeps this rank's slice of that gradient, so each rank's parameter gradients are the part that
flows through its own tokens; the whole gradient is their sum over the group. FSDP2 averages over all ranks, so the
caller multiplies the loss by N before backward (the logged loss is not scaled). The data are the caller's too: the
ranks of a group must get the same samples and the same noise (data-parallel rank = rank // N).
"""
import torch
import torch.distributed as dist
import torch.nn.functional as F


def new_groups(size):
    """The sequence-parallel group of this rank (None for size 1): consecutive ranks, so on a node of 8 GPUs with
    size <= 8 the all-to-alls stay inside the node. Every rank creates every group (torch's rule)."""
    world, rank = dist.get_world_size(), dist.get_rank()
    if size <= 1:
        return None
    if world % size:
        raise ValueError(f"--sp {size} does not divide the world size {world}")
    mine = None
    for start in range(0, world, size):
        g = dist.new_group(list(range(start, start + size)))
        if start <= rank < start + size:
            mine = g
    return mine


def data_parallel(args, rank, world, heads):
    """main()'s split of the work over the ranks, the same in every script: -> (group, dp_rank, dp_world, micro,
    accum). --sp N groups N consecutive ranks per sample (N divides the processes and the heads, or a UserError);
    the data order, the seeded draws and the batch arithmetic count the dp_world = world / N data-parallel ranks:
    micro-batch --micro_batch (0: global / dp_world) and accum = global / (micro x dp_world) micro-batches a step."""
    from common.args import UserError
    if world % args.sp or heads % args.sp:
        raise UserError(f"--sp {args.sp} must divide the number of processes ({world}) and the model's {heads} "
                        "attention heads")
    if args.shard < 0 or (args.shard and world % args.shard):
        raise UserError(f"--shard {args.shard} must divide the number of processes ({world}): each weight is sharded "
                        "over that many ranks and replicated over the groups of them (0 = all ranks)")
    group = new_groups(args.sp)
    dp_rank, dp_world = rank // args.sp, world // args.sp
    micro = args.micro_batch or args.global_batch // dp_world
    accum = args.global_batch // (micro * dp_world) if micro else 0
    if args.mode in ("train", "bench") and (micro < 1 or accum * micro * dp_world != args.global_batch):
        raise UserError(f"--global_batch {args.global_batch} must be a multiple of --micro_batch x processes = "
                        f"{args.micro_batch or '(auto)'} x {dp_world}"
                        + (f" (processes / --sp {args.sp})" if args.sp > 1 else ""))
    return group, dp_rank, dp_world, micro, accum


def _a2a(x, group):
    """x (N, ...) chunk j goes to rank j of the group; -> (N, ...) chunk j came from rank j."""
    x = x.contiguous()
    out = torch.empty_like(x)  # after contiguous(): empty_like keeps a permuted input's strides
    dist.all_to_all_single(out, x, group=group)
    return out


class _SeqToHeads(torch.autograd.Function):
    """(B, L/N, H, D) this rank's tokens, all heads -> (B, L, H/N, D) all tokens, this rank's heads."""

    @staticmethod
    def forward(ctx, x, group):
        ctx.group = group
        n = dist.get_world_size(group)
        B, Ls, H, D = x.shape
        y = _a2a(x.view(B, Ls, n, H // n, D).permute(2, 0, 1, 3, 4), group)  # (n, B, Ls, H/n, D), from rank j
        return y.permute(1, 0, 2, 3, 4).reshape(B, n * Ls, H // n, D)

    @staticmethod
    def backward(ctx, g):
        return _HeadsToSeq.apply(g, ctx.group), None


class _HeadsToSeq(torch.autograd.Function):
    """The inverse: (B, L, H/N, D) -> (B, L/N, H, D)."""

    @staticmethod
    def forward(ctx, x, group):
        ctx.group = group
        n = dist.get_world_size(group)
        B, L, Hs, D = x.shape
        y = _a2a(x.view(B, n, L // n, Hs, D).permute(1, 0, 2, 3, 4), group)  # (n, B, L/n, Hs, D): heads of rank j
        return y.permute(1, 2, 0, 3, 4).reshape(B, L // n, n * Hs, D)

    @staticmethod
    def backward(ctx, g):
        return _SeqToHeads.apply(g, ctx.group), None


class _Gather(torch.autograd.Function):
    """(B, L/N, ...) -> (B, L, ...) along dim 1; backward: this rank's slice of the (replicated) gradient."""

    @staticmethod
    def forward(ctx, x, group):
        ctx.group, ctx.n = group, x.shape[1]
        parts = [torch.empty_like(x) for _ in range(dist.get_world_size(group))]
        dist.all_gather(parts, x.contiguous(), group=group)
        return torch.cat(parts, dim=1)

    @staticmethod
    def backward(ctx, g):
        r = dist.get_rank(ctx.group)
        return g[:, r * ctx.n:(r + 1) * ctx.n], None


class _GatherHeads(torch.autograd.Function):
    """(B, M, H/N, D) this rank's heads of the replicated tokens -> (B, M, H, D) all heads. The gradient arriving here
    is a rank's part (its tokens' share, see the top of the file), so backward sums the parts over the group, then
    keeps this rank's heads (an all-reduce, not a reduce-scatter: gloo has none; the text is short)."""

    @staticmethod
    def forward(ctx, x, group):
        ctx.group, ctx.h = group, x.shape[2]
        parts = [torch.empty_like(x) for _ in range(dist.get_world_size(group))]
        dist.all_gather(parts, x.contiguous(), group=group)
        return torch.cat(parts, dim=2)

    @staticmethod
    def backward(ctx, g):
        g = g.contiguous()
        dist.all_reduce(g, group=ctx.group)
        r = dist.get_rank(ctx.group)
        return g[:, :, r * ctx.h:(r + 1) * ctx.h], None


def local_len(L, group):
    """Tokens per rank: ceil(L / N)."""
    n = dist.get_world_size(group)
    return -(-L // n)


def shard(x, group, dim=1):
    """This rank's tokens of x along `dim` (zero-padded to N * ceil(L/N) first). Works for any tensor laid out by
    tokens: the hidden states (B, L, C), per-token modulations (B, L, ...), RoPE tables (L, D/2) with dim=0."""
    n, r = dist.get_world_size(group), dist.get_rank(group)
    L = x.shape[dim]
    Ls = local_len(L, group)
    if Ls * n != L:
        pad = [0, 0] * (x.dim() - 1 - dim) + [0, Ls * n - L]
        x = F.pad(x, pad)
    return x.narrow(dim, r * Ls, Ls)


def gather(x, group, L):
    """(B, ceil(L/N), ...) from every rank -> (B, L, ...), the padding dropped. Autograd: see the top of the file."""
    return _Gather.apply(x, group)[:, :L]


def attention(q, k, v, group, L):
    """Self-attention over all L tokens of the group. q, k, v (B, ceil(L/N), H, D), this rank's tokens (RoPE already
    applied); -> (B, ceil(L/N), H, D). Plain SDPA, masked only when L does not divide by N."""
    n = dist.get_world_size(group)
    if q.shape[2] % n:
        raise ValueError(f"--sp {n}: the {q.shape[2]} attention heads do not divide by {n}")
    q, k, v = (_SeqToHeads.apply(t, group).transpose(1, 2) for t in (q, k, v))  # (B, H/N, Lp, D)
    Lp = q.shape[2]
    mask = None if Lp == L else (torch.arange(Lp, device=q.device) < L).view(1, 1, 1, Lp)  # padded keys: not seen
    y = F.scaled_dot_product_attention(q, k, v, attn_mask=mask)
    return _HeadsToSeq.apply(y.transpose(1, 2), group)


def joint_attention(q, k, v, group, L, q2, k2, v2, mask2=None):
    """Joint attention over [all L video tokens, then M text tokens], the two-stream DiTs' (HunyuanVideo, Mochi), with
    the video split over the group and the text whole on every rank. q, k, v (B, ceil(L/N), H, D) this rank's video
    tokens; q2, k2, v2 (B, M, H, D) the text tokens, the same on every rank; mask2 (B, M) bool: the text keys that are
    attended (None: all). -> (video out (B, ceil(L/N), H, D), text out (B, M, H, D), the same on every rank).
    Each rank attends for its H/N heads: the video by the all-to-all, the text by slicing its heads; the text output
    is gathered by heads (_GatherHeads). As in the model whole, padded text queries get outputs: the caller ignores
    them as it does without --sp."""
    n, r = dist.get_world_size(group), dist.get_rank(group)
    H = q.shape[2]
    if H % n:
        raise ValueError(f"--sp {n}: the {H} attention heads do not divide by {n}")
    hs = H // n
    qv, kv, vv = (_SeqToHeads.apply(t, group) for t in (q, k, v))  # (B, Lp, H/N, D), all video tokens
    qt, kt, vt = (t[:, :, r * hs:(r + 1) * hs] for t in (q2, k2, v2))  # (B, M, H/N, D), this rank's heads
    Lp, M = qv.shape[1], qt.shape[1]
    Q, K, V = (torch.cat(pair, dim=1).transpose(1, 2) for pair in ((qv, qt), (kv, kt), (vv, vt)))  # (B, H/N, S, D)
    mask = None
    if Lp != L or mask2 is not None:
        video = (torch.arange(Lp, device=q.device) < L).expand(q.shape[0], Lp)
        text = mask2.bool() if mask2 is not None else torch.ones(q.shape[0], M, dtype=torch.bool, device=q.device)
        mask = torch.cat([video, text], dim=1)[:, None, None, :]  # (B, 1, 1, Lp + M): the keys attended
    y = F.scaled_dot_product_attention(Q, K, V, attn_mask=mask).transpose(1, 2)  # (B, Lp + M, H/N, D)
    return _HeadsToSeq.apply(y[:, :Lp], group), _GatherHeads.apply(y[:, Lp:], group)
