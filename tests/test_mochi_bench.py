"""The FLOP formula behind MFU equals what torch's FLOP counter measures on the real forward, and the full-size
figures are what the shapes say."""
import pytest
import torch
from torch.nn.attention import SDPBackend, sdpa_kernel
from torch.utils.flop_counter import FlopCounterMode

import train_mochi as M
from tests.test_mochi_dit import inputs, tiny_dit


@pytest.mark.parametrize("n_text", [16, 5, 0])
def test_flop_formula_matches_torch_flop_counter(n_text):
    m = tiny_dit()
    x, y, mask = inputs(m.cfg, 1, 2, 8, 6, [n_text])
    # the math SDPA backend decomposes attention into matmuls, which the counter sees (the fused CPU kernel it skips)
    with torch.no_grad(), sdpa_kernel(SDPBackend.MATH), FlopCounterMode(display=False) as fc:
        m(x, torch.tensor([0.5]), y, mask)
    assert fc.get_total_flops() > 0
    assert M.count_flops(m.cfg, 2, 8, 6, n_text) == fc.get_total_flops()


def test_full_size_flops():
    # 480x848, 37 frames -> latents 7 x 60 x 106 -> 11,130 visual tokens (+ 256 text): about 2 x 10B x 11.4k for the
    # weights plus the joint attention 48 x 4 x 11,386^2 x 3072
    cfg = M.DIT_PRESETS["10B"]
    f = M.count_flops(cfg, 7, 60, 106)
    weights = 2 * 11130 * 48 * (4 * 3072 ** 2 + 3 * 3072 * 8192)
    attn = 48 * 4 * (11130 + 256) ** 2 * 3072
    assert 0 < f - weights - attn < 0.05 * f, (f / 1e12, weights / 1e12, attn / 1e12)
