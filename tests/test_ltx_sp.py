"""Transformer3DModel under --sp 2 (common/sp.py) on 2 gloo processes against the same model whole, in fp32: outputs
equal and parameter gradients summed over the group equal the whole model's, for every conditioning path of the DiT:
one t a sample with a padded prompt (its mask), per-token t with timestep 0 on the first latent frame (image-to-video)
and one frame rate per sample (RoPE tables per sample), and STG's perturbed block (its self-attention replaced by its
values for the last sample, as sampling does); token counts odd (padded) and even. The end-to-end run through main()
is tests/test_ltx_train.py's."""
import dataclasses

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

import train_ltx as L
from common import sp
from tests.procs import free_port
from tests.test_ltx_dit import randomise

TINY = L.DIT_PRESETS["tiny"]  # 2 heads of 8, D = 16 (RoPE's front padding), 2 blocks
CASES = {  # name: (latent (F, H, W), per-token t, frame rates, text mask, STG block)
    "per-sample-t-odd-masked": ((3, 3, 3), False, 25.0, True, None),  # 27 tokens
    "first-frame-per-token-fps": ((2, 4, 3), True, [24.0, 16.0], False, None),  # 24
    "stg-odd": ((5, 1, 3), True, 25.0, True, 1),  # 15
}


def _run(rank, name, port):
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=2)
    try:
        (f, h, w), per_token, fps, masked, stg = CASES[name]
        torch.manual_seed(0)  # the same model and inputs on both ranks
        model = randomise(L.Transformer3DModel(dataclasses.replace(TINY, causal_temporal_positioning=per_token)))
        B, Lt, N = 2, 7, f * h * w
        x = torch.randn(B, TINY.in_channels, f, h, w)
        if per_token:
            t = torch.rand(B, N) * 1000
            t[0, : h * w] = 0  # the first sample's first latent frame is the clean condition
        else:
            t = torch.rand(B) * 1000
        ctx = torch.randn(B, Lt, TINY.caption_channels)
        mask = None
        if masked:
            mask = torch.ones(B, Lt)
            mask[1, 4:] = 0  # unequal prompt lengths
        fr = torch.tensor(fps) if isinstance(fps, list) else fps
        if stg is not None:
            model.transformer_blocks[stg].attn1.stg_skip = 1  # the last sample: STG's perturbed prediction
        wt = torch.randn(B, TINY.out_channels, f, h, w)

        whole = model(x, t, ctx, mask, fr)
        (whole * wt).sum().backward()
        ref = {n: p.grad.clone() for n, p in model.named_parameters()}
        model.zero_grad()
        model.sp = sp.new_groups(2)
        split = model(x, t, ctx, mask, fr)
        assert split.shape == whole.shape
        torch.testing.assert_close(split, whole, rtol=1e-5, atol=1e-5)
        (split * wt).sum().backward()
        for n, p in model.named_parameters():
            g = p.grad.clone()
            dist.all_reduce(g)  # each rank: the part through its tokens; the group's sum: the whole gradient
            err = (g - ref[n]).abs().max().item() / ref[n].abs().max().item()  # fp32 summation order only
            assert err < 1e-5, (n, err)
            assert not torch.allclose(p.grad, ref[n], rtol=1e-3, atol=1e-3), n  # one rank alone holds only a part
    finally:
        dist.destroy_process_group()


@pytest.mark.parametrize("name", list(CASES))
def test_split_model_equals_whole(name):
    mp.spawn(_run, args=(name, free_port()), nprocs=2, join=True)
