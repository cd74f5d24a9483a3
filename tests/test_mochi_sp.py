"""AsymmDiT under --sp 2 (common/sp.py) on 2 gloo processes against the same model whole, in fp32: outputs equal and
parameter gradients summed over the group equal the whole model's, for prompts of one length (no text mask),
prompts of different lengths (the padded text keys masked in the joint attention), an empty prompt beside a real
one, no text at all (every prompt empty: a text stream of 0 tokens) and a text length rounded up past every prompt
(--compile's text_multiple); visual token counts odd (padded) and even. Depth 3: two text-updating blocks and the
last one (no text update). The end-to-end run through main() is tests/test_mochi_train.py's."""
import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

import train_mochi as M
from common import sp
from tests.procs import free_port

TINY = M.MochiConfig(dim_x=64, dim_y=32, num_heads=2, depth=3, ffn_x=128, ffn_y=64, t5_dim=32, text_len=12)
CASES = {  # name: (latent (C, T, H, W), real text tokens per sample, text_multiple)
    "same-length-odd": ((12, 3, 6, 6), (12, 12), 1),  # 3 x 3 x 3 = 27 visual tokens: one padded; no text mask
    "masked-text-even": ((12, 2, 6, 8), (7, 3), 1),  # 2 x 3 x 4 = 24 tokens; the second prompt's keys masked
    "empty-prompt-odd": ((12, 1, 10, 6), (5, 0), 1),  # 15 tokens; caption dropout's empty prompt next to a real one
    "no-text-odd": ((12, 3, 6, 6), (0, 0), 1),  # every prompt empty: the joint attention is the visual tokens only
    "text-multiple": ((12, 2, 6, 6), (5, 9), 8),  # 18 tokens; the text stream rounded up to 16 (all padded keys)
}


def _run(rank, name, port):
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=2)
    try:
        shape, lens, multiple = CASES[name]
        torch.manual_seed(0)  # the same model and inputs on both ranks
        model = M.AsymmDiT(TINY)
        with torch.no_grad():
            for p in model.parameters():
                p.normal_(0, 0.2)  # every weight O(1)-effect: a zero-init head must not hide a wrong split
        model.text_multiple = multiple
        B = 2
        x = torch.randn(B, *shape)
        sigma = torch.rand(B)
        y_feat = torch.randn(B, TINY.text_len, TINY.t5_dim)
        y_mask = torch.arange(TINY.text_len)[None] < torch.tensor(lens)[:, None]  # right-padded
        w = torch.randn(B, *shape)

        whole = model(x, sigma, y_feat, y_mask)
        (whole * w).sum().backward()
        ref = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
        model.zero_grad(set_to_none=True)
        model.sp = sp.new_groups(2)
        split = model(x, sigma, y_feat, y_mask)
        torch.testing.assert_close(split, whole, rtol=1e-5, atol=1e-5)
        (split * w).sum().backward()
        assert {n for n, p in model.named_parameters() if p.grad is not None} == set(ref)
        assert "pos_frequencies" in ref and "blocks.0.mlp_y.w1.weight" in ref  # the learned RoPE and the text
        for n, p in model.named_parameters():
            if p.grad is None:  # no text (case no-text) or the last block's unused text weights: none either way
                continue
            g = p.grad.clone()
            dist.all_reduce(g)  # each rank: the part through its tokens; the group's sum: the whole gradient
            scale = ref[n].abs().max().item()
            err = (g - ref[n]).abs().max().item() / scale if scale else (g - ref[n]).abs().max().item()
            assert err < 1e-5, (n, err)  # fp32 summation order only
    finally:
        dist.destroy_process_group()


@pytest.mark.parametrize("name", list(CASES))
def test_split_model_equals_whole(name):
    mp.spawn(_run, args=(name, free_port()), nprocs=2, join=True)
