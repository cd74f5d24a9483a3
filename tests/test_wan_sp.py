"""WanModel under --sp 2 (common/sp.py) on 2 gloo processes against the same model whole, in fp32: outputs equal and
parameter gradients summed over the group equal the whole model's, for one t a sample, one t per latent frame
(TI2V-5B's image-to-video) and Wan 2.1 i2v with CLIP tokens in the cross-attention; token counts odd (padded) and
even. The end-to-end run through main() is tests/test_wan_train.py's."""
import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

import train_wan as W
from common import sp
from tests.procs import free_port

TINY = dict(dim=64, ffn_dim=128, num_heads=2, num_layers=2, text_dim=32, text_len=16, patch_size=(1, 2, 2))
CASES = {  # name: (config, latent (C, F, H, W), per-frame t)
    "t2v-odd": (W.WanConfig(**TINY, in_dim=16, out_dim=16), (16, 3, 6, 6), False),  # 27 tokens
    "ti2v-per-frame": (W.WanConfig(**TINY, in_dim=48, out_dim=48, model_type="ti2v"), (48, 3, 4, 6), True),  # 18
    "i2v-clip": (W.WanConfig(**TINY, in_dim=36, out_dim=16, model_type="i2v", img_dim=24), (16, 2, 6, 4), False),
}


def _run(rank, name, port):
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=2)
    try:
        cfg, shape, per_frame = CASES[name]
        torch.manual_seed(0)  # the same model and inputs on both ranks
        model = W.WanModel(cfg)
        with torch.no_grad():
            for p in model.parameters():
                p.normal_(0, 0.2)  # every weight O(1)-effect: a zero-init head must not hide a wrong split
        B = 2
        x = torch.randn(B, *shape)
        t = torch.rand(B, shape[1]) * 1000 if per_frame else torch.rand(B) * 1000
        if per_frame:
            t[:, 0] = 0  # TI2V i2v: the clean first frame
        ctx = torch.randn(B, 10, cfg.text_dim)
        y = torch.randn(B, cfg.in_dim - cfg.out_dim, *shape[1:]) if cfg.in_dim != cfg.out_dim else None
        clip = torch.randn(B, 257, cfg.img_dim) if cfg.img_dim else None
        w = torch.randn(B, cfg.out_dim, *shape[1:])

        whole = model(x, t, ctx, y=y, clip_fea=clip)
        (whole * w).sum().backward()
        ref = {n: p.grad.clone() for n, p in model.named_parameters()}
        model.zero_grad()
        model.sp = sp.new_groups(2)
        split = model(x, t, ctx, y=y, clip_fea=clip)
        torch.testing.assert_close(split, whole, rtol=1e-5, atol=1e-5)
        (split * w).sum().backward()
        for n, p in model.named_parameters():
            g = p.grad.clone()
            dist.all_reduce(g)  # each rank: the part through its tokens; the group's sum: the whole gradient
            err = (g - ref[n]).abs().max().item() / ref[n].abs().max().item()  # fp32 summation order only
            assert err < 1e-5, (n, err)
    finally:
        dist.destroy_process_group()


@pytest.mark.parametrize("name", list(CASES))
def test_split_model_equals_whole(name):
    mp.spawn(_run, args=(name, free_port()), nprocs=2, join=True)
