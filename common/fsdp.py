"""FSDP2 in every run, one process included (a shard degree of 1 still installs the mixed-precision policy),
so the 1-GPU path and the 8-GPU path are the same code. The torchtitan order: AC -> compile -> fully_shard."""
import torch
from torch.distributed.algorithms._checkpoint.checkpoint_wrapper import checkpoint_wrapper
from torch.distributed.checkpoint.state_dict import (StateDictOptions, get_model_state_dict,
                                                     set_model_state_dict)
from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard


def parallelize(model, blocks, compute_dtype=torch.bfloat16, ac=False, compile=False):
    """Wrap each block of `blocks` (an nn.ModuleList inside `model`) with activation checkpointing (optional),
    compile it in place (optional; in place means no `_orig_mod.` in any key) and shard it; then shard the root.
    Blocks compute in `compute_dtype`; the root (embeddings, time MLP, head) computes in fp32, which keeps the
    models' fp32 islands exact. Gradients are reduced in fp32. Inputs are not cast on the way in
    (cast_forward_inputs=False): the models cast explicitly, so the fp32 residual stream stays fp32."""
    block_mp = MixedPrecisionPolicy(param_dtype=compute_dtype, reduce_dtype=torch.float32, cast_forward_inputs=False)
    root_mp = MixedPrecisionPolicy(param_dtype=torch.float32, reduce_dtype=torch.float32, cast_forward_inputs=False)
    for i, block in enumerate(list(blocks)):
        if ac:
            block = checkpoint_wrapper(block, preserve_rng_state=False)
        if compile:
            block.compile()
        blocks.register_module(str(i), block)
        fully_shard(block, mp_policy=block_mp)
    fully_shard(model, mp_policy=root_mp)
    return model


def full_state_dict(model, only=None):
    """The whole (unsharded) state dict on CPU with clean key names (no AC/compile wrappers), on rank 0 only (the
    other ranks take part in the gathers and get an empty dict: a 14B model is not copied 8 times into host RAM).
    `only`: a predicate on the key, to keep e.g. just the LoRA tensors."""
    sd = get_model_state_dict(model, options=StateDictOptions(full_state_dict=True, cpu_offload=True))
    return {k: v for k, v in sd.items() if only is None or only(k)}


def load_full_state_dict(model, sd):
    """Load a full state dict that rank 0 holds (other ranks pass {}) into the sharded model: rank 0 broadcasts.
    Strictness is the caller's job (it knows which keys may be missing, e.g. fresh LoRA weights)."""
    set_model_state_dict(model, dict(sd), options=StateDictOptions(full_state_dict=True, broadcast_from_rank0=True,
                                                                   strict=False))
