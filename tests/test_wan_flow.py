"""Flow-matching conventions (Wan: sigma = 1 is noise, target noise - x0, timestep 1000*sigma), the training sigma
samplers, the shift, and the LR schedule."""
import torch

import train_wan as W


def test_interpolation_endpoints_and_target_sign():
    x0, noise = torch.randn(2, 4, 1, 2, 2), torch.randn(2, 4, 1, 2, 2)
    seen = {}

    def oracle(xt, t, ctx):  # a model that knows x0 and noise returns exactly the target velocity
        seen["t"], seen["xt"] = t, xt
        return noise - x0

    sigma = torch.tensor([0.0, 1.0])
    assert W.flow_loss(oracle, x0, None, sigma, noise).item() == 0.0
    assert torch.equal(seen["t"], torch.tensor([0.0, 1000.0]))  # the DiT sees 1000 * sigma
    assert torch.equal(seen["xt"][0], x0[0]) and torch.equal(seen["xt"][1], noise[1])  # sigma 0 = data, 1 = noise
    wrong = W.flow_loss(lambda xt, t, c: x0 - noise, x0, None, torch.tensor([0.5, 0.5]), noise)
    assert wrong.item() > 1.0  # the opposite sign is far off


def test_shift_is_monotone_with_fixed_ends():
    s = torch.linspace(0, 1, 101, dtype=torch.float64)
    for shift in (1.0, 3.0, 5.0, 12.0):
        y = W.shift_sigma(s, shift)
        assert y[0] == 0 and y[-1] == 1 and bool((y[1:] > y[:-1]).all())
        assert bool((y >= s - 1e-12).all())  # shift >= 1 moves every sigma towards noise
    assert torch.allclose(W.shift_sigma(torch.tensor(0.5), 3.0), torch.tensor(0.75))


def test_timestep_samplers():
    g = lambda: torch.Generator().manual_seed(0)  # noqa: E731
    u = W.sample_sigmas(100_000, "uniform", generator=g())
    ln = W.sample_sigmas(100_000, "logit_normal", generator=g())
    sh = W.sample_sigmas(100_000, "shift", shift=3.0, generator=g())
    for s in (u, ln, sh):
        assert 0 <= s.min() and s.max() <= 1
    assert abs(u.mean() - 0.5) < 0.01 and abs(u.std() - (1 / 12) ** 0.5) < 0.01
    assert abs(ln.median() - 0.5) < 0.01 and ln.std() < u.std()  # logit-normal: mass in the middle
    assert abs(sh.mean() - (3 * u / (1 + 2 * u)).mean()) < 0.01 and sh.mean() > 0.6  # shifted towards noise
    assert torch.equal(sh, W.shift_sigma(u, 3.0))  # 'shift' = the uniform draw, shifted


def test_lr_schedule():
    from common.schedule import lr_at
    assert lr_at(0, 1.0, 10, 110) == 0.1 and lr_at(9, 1.0, 10, 110) == 1.0 and lr_at(100, 1.0, 10, 110) == 1.0
    assert lr_at(10, 1.0, 10, 110, "cosine") == 1.0 and abs(lr_at(60, 1.0, 10, 110, "cosine") - 0.5) < 1e-12
    assert lr_at(110, 1.0, 10, 110, "cosine") == 0.0
