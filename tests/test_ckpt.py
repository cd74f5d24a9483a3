"""common/ckpt.py with frozen weights (every LoRA run): a checkpoint holds only the trainable tensors, loads back
into a model whose frozen base came from elsewhere, and refuses a model that trains more than was saved."""
import pytest
import torch
import torch.nn as nn
from torch.distributed.fsdp import fully_shard

from common import ckpt
from tests.procs import gloo_world_of_one, losses, toy_runner


def _model(seed, frozen=("0",)):
    torch.manual_seed(seed)
    m = nn.Sequential(nn.Linear(4, 4), nn.Linear(4, 4))
    for name, p in m.named_parameters():
        p.requires_grad_(name.split(".")[0] not in frozen)
    fully_shard(m)
    return m, torch.optim.AdamW([p for p in m.parameters() if p.requires_grad], lr=0.1)


def test_checkpoint_of_a_partly_frozen_model_loads_back(tmp_path):
    with gloo_world_of_one():
        m, opt = _model(0)
        m(torch.randn(2, 4)).sum().backward()
        opt.step()
        ckpt.save(str(tmp_path), 1, m, opt, {"step": 1})
        saved = {k: v.full_tensor().clone() for k, v in m.state_dict().items()}
        m2, opt2 = _model(1)  # other random weights everywhere; its frozen layer stands for "the base, reloaded"
        base = m2[0].weight.full_tensor().clone()
        assert ckpt.load(str(tmp_path), 1, m2, opt2) == {"step": 1}
        got = {k: v.full_tensor() for k, v in m2.state_dict().items()}
        assert got["1.weight"].equal(saved["1.weight"]) and got["1.bias"].equal(saved["1.bias"])
        assert got["0.weight"].equal(base)  # the frozen weights are not the checkpoint's business
        assert opt2.state_dict()["state"][0]["exp_avg"].abs().sum() > 0  # the optimizer state came back too
        m3, opt3 = _model(2, frozen=())  # trains layer 0 too, which the checkpoint does not hold
        with pytest.raises(RuntimeError, match=r"step_00000001: .*Missing key in checkpoint state_dict: model\.0\.weight"):
            ckpt.load(str(tmp_path), 1, m3, opt3)


run = toy_runner("train_wan.py")


# slow: LoRA resume is also exact in each script's memory-flag resume test and its main() resume to step 6
@pytest.mark.slow
def test_lora_run_resumes_exactly(toy, tmp_path):
    """A LoRA run checkpointed at step 2 and resumed with --resume 1 logs the uninterrupted run's losses."""
    run(toy, tmp_path / "base", "--max_steps", "2")
    flags = ["--lora_rank", "4", "--lr", "1e-2", "--dit_path", str(tmp_path / "base" / "model.safetensors")]
    run(toy, tmp_path / "full", "--max_steps", "4", *flags)
    run(toy, tmp_path / "cut", "--max_steps", "2", "--ckpt_every", "2", *flags)
    run(toy, tmp_path / "cut", "--max_steps", "4", "--resume", "1", *flags)
    a, b = losses(tmp_path / "full"), losses(tmp_path / "cut")
    assert sorted(b) == [1, 2, 3, 4] and all(a[s] == b[s] for s in (3, 4)), (a, b)
