"""HunyuanVideoDiT under --sp 2 (common/sp.py) on 2 gloo processes against the same model whole, in fp32: outputs
equal and parameter gradients summed over the group equal the whole model's, for the guidance-distilled model with a
padded text (the double blocks' and single blocks' joint attention mask their text keys), the toy's model without
guidance embedding and an unpadded text, and a 1-frame (image) latent; token counts odd (padded) and even. The
end-to-end run through main() is tests/test_hunyuan_train.py's."""
import dataclasses

import pytest
import torch

import train_hunyuan as H
from tests import checks
from tests.procs import spawn_gloo

TINY = H.DIT_PRESETS["tiny"]  # hidden 64, 2 heads, 2 double + 2 single blocks, patch (1, 2, 2)
CASES = {  # name: (config, latent (C, T, H, W), valid text tokens per sample of the L = 7)
    "guidance-padded-odd": (TINY, (16, 3, 6, 6), (7, 3)),  # 27 video tokens
    "no-guidance-even": (dataclasses.replace(TINY, guidance_embed=False), (16, 2, 4, 6), (7, 7)),  # 12
    "one-frame-padded-odd": (TINY, (16, 1, 6, 10), (5, 2)),  # 15
}


def _case(name):
    cfg, shape, valid = CASES[name]
    torch.manual_seed(0)  # the same model and inputs on both ranks
    model = checks.o1_weights(H.HunyuanVideoDiT(cfg))
    B, L = 2, 7
    x = torch.randn(B, *shape)
    t = torch.rand(B) * 1000
    states = torch.randn(B, L, cfg.text_states_dim)
    mask = (torch.arange(L)[None] < torch.tensor(valid)[:, None]).long()  # right-padded, as batch_text makes it
    pooled = torch.randn(B, cfg.text_states_dim_2)
    g = H.embedded_guidance(6.0, B) if cfg.guidance_embed else None
    w = torch.randn(B, cfg.out_channels, *shape[1:])
    checks.check_split_equals_whole(model, lambda m: m(x, t, states, mask, pooled, g), w, outputs="relative")


@pytest.mark.parametrize("name", list(CASES))
def test_split_model_equals_whole(name):
    spawn_gloo(_case, name)
