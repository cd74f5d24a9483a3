"""HunyuanVideoDiT under --sp 2 (common/sp.py) on 2 gloo processes against the same model whole, in fp32: outputs
equal and parameter gradients summed over the group equal the whole model's, for the guidance-distilled model with a
padded text (the double blocks' and single blocks' joint attention mask their text keys), the toy's model without
guidance embedding and an unpadded text, and a 1-frame (image) latent; token counts odd (padded) and even. The
end-to-end run through main() is tests/test_hunyuan_train.py's."""
import dataclasses

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

import train_hunyuan as H
from common import sp
from tests.procs import free_port

TINY = H.DIT_PRESETS["tiny"]  # hidden 64, 2 heads, 2 double + 2 single blocks, patch (1, 2, 2)
CASES = {  # name: (config, latent (C, T, H, W), valid text tokens per sample of the L = 7)
    "guidance-padded-odd": (TINY, (16, 3, 6, 6), (7, 3)),  # 27 video tokens
    "no-guidance-even": (dataclasses.replace(TINY, guidance_embed=False), (16, 2, 4, 6), (7, 7)),  # 12
    "one-frame-padded-odd": (TINY, (16, 1, 6, 10), (5, 2)),  # 15
}


def _run(rank, name, port):
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=2)
    try:
        cfg, shape, valid = CASES[name]
        torch.manual_seed(0)  # the same model and inputs on both ranks
        model = H.HunyuanVideoDiT(cfg)
        with torch.no_grad():
            for p in model.parameters():
                p.normal_(0, 0.2)  # every weight O(1)-effect: a zero-init modulation or head must not hide a bad split
        B, L = 2, 7
        x = torch.randn(B, *shape)
        t = torch.rand(B) * 1000
        states = torch.randn(B, L, cfg.text_states_dim)
        mask = (torch.arange(L)[None] < torch.tensor(valid)[:, None]).long()  # right-padded, as batch_text makes it
        pooled = torch.randn(B, cfg.text_states_dim_2)
        g = H.embedded_guidance(6.0, B) if cfg.guidance_embed else None
        w = torch.randn(B, cfg.out_channels, *shape[1:])

        whole = model(x, t, states, mask, pooled, g)
        (whole * w).sum().backward()
        ref = {n: p.grad.clone() for n, p in model.named_parameters()}
        model.zero_grad()
        model.sp = sp.new_groups(2)
        split = model(x, t, states, mask, pooled, g)
        assert split.shape == whole.shape
        err = (split - whole).abs().max().item() / whole.abs().max().item()
        assert err < 1e-5, err
        (split * w).sum().backward()
        for n, p in model.named_parameters():
            gr = p.grad.clone()
            dist.all_reduce(gr)  # each rank: the part through its tokens; the group's sum: the whole gradient
            err = (gr - ref[n]).abs().max().item() / ref[n].abs().max().item()  # fp32 summation order only
            assert err < 1e-5, (n, err)
    finally:
        dist.destroy_process_group()


@pytest.mark.parametrize("name", list(CASES))
def test_split_model_equals_whole(name):
    mp.spawn(_run, args=(name, free_port()), nprocs=2, join=True)
