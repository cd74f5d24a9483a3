"""The FLOP formula behind MFU equals what torch's FLOP counter measures on the real forward."""
import torch
from torch.nn.attention import SDPBackend, sdpa_kernel
from torch.utils.flop_counter import FlopCounterMode

import train_wan as W
from tests.helpers import dit_inputs, tiny_dit


def test_flop_formula_matches_torch_flop_counter():
    m = tiny_dit()
    x, t, ctx = dit_inputs(m.cfg, B=1, F=3, H=6, Wd=10)
    # the math SDPA backend decomposes attention into matmuls, which the counter sees (the fused CPU kernel it skips)
    with torch.no_grad(), sdpa_kernel(SDPBackend.MATH), FlopCounterMode(display=False) as fc:
        m(x, t, ctx)
    measured = fc.get_total_flops()
    assert measured > 0
    assert W.count_flops(m.cfg, 3, 6, 10) == measured


def test_full_size_flops_match_the_spec():
    # spec: 1.3B at 480x832x81 (32,760 tokens) is about 283 TFLOP forward, of which attention about 201
    f = W.count_flops(W.DIT_PRESETS["1.3B"], 21, 60, 104)
    assert 280e12 < f < 290e12, f / 1e12
