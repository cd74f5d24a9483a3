"""common/preflight.py: the micro-batch it picks, what it leaves behind, and the error a device too small gets.
(That a run with it is bitwise a run without it is checked through each script: tests/checks.py,
check_interrupted_run_resumes_exactly.)"""
import pytest
import torch
import torch.nn as nn

from common import preflight
from common.args import UserError


def test_largest_bucket_wrapped_to_the_micro_batch():
    entries = [{"bucket": b} for b in ([64, 64, 9], [32, 96, 17], [96, 32, 17], [64, 64, 1], [32, 96, 17])]
    idx, bucket = preflight.largest(entries, 3)
    assert bucket == (96, 32, 17)  # 32x96x17 ties it: the larger tuple, so every rank picks the same one
    assert idx == [2, 2, 2]  # one sample, wrapped to fill the micro-batch
    idx, bucket = preflight.largest(entries[:2] + entries[4:], 3)
    assert bucket == (32, 96, 17) and idx == [1, 2, 1]


def test_run_drops_the_gradients_and_says_what_ran():
    m = nn.Linear(4, 2)
    said = []
    assert preflight.run(lambda: m(torch.ones(3, 4)).sum().backward(), m, torch.device("cpu"), "3 x 9 frames at "
                         "64x64 (the largest bucket)", said.append) is None
    assert all(p.grad is None for p in m.parameters())
    assert said and said[0].startswith("preflight: one forward + backward of 3 x 9 frames at 64x64")


def test_out_of_memory_is_a_user_error_naming_the_batch_and_the_flags():
    m = nn.Linear(4, 2)

    def oom():
        m(torch.ones(3, 4)).sum().backward()
        raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 20.00 GiB")
    with pytest.raises(UserError) as e:
        preflight.run(oom, m, torch.device("cpu"), "2 x 81 frames at 480x832 (the largest bucket)")
    msg = str(e.value)
    assert "2 x 81 frames at 480x832" in msg and "--ac 1" in msg and "--micro_batch" in msg
    assert "--preflight 0" in msg and "\n" not in msg
    assert e.value.this_rank  # printed by the rank that ran out, whichever it is (common/args.py cli)
    assert all(p.grad is None for p in m.parameters())


def test_check_loads_the_largest_and_runs_the_scripts_loss():
    class Model(nn.Linear):
        synced = None

        def set_requires_gradient_sync(self, on):  # FSDP2's, which every script's model has
            self.synced = on
    m = Model(4, 4)
    entries = [{"bucket": [8, 8, 5]}, {"bucket": [16, 16, 9]}, {"bucket": [16, 16, 9]}]
    loaded, seen, said = [], [], []

    def load(idx):
        loaded.append(idx)
        return {"latents": torch.ones(len(idx), 4)}

    def loss(b, x0, sigma, eps):
        seen.append((x0.shape, sigma.tolist(), eps.shape))
        return (m(x0 + eps) * sigma[:, None]).square().mean()
    preflight.check(entries, 2, load, loss, m, torch.device("cpu"), sp=2, log=said.append)
    assert loaded == [[1, 2]] and seen == [((2, 4), [0.5, 0.5], (2, 4))] and m.synced is True
    assert all(p.grad is None for p in m.parameters())
    assert said[0].startswith("preflight: one forward + backward of 2 x 9 frames at 16x16 (the largest bucket)")
