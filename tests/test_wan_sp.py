"""WanModel under --sp 2 (common/sp.py) on 2 gloo processes against the same model whole, in fp32: outputs equal and
parameter gradients summed over the group equal the whole model's, for one t a sample, one t per latent frame
(TI2V-5B's image-to-video) and Wan 2.1 i2v with CLIP tokens in the cross-attention; token counts odd (padded) and
even. The end-to-end run through main() is tests/test_wan_train.py's."""
import pytest
import torch

import train_wan as W
from tests import checks
from tests.procs import spawn_gloo

TINY = dict(dim=64, ffn_dim=128, num_heads=2, num_layers=2, text_dim=32, text_len=16, patch_size=(1, 2, 2))
CASES = {  # name: (config, latent (C, F, H, W), per-frame t)
    "t2v-odd": (W.WanConfig(**TINY, in_dim=16, out_dim=16), (16, 3, 6, 6), False),  # 27 tokens
    "ti2v-per-frame": (W.WanConfig(**TINY, in_dim=48, out_dim=48, model_type="ti2v"), (48, 3, 4, 6), True),  # 18
    "i2v-clip": (W.WanConfig(**TINY, in_dim=36, out_dim=16, model_type="i2v", img_dim=24), (16, 2, 6, 4), False),
}


def _case(name):
    cfg, shape, per_frame = CASES[name]
    torch.manual_seed(0)  # the same model and inputs on both ranks
    model = checks.o1_weights(W.WanModel(cfg))
    B = 2
    x = torch.randn(B, *shape)
    t = torch.rand(B, shape[1]) * 1000 if per_frame else torch.rand(B) * 1000
    if per_frame:
        t[:, 0] = 0  # TI2V i2v: the clean first frame
    ctx = torch.randn(B, 10, cfg.text_dim)
    y = torch.randn(B, cfg.in_dim - cfg.out_dim, *shape[1:]) if cfg.in_dim != cfg.out_dim else None
    clip = torch.randn(B, 257, cfg.img_dim) if cfg.img_dim else None
    w = torch.randn(B, cfg.out_dim, *shape[1:])
    checks.check_split_equals_whole(model, lambda m: m(x, t, ctx, y=y, clip_fea=clip), w)


@pytest.mark.parametrize("name", list(CASES))
def test_split_model_equals_whole(name):
    spawn_gloo(_case, name)
