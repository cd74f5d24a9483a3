"""Transformer3DModel under --sp 2 (common/sp.py) on 2 gloo processes against the same model whole, in fp32: outputs
equal and parameter gradients summed over the group equal the whole model's, for every conditioning path of the DiT:
one t a sample with a padded prompt (its mask), per-token t with timestep 0 on the first latent frame (image-to-video)
and one frame rate per sample (RoPE tables per sample), and STG's perturbed block (its self-attention replaced by its
values for the last sample, as sampling does), a keyframe's tokens in front (their own RoPE time, timestep 0,
dropped from the output); token counts odd (padded) and even. The end-to-end run through main()
is tests/test_ltx_train.py's."""
import dataclasses

import pytest
import torch

import train_ltx as L
from tests import checks
from tests.procs import spawn_gloo
from tests.test_ltx_dit import randomise

TINY = L.DIT_PRESETS["tiny"]  # 2 heads of 8, D = 16 (RoPE's front padding), 2 blocks
CASES = {  # name: (latent (F, H, W), per-token t, frame rates, text mask, STG block, keyframe)
    "per-sample-t-odd-masked": ((3, 3, 3), False, 25.0, True, None, False),  # 27 tokens
    "first-frame-per-token-fps": ((2, 4, 3), True, [24.0, 16.0], False, None, False),  # 24
    "stg-odd": ((5, 1, 3), True, 25.0, True, 1, False),  # 15
    "keyframe-odd-fps": ((2, 3, 3), False, [24.0, 16.0], True, None, True),  # 9 keyframe + 18 video tokens
}


def _case(name):
    (f, h, w), per_token, fps, masked, stg, keyed = CASES[name]
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
    key = (torch.randn(B, TINY.in_channels, 1, h, w), L.last_frame_index(f)) if keyed else None
    wt = torch.randn(B, TINY.out_channels, f, h, w)
    checks.check_split_equals_whole(model, lambda m: m(x, t, ctx, mask, fr, keyframe=key), wt, partial=True)


@pytest.mark.parametrize("name", list(CASES))
def test_split_model_equals_whole(name):
    spawn_gloo(_case, name)
