"""UniPC sampler for Wan 2.1, a section of train_wan.py: it goes right after `sample_euler` ("Flow matching").
Until it is pasted there it imports the helpers it uses from train_wan; the import block below is the only part
that is not pasted."""
import math

import torch

from train_wan import sampling_sigmas, shift_sigma, velocity  # noqa: F401  (standalone only; drop when pasted)

# -----------------------------------------------------------------------------------------------------
# UniPC: the official Wan 2.1 sampler (FlowUniPCMultistepScheduler in wan/utils/fm_solvers_unipc.py, called by
# wan/text2video.py with solver_order 2, bh2, predict_x0, lower_order_final, final_sigmas_type zero), as a plain
# loop. Same sigmas as sample_euler; the ODE is solved in the half log-SNR lambda = log(alpha / sigma), alpha =
# 1 - sigma, where it is exactly linear in the x0 prediction m = x - sigma * v (an exponential integrator):
#   x_t = (sigma_t / sigma_s) * x_s - alpha_t * expm1(-h) * m + (terms in past m's),   h = lambda_t - lambda_s
# Each step k: 1 model call at x_k -> m_k; UniC corrects x_k (redoes step k-1 -> k, now also using m_k); UniP
# predicts x_{k+1} from the corrected x_k with m_k and m_{k-1}. Order 1 on the first step (no m_{k-1} yet) and on the
# last (sigma = 0, where the update is exactly x = m). Coefficients in float64 python floats (upstream: fp32 scalars).
#
# Model timesteps: upstream feeds the DiT int64(sigma * 1000), truncated (999 for sigma 0.9998), while the solver
# uses the float sigma; we do the same so that a released model sees exactly the timesteps it sees upstream.
# unipc_timesteps() recomputes them op for op as upstream does (numpy's linspace from sigma_max = fp32(0.999)):
# int(sampling_sigmas * 1000) would differ by 1 wherever sigma * 1000 lands on an integer (shift 1: steps 3, 6, 9, ...).


def unipc_timesteps(steps, shift):
    """The integer timesteps upstream's FlowUniPCMultistepScheduler.set_timesteps(steps, shift=shift) passes to the
    model -> (steps,) int64. Its training table stores sigma_max = 1 - 1/1000 in fp32 (0.99900001287...), and
    np.linspace(a, 0, n + 1) computes a + i * ((0 - a) / n); the shift is in float64; astype(int64) truncates."""
    sigma_max = float(torch.tensor(0.999, dtype=torch.float32))
    s = torch.arange(steps + 1, dtype=torch.float64) * ((0 - sigma_max) / steps) + sigma_max
    return (shift_sigma(s[:-1], shift) * 1000).long()  # .long() truncates toward zero like astype(int64)


def _x0_step(x, m, s, s_next):
    """First-order exponential-integrator step from sigma s to s_next (> 0), x0-prediction form; also the base of
    every higher-order step. x, m (B,C,F,H,W). Returns (x_next, alpha_next * expm1(-h), h)."""
    h = math.log((1 - s_next) / s_next) - math.log((1 - s) / s)  # lambda_next - lambda > 0 (sigma decreases)
    a_e = (1 - s_next) * math.expm1(-h)  # alpha_next * (exp(-h) - 1) < 0
    return (s_next / s) * x - a_e * m, a_e, h


@torch.no_grad()
def sample_unipc(model, noise, context, neg_context=None, steps=50, guidance=5.0, shift=5.0):
    """UniPC-2 (bh2) flow-matching sampler, the official Wan 2.1 inference loop, from sigma = 0.999 (shifted) to 0.
    noise (B,C,F,H,W); context, neg_context (B,L,D); guidance as in `velocity`. -> x0 estimate (B,C,F,H,W) fp32."""
    sigmas = sampling_sigmas(steps, shift).tolist()  # (steps + 1,), last one 0
    lam = [math.log((1 - s) / s) if s > 0 else math.inf for s in sigmas]  # half log-SNR per sigma, increasing
    ts = unipc_timesteps(steps, shift).tolist()  # (steps,) ints the model sees
    x = noise.float()
    x_last = None  # x_{k-1}: the (corrected) point the previous predictor started from
    ms = []  # x0 predictions m_{k-2}, m_{k-1}, m_k (only the last 3 are kept)
    order_last = 1  # order of the previous predictor = order of this step's corrector
    for k in range(steps):
        # t/1000 * 1000 rounds back to the integer t in velocity's fp32 timestep (checked for t = 0..1000)
        v = velocity(model, x, ts[k] / 1000, context, neg_context, guidance)
        ms = (ms + [x - sigmas[k] * v])[-3:]  # m_k, from the *uncorrected* x_k, as upstream
        m = ms[-1]

        if k > 0:  # UniC: redo step k-1 -> k from x_{k-1}, using m_{k-1} and the new m_k (and m_{k-2} if order 2)
            x, a_e, h = _x0_step(x_last, ms[-2], sigmas[k - 1], sigmas[k])
            d_t = m - ms[-2]
            if order_last == 1:
                x = x - a_e * 0.5 * d_t  # upstream fixes rho = 0.5 for the order-1 corrector (the trapezoid rule)
            else:
                # rho solves [[1, 1], [r, 1]] @ rho = b, with r the previous lambda step relative to this one and b the
                # bh2 weights of the phi functions; D1 the backward difference of m over that previous step
                r = (lam[k - 2] - lam[k - 1]) / h  # < 0
                d1 = (ms[-3] - ms[-2]) / r
                phi1 = math.expm1(-h) / -h - 1  # upstream's h_phi_k after the first and second update
                phi2 = phi1 / -h - 0.5
                b1, b2 = phi1 / math.expm1(-h), 2 * phi2 / math.expm1(-h)
                rho0 = (b1 - b2) / (1 - r)
                rho1 = b1 - rho0
                x = x - a_e * (rho0 * d1 + rho1 * d_t)

        # UniP: predict x_{k+1}. Order 1 on the first step (warm-up) and the last (lower_order_final; sigma = 0)
        order = 1 if k == 0 or k == steps - 1 else 2
        x_last, order_last = x, order
        if sigmas[k + 1] == 0:  # lambda = inf: exp(-h) = 0, the step lands on the x0 prediction itself
            x = m
        else:
            x, a_e, h = _x0_step(x, m, sigmas[k], sigmas[k + 1])
            if order == 2:  # + alpha * expm1(-h) * 0.5 * D1 (bh2 predictor with upstream's fixed rho = 0.5)
                r = (lam[k - 1] - lam[k]) / h
                x = x - a_e * 0.5 * (ms[-2] - m) / r
    return x
