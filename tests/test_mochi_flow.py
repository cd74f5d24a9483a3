"""Mochi's flow-matching convention pinned (sigma = 1 noise, the model conditions on 1 - sigma, it predicts x0 - eps),
the training loss, the linear-quadratic sampling schedule against diffusers' copy and the spec's values, and the
Euler + CFG sampler (cond and uncond of different prompt lengths in one batch)."""
import math

import pytest
import torch

import train_mochi as M
from tests.test_mochi_dit import inputs, tiny_dit


class Oracle(torch.nn.Module):
    """Knows x0: on the straight path z = (1 - s) x0 + s eps the prediction x0 - eps is (x0 - z) / s."""

    def __init__(self, x0):
        super().__init__()
        self.x0 = x0

    def forward(self, z, sigma, y, mask):
        s = sigma.view(-1, 1, 1, 1, 1)
        return (self.x0.repeat(z.shape[0] // self.x0.shape[0], 1, 1, 1, 1) - z) / s


def test_loss_target_is_x0_minus_eps():
    g = torch.Generator().manual_seed(0)
    x0, eps = torch.randn(2, 12, 2, 4, 4, generator=g), torch.randn(2, 12, 2, 4, 4, generator=g)
    sigma = torch.tensor([0.3, 0.8])
    y, mask = torch.zeros(2, 4, 8), torch.ones(2, 4, dtype=torch.bool)
    assert M.flow_loss(Oracle(x0), x0, y, mask, sigma, eps).item() < 1e-10
    zero = lambda z, s, y, m: torch.zeros_like(z)  # noqa: E731
    assert math.isclose(M.flow_loss(zero, x0, y, mask, sigma, eps).item(), (x0 - eps).pow(2).mean().item(),
                        rel_tol=1e-6)


def test_dit_conditions_on_one_minus_sigma():
    # the time embedder sees 1 - sigma (times 1000 inside): sigma = 1 (noise) is time 0
    m = tiny_dit()
    seen = []
    m.t_embedder.register_forward_hook(lambda mod, args, out: seen.append(args[0].clone()))
    x, y, mask = inputs(m.cfg, 2, 1, 4, 4, [3, 5])
    with torch.no_grad():
        m(x, torch.tensor([1.0, 0.25]), y, mask)
    assert torch.allclose(seen[0], torch.tensor([0.0, 0.75]))
    e = M.timestep_embedding(torch.tensor([750.0]))
    assert torch.allclose(e[0, :128], torch.cos(750.0 * torch.exp(-math.log(10000) * torch.arange(128) / 128)))


@pytest.mark.parametrize("steps,threshold,linear", [(64, 0.025, None), (8, 0.1, 6), (50, 0.025, None), (7, 0.05, 3)])
def test_schedule_matches_diffusers(steps, threshold, linear):
    from diffusers.pipelines.mochi.pipeline_mochi import linear_quadratic_schedule
    ours = M.linear_quadratic_schedule(steps, threshold, linear)
    ref = linear_quadratic_schedule(steps, threshold, linear)  # diffusers omits upstream's final 0
    assert len(ours) == steps + 1 and ours[-1] == 0.0 and ours[0] == 1.0
    assert max(abs(a - b) for a, b in zip(ours, ref)) < 1e-12
    assert all(a > b for a, b in zip(ours, ours[1:]))


def test_schedule_values_from_spec():
    s = M.linear_quadratic_schedule(64, 0.025)
    assert abs(s[1] - 0.999219) < 1e-6 and abs(s[32] - 0.975) < 1e-12
    for i, v in [(33, 0.973291), (34, 0.969727), (-4, 0.172119), (-3, 0.116602), (-2, 0.059229)]:
        assert abs(s[i] - v) < 1e-6, (i, s[i], v)


@pytest.mark.parametrize("guidance", [1.0, 6.0])
def test_euler_recovers_x0_on_straight_path(guidance):
    g = torch.Generator().manual_seed(1)
    x0, eps = torch.randn(1, 12, 2, 4, 4, generator=g), torch.randn(1, 12, 2, 4, 4, generator=g)
    cond = (torch.zeros(1, 4, 8), torch.ones(1, 4, dtype=torch.bool))
    uncond = (torch.zeros(1, 4, 8), torch.zeros(1, 4, dtype=torch.bool))
    out = M.sample_euler(Oracle(x0), eps, cond, uncond, steps=10, guidance=guidance)
    assert (out - x0).abs().max() < 1e-5  # cond == uncond here, so any guidance gives the oracle back


def test_guidance_batches_prompts_of_different_lengths():
    m = tiny_dit()
    c = m.cfg
    z = torch.randn(1, c.in_channels, 2, 4, 6, generator=torch.Generator().manual_seed(2))
    _, y, mask = inputs(c, 2, 1, 4, 4, [9, 0])  # a prompt and the empty negative prompt (no text at all)
    cond, uncond = (y[:1], mask[:1]), (y[1:], mask[1:])
    with torch.no_grad():
        got = M.guided_pred(m, z, 0.7, cond, uncond, 4.5)
        s = torch.tensor([0.7])
        a, b = m(z, s, *cond), m(z, s, *uncond)
    assert (got - (b + 4.5 * (a - b))).abs().max() < 1e-4
