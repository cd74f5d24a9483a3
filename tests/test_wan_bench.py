"""The FLOP formula behind MFU equals what torch's FLOP counter measures on the real forward."""
import pytest
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


# slow: 4 benches in subprocesses; what it guards (PyAV imported only where a video is read) changes rarely
@pytest.mark.slow
def test_bench_runs_without_pyav(tmp_path):
    """A GPU machine may have torch but not PyAV: --mode bench (random data) reads and writes no video, so every script
    runs it with `av` unimportable (data/video.py imports PyAV only where a file is read or written)."""
    import subprocess
    import sys
    from tests.procs import ROOT
    code = ("import sys, runpy; sys.modules['av'] = None; sys.argv = [sys.argv[1], '--mode', 'bench', '--preset', "
            "'tiny', '--bench_steps', '1', '--out_dir', sys.argv[2]]; runpy.run_path(sys.argv[0], run_name='__main__')")
    for script in ("train_wan.py", "train_ltx.py", "train_hunyuan.py", "train_mochi.py"):
        p = subprocess.run([sys.executable, "-c", code, script, str(tmp_path / script)], cwd=ROOT,
                           capture_output=True, text=True, timeout=300)
        assert p.returncode == 0 and '"step_s"' in p.stdout, (script, p.stderr[-2000:])
