"""benchmarks/attention.py (the joint-attention timing a lent GPU runs for issues 9 and 10): at its tiny shape on
the CPU every way of computing the masked joint attention agrees with masked SDPA on the rows that reach the
model's output (outputs and q/k/v gradients; flex_attention's forward only, as it has no CPU backward)."""
import importlib.util
import os

import pytest

PATH = os.path.join(os.path.dirname(__file__), "..", "benchmarks", "attention.py")


# compiled flex_attention: slow (30 s of compiling on CI's CPU); the default run checks the uncompiled flex math
@pytest.mark.parametrize("compile_flex", ["0", pytest.param("1", marks=pytest.mark.slow)])
def test_every_way_agrees_with_masked_sdpa(compile_flex):
    spec = importlib.util.spec_from_file_location("attention_bench", PATH)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    (res,) = mod.main(["--tiny", "--compile_flex", compile_flex])
    assert res["text"] == [9, 4] and res["tokens"] == 70
    for way in ("per_sample", "flex", "batch1"):
        assert res[f"{way}_maxdiff"] <= 1e-5, (way, res)
