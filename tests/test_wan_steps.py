"""The pieces of train_wan.py's training step, in process: caption dropout (seeded, per sample, the empty prompt's
context), the gradient-reduction policy under FSDP2 (a full fine-tune never holds unsharded fp32 gradients), the
RoPE table cache, and --help showing every flag's description."""

import pytest
import torch

import train_wan as W
from common.args import field_comments
from tests.helpers import dit_inputs, tiny_dit
from tests.procs import gloo_world_of_one, run_script



def test_caption_dropout_draws_are_seeded_per_sample():
    args = W.Args(caption_dropout=0.3, seed=5)
    sig, drop = W.training_draws(args, step=3, index=0, n=2000, device="cpu")
    assert 0.25 < drop.float().mean() < 0.35 and 0 < sig.min() and sig.max() < 1
    # the draws of sample i do not depend on which micro-batch (or rank) it came with
    sig2, drop2 = W.training_draws(args, step=3, index=1000, n=1000, device="cpu")
    assert torch.equal(sig[1000:], sig2) and torch.equal(drop[1000:], drop2)
    _, none = W.training_draws(W.Args(caption_dropout=0.0), 3, 0, 100, "cpu")
    assert not none.any()


def test_drop_captions_puts_the_empty_prompt_in_dropped_rows():
    ctx = torch.randn(3, 4, 8)
    empty = torch.randn(1, 8)  # umT5 of "": just the end token
    out = W.drop_captions(ctx, torch.tensor([False, True, False]), empty)
    assert torch.equal(out[0], ctx[0]) and torch.equal(out[2], ctx[2])
    assert torch.equal(out[1, :1], empty) and not out[1, 1:].any()  # zero-padded like every context
    longer = W.drop_captions(ctx[:, :0], torch.tensor([True, True, True]), empty)  # empty is longer: pad the batch
    assert longer.shape == (3, 1, 8)
    assert W.drop_captions(ctx, torch.tensor([False] * 3), empty) is ctx


@pytest.fixture
def pg():
    with gloo_world_of_one():
        yield


@pytest.mark.parametrize("lora_rank", [0, 4])
def test_full_fine_tune_reduces_every_micro_batch(pg, lora_rank):
    """After the first of two micro-batches, a full fine-tune already has its (sharded) gradients: FSDP2 reduced
    them, and holds no unsharded copy. LoRA accumulates unsynced: no gradient until the last micro-batch."""
    from common.fsdp import parallelize
    args = W.Args(lora_rank=lora_rank)
    cfg = W.DIT_PRESETS["tiny"]
    model = tiny_dit()
    if lora_rank:
        model.blocks.to(torch.float32)
        W.add_lora(model, lora_rank, lora_rank)
        with torch.no_grad():
            for n, p in model.named_parameters():
                if ".lora_" in n:
                    p.normal_(0, 0.1)
    parallelize(model, model.blocks, torch.float32)
    x, t, ctx = dit_inputs(cfg, B=1)
    trained = [p for p in model.blocks[0].parameters() if p.requires_grad]
    for m in range(2):
        model.set_requires_gradient_sync(W.reduce_now(args, m, 2))
        model(x, t, ctx).square().mean().backward()
        has_grad = all(p.grad is not None for p in trained)
        assert has_grad == (lora_rank == 0 or m == 1), (lora_rank, m)


def test_rope_tables_are_cached_per_grid():
    m = tiny_dit()
    x, t, ctx = dit_inputs(m.cfg)
    with torch.no_grad():
        a = m(x, t, ctx)
        assert len(m.rope_cache) == 1
        b = m(x, t, ctx)
        m(x[:, :, :1], t, ctx)
    assert torch.equal(a, b) and len(m.rope_cache) == 2
    assert "rope_cache" not in str(m.state_dict().keys())


def test_help_describes_every_flag():
    out = run_script("train_wan.py", ["--help"]).stdout
    flat = " ".join(out.split())
    assert "--lora_rank LORA_RANK LoRA rank; 0 = full fine-tune (default: 0)" in flat
    assert "--caption_dropout CAPTION_DROPOUT probability that a sample trains with the empty prompt" in flat
    missing = [f.name for f in W.dataclasses.fields(W.Args) if f.name not in field_comments(W.Args)]
    assert not missing, missing


def test_compile_allows_a_graph_per_bucket(pg):
    """--compile builds one static graph per latent shape; Dynamo's default limit (8 recompiles) would send a
    dataset with more buckets back to eager without a word, so parallelize raises it."""
    import torch._dynamo.config as dc

    from common.fsdp import parallelize
    before = dc.cache_size_limit
    try:
        dc.cache_size_limit = 8
        model = tiny_dit()
        parallelize(model, model.blocks, torch.float32, compile=True)
        assert dc.cache_size_limit >= 64 and dc.accumulated_cache_size_limit >= 64 * len(model.blocks)
    finally:
        dc.cache_size_limit = before
