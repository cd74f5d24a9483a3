"""Flag checks of train_wan.py that need no checkpoint (check_args in this process)."""
import pytest

import train_wan as W


def test_timestep_sampling_shift_needs_a_shift():
    """`--timestep_sampling shift` is U(0,1) through --shift (DiffSynth's recipe; musubi's `shift` is sigmoid(N(0,1))
    first): at the default --shift 1 it would be plain uniform, silently, so it is refused, naming musubi's
    equivalent."""
    base = W.Args(mode="bench", preset="tiny", timestep_sampling="shift")
    with pytest.raises(W.UserError, match=r"shift with --shift 1 is plain uniform: .*logit_normal --shift N here"):
        W.check_args(base)
    W.check_args(W.Args(mode="bench", preset="tiny", timestep_sampling="shift", shift=3.0))
    W.check_args(W.Args(mode="bench", preset="tiny", timestep_sampling="uniform"))
