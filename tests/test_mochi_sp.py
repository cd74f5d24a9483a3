"""AsymmDiT under --sp 2 (common/sp.py) on 2 gloo processes against the same model whole, in fp32: outputs equal and
parameter gradients summed over the group equal the whole model's, for prompts of one length (no text mask),
prompts of different lengths (the padded text keys masked in the joint attention), an empty prompt beside a real
one, no text at all (every prompt empty: a text stream of 0 tokens) and a text length rounded up past every prompt
(--compile's text_multiple); visual token counts odd (padded) and even. Depth 3: two text-updating blocks and the
last one (no text update). The end-to-end run through main() is tests/test_mochi_train.py's."""
import pytest
import torch

import train_mochi as M
from tests import checks
from tests.procs import spawn_gloo

TINY = M.MochiConfig(dim_x=64, dim_y=32, num_heads=2, depth=3, ffn_x=128, ffn_y=64, t5_dim=32, text_len=12)
CASES = {  # name: (latent (C, T, H, W), real text tokens per sample, text_multiple)
    "same-length-odd": ((12, 3, 6, 6), (12, 12), 1),  # 3 x 3 x 3 = 27 visual tokens: one padded; no text mask
    "masked-text-even": ((12, 2, 6, 8), (7, 3), 1),  # 2 x 3 x 4 = 24 tokens; the second prompt's keys masked
    "empty-prompt-odd": ((12, 1, 10, 6), (5, 0), 1),  # 15 tokens; caption dropout's empty prompt next to a real one
    "no-text-odd": ((12, 3, 6, 6), (0, 0), 1),  # every prompt empty: the joint attention is the visual tokens only
    "text-multiple": ((12, 2, 6, 6), (5, 9), 8),  # 18 tokens; the text stream rounded up to 16 (all padded keys)
}


def _case(name):
    shape, lens, multiple = CASES[name]
    torch.manual_seed(0)  # the same model and inputs on both ranks
    model = checks.o1_weights(M.AsymmDiT(TINY))
    model.text_multiple = multiple
    B = 2
    x = torch.randn(B, *shape)
    sigma = torch.rand(B)
    y_feat = torch.randn(B, TINY.text_len, TINY.t5_dim)
    y_mask = torch.arange(TINY.text_len)[None] < torch.tensor(lens)[:, None]  # right-padded
    w = torch.randn(B, *shape)
    # no text (case no-text) or the last block's unused text weights: no gradient, whole or split; the learned RoPE
    # and the text stream's weights must have one
    checks.check_split_equals_whole(model, lambda m: m(x, sigma, y_feat, y_mask), w, unused=True,
                                    needs=("pos_frequencies", "blocks.0.mlp_y.w1.weight"))


# two cases in the slow run only: an odd token count and the text mask are each in another case too
@pytest.mark.parametrize("name", [pytest.param(n, marks=pytest.mark.slow) if n in ("same-length-odd", "no-text-odd")
                                  else n for n in CASES])
def test_split_model_equals_whole(name):
    spawn_gloo(_case, name)
