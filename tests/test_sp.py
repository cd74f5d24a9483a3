"""common/sp.py (Ulysses sequence parallelism) on 2 gloo processes against one process: a small attention block
(per-token linears, RoPE-like per-token scaling, self-attention, a per-token head) and two stacked two-stream blocks
(joint attention over video and a masked, replicated text) give the same output, and the parameter gradients summed
over the group equal the one-process gradients, with and without padding (L odd)."""
import pytest
import torch
import torch.distributed as dist
import torch.nn.functional as F

from common import sp
from tests.procs import spawn_gloo

B, H, D = 2, 4, 8
C = H * D


def block(params, x, rope, group=None):
    """x (B, L, C) -> (B, L, C); rope (L, C): a per-token table, sharded like the tokens."""
    wqkv, wo = params
    L = x.shape[1]
    if group is not None:
        x, rope = sp.shard(x, group), sp.shard(rope, group, dim=0)
    q, k, v = (x @ wqkv).chunk(3, dim=-1)
    q, k = q * rope, k * rope
    q, k, v = (t.unflatten(-1, (H, D)) for t in (q, k, v))  # (B, Ls, H, D)
    if group is None:
        y = F.scaled_dot_product_attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2)).transpose(1, 2)
    else:
        y = sp.attention(q, k, v, group, L)
    out = y.flatten(2) @ wo
    return out if group is None else sp.gather(out, group, L)


def _case(L):  # in each of 2 gloo processes (tests/procs.py spawn_gloo)
    torch.manual_seed(0)  # the same inputs and weights on both ranks
    params = [torch.randn(C, 3 * C) / C**0.5, torch.randn(C, C) / C**0.5]
    x, rope, w = torch.randn(B, L, C), torch.rand(L, C) + 0.5, torch.randn(B, L, C)
    ref_params = [p.clone().requires_grad_() for p in params]
    ref = block(ref_params, x, rope)
    (ref * w).sum().backward()
    group = sp.new_groups(2)
    assert sp.local_len(L, group) == -(-L // 2)
    mine = [p.clone().requires_grad_() for p in params]
    out = block(mine, x, rope, group)
    assert out.shape == ref.shape
    torch.testing.assert_close(out, ref, rtol=1e-5, atol=1e-5)
    (out * w).sum().backward()
    for p, r in zip(mine, ref_params):
        g = p.grad.clone()
        dist.all_reduce(g)  # each rank holds the part through its own tokens; the sum is the whole
        torch.testing.assert_close(g, r.grad, rtol=1e-5, atol=1e-5)
        assert not torch.allclose(p.grad, r.grad, rtol=1e-3, atol=1e-3)  # one rank alone holds only a part


def test_two_ranks_equal_one():
    for L in (12, 11):  # 11: padded to 12, the padded key masked
        spawn_gloo(_case, L)


def test_heads_must_divide():
    with pytest.raises(torch.multiprocessing.ProcessRaisedException, match="heads do not divide"):
        spawn_gloo(_heads_case)


def _heads_case():
    q = torch.zeros(1, 4, 3, 8)  # 3 heads, 2 ranks
    sp.attention(q, q, q, sp.new_groups(2), 8)


def two_stream(params, x, y, mask, group=None):
    """Two stacked blocks of a two-stream DiT: video x (B, L, C) and text y (B, M, C) with mask (B, M) bool, joint
    attention over [video, attended text], residual adds; the loss sees the video only, as in the models."""
    L = x.shape[1]
    if group is not None:
        x = sp.shard(x, group)
    for wx, wy, ox, oy in params:
        qx, kx, vx = ((x @ wx).chunk(3, dim=-1))
        qy, ky, vy = ((y @ wy).chunk(3, dim=-1))
        qx, kx, vx, qy, ky, vy = (t.unflatten(-1, (H, D)) for t in (qx, kx, vx, qy, ky, vy))
        if group is None:
            Q, K, V = (torch.cat(p, 1).transpose(1, 2) for p in ((qx, qy), (kx, ky), (vx, vy)))
            m = torch.cat([torch.ones(B, L, dtype=torch.bool), mask], 1)[:, None, None, :]
            o = F.scaled_dot_product_attention(Q, K, V, attn_mask=m).transpose(1, 2)
            a, b = o[:, :L], o[:, L:]
        else:
            a, b = sp.joint_attention(qx, kx, vx, group, L, qy, ky, vy, mask)
        x, y = x + a.flatten(2) @ ox, y + b.flatten(2) @ oy
    return x if group is None else sp.gather(x, group, L)


def _joint_case(L):
    torch.manual_seed(0)
    M = 5
    params = [[torch.randn(C, 3 * C) / C**0.5, torch.randn(C, 3 * C) / C**0.5, torch.randn(C, C) / C**0.5,
               torch.randn(C, C) / C**0.5] for _ in range(2)]
    x, y, w = torch.randn(B, L, C), torch.randn(B, M, C), torch.randn(B, L, C)
    mask = torch.tensor([[True] * 5, [True] * 3 + [False] * 2])  # the second sample's text is 3 tokens
    ref_params = [[p.clone().requires_grad_() for p in ps] for ps in params]
    ref = two_stream(ref_params, x, y, mask)
    (ref * w).sum().backward()
    group = sp.new_groups(2)
    mine = [[p.clone().requires_grad_() for p in ps] for ps in params]
    out = two_stream(mine, x, y, mask, group)
    torch.testing.assert_close(out, ref, rtol=1e-5, atol=1e-5)
    (out * w).sum().backward()
    for ps, rs in zip(mine, ref_params):
        for p, r in zip(ps, rs):
            if r.grad is None:  # the last block's text output: the loss does not see it
                assert p.grad is None
                continue
            g = p.grad.clone()
            dist.all_reduce(g)
            torch.testing.assert_close(g, r.grad, rtol=1e-4, atol=1e-4)


def test_joint_attention_two_ranks_equal_one():
    for L in (12, 11):
        spawn_gloo(_joint_case, L)
