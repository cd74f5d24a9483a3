"""FSDP2 in every run, one process included (a shard degree of 1 still installs the mixed-precision policy),
so the 1-GPU path and the 8-GPU path are the same code. The torchtitan order: AC -> compile -> fully_shard.

--shard N (every script): each weight is sharded over N consecutive ranks and the world / N groups of them hold
replicas (HSDP: FSDP2 on a 2-D mesh (replicate, shard)); gradients are reduce-scattered in a group and all-reduced
across groups, the same mean over all ranks. 0 (the default) = N = world: every rank holds 1/world. A LoRA of a
model that fits one GPU is fastest at --shard 1 (every GPU holds the whole base, as DDP: no all-gather of the base
in each forward and backward, only the adapters' gradients cross the network); a full fine-tune across nodes at
--shard <GPUs per node> (the all-gathers stay inside a node). The math does not change: the tests compare losses
and gradient norms with one process, and a checkpoint resumes at any other --shard or world size (DCP reshards)."""
import torch
from torch.distributed.algorithms._checkpoint.checkpoint_wrapper import checkpoint_wrapper
from torch.distributed.checkpoint.state_dict import StateDictOptions, set_model_state_dict
from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard
from torch.distributed.tensor import DTensor

from common.offload import HostStack


MESHES = {}  # shard degree -> its device mesh: built once a process (Wan 2.2's two experts share it)


def fsdp_mesh(shard):
    """The mesh fully_shard gets for --shard `shard` (common/sp.py data_parallel checks it divides the world):
    None for 0 or the world size (FSDP2's default, every rank one shard), else (world / shard, shard) named
    ("replicate", "shard") over consecutive ranks. Collective the first time (it makes process groups)."""
    world = torch.distributed.get_world_size()
    if not shard or shard == world:
        return None
    if shard not in MESHES:
        from torch.distributed.device_mesh import init_device_mesh
        MESHES[shard] = init_device_mesh("cuda" if torch.cuda.is_available() else "cpu", (world // shard, shard),
                                         mesh_dim_names=("replicate", "shard"))
    return MESHES[shard]


PARKED = HostStack()  # one per process: the models parallelize() wraps share it (Wan 2.2's two experts, which take
# turns, reuse the same chunks instead of holding two sets)


def park_hidden_states(wrapper, block, stack):
    """--ac 2: activation checkpointing whose saved block inputs live in CPU memory. A checkpointed block keeps its
    inputs from forward to backward, and those are what the device fills up with once every block is
    checkpointed: per block the hidden states (B, L, D), fp32 (HunyuanVideo at 544x960x129: 67k tokens x 3072 x 4
    bytes = 0.83 GB, 50 GB over its 60 blocks). Here the checkpoint `wrapper` is handed, as its first input, a
    detached copy of the hidden states in host memory, in `stack` (common/offload.py HostStack: pinned chunks shared
    by the blocks, a non-blocking copy): that copy is what the checkpoint keeps for its recompute. `block`, inside
    the checkpoint, runs the forward on the hidden states themselves (handed over through `where`, and dropped from
    there at once: the checkpoint keeps no reference to them, so they are freed when the caller is done), so the
    gradient flows on the device and never through host memory; the recompute in the backward copies the parked
    copy back (non-blocking, from pinned memory) as a leaf that requires grad as the original did, so that it saves
    what the forward saved. The CUDA
    stream orders both copies; nothing waits on the host. The other inputs (text, time modulation, RoPE) are
    shared by all blocks and stay. Under no_grad (sampling) nothing is parked: there is no backward to recompute
    for. On CPU both copies are no-ops: bitwise the plain checkpoint. (The tests park in a HostStack that copies on
    CPU, to see the device tensors freed.)"""
    where = {}

    def to_host(module, args):  # the wrapper's: once per forward, outside the checkpoint
        x = args[0]
        where.update(x=x, like=(x.device, x.dtype, x.requires_grad))
        if not torch.is_grad_enabled():
            return args
        return (stack.park(x), *args[1:])

    def to_device(module, args):  # the block's: in the forward and again in the backward's recompute
        x = where.pop("x", None)
        if x is None:  # the recompute: the parked copy back
            device, dtype, grad = where["like"]
            x = args[0].to(device, dtype, non_blocking=True).requires_grad_(grad)
        return (x, *args[1:])

    wrapper.register_forward_pre_hook(to_host)
    block.register_forward_pre_hook(to_device)


def parallelize(model, blocks, compute_dtype=torch.bfloat16, ac=0, compile=False, ac_interval=1, shard=0):
    """Wrap each block of `blocks` (an nn.ModuleList inside `model`, or a list of them, e.g. HunyuanVideo's
    [double_blocks, single_blocks]) with activation checkpointing (ac 1; ac 2: with the saved block inputs in CPU
    memory, park_hidden_states); with ac_interval N only every N-th block (0, N, 2N, ... counted over all the lists:
    the others keep their activations, which costs memory and saves their recompute),
    compile it in place (optional; in place means no `_orig_mod.` in any key) and shard it; then shard the root.
    Blocks compute in `compute_dtype`; the root (embeddings, time MLP, head) computes in fp32, which keeps the
    models' fp32 islands exact. Gradients are reduced in fp32. Inputs are not cast on the way in
    (cast_forward_inputs=False): the models cast explicitly, so the fp32 residual stream stays fp32. shard: --shard
    (fsdp_mesh: 0 = over all ranks; N: over N ranks, replicated across the world / N groups)."""
    mesh = fsdp_mesh(shard)
    block_mp = MixedPrecisionPolicy(param_dtype=compute_dtype, reduce_dtype=torch.float32, cast_forward_inputs=False)
    root_mp = MixedPrecisionPolicy(param_dtype=torch.float32, reduce_dtype=torch.float32, cast_forward_inputs=False)
    lists = [blocks] if isinstance(blocks, torch.nn.ModuleList) else list(blocks)
    if compile:
        # One static graph per latent shape (bucket) instead of a dynamic-shape graph; the default limit of 8
        # recompiles would send a dataset with more buckets back to eager without a word.
        import torch._dynamo.config as dynamo_config
        dynamo_config.cache_size_limit = max(dynamo_config.cache_size_limit, 64)
        dynamo_config.accumulated_cache_size_limit = max(
            dynamo_config.accumulated_cache_size_limit, 64 * sum(len(b) for b in lists))
    n = 0  # the blocks seen so far, over all the lists
    for blist in lists:
        for i, block in enumerate(list(blist)):
            wrap = ac and n % ac_interval == 0
            n += 1
            if wrap:
                inner, block = block, checkpoint_wrapper(block, preserve_rng_state=False)
                if ac == 2:
                    park_hidden_states(block, inner, PARKED)  # one set of pinned chunks for all the blocks
            if compile and wrap and ac == 2:  # the forward only: the parking hooks (copies to and from the host,
                inner.forward = torch.compile(inner.forward, dynamic=False)  # and the hand-over) stay outside
            elif compile:
                block.compile(dynamic=False)
            blist.register_module(str(i), block)
            fully_shard(block, mesh=mesh, mp_policy=block_mp)
    fully_shard(model, mesh=mesh, mp_policy=root_mp)
    return model


def clean_name(name):
    """A parameter name without the AC/compile wrappers' parts (the checkpoint's own key)."""
    return name.replace("_checkpoint_wrapped_module.", "").replace("_orig_mod.", "")


def gather_params(model, only=None):
    """{clean name: full tensor on CPU} of the parameters (and buffers) whose clean name passes `only`, on rank 0
    (other ranks take part in the gathers and get {}). Gathers tensor by tensor, and only those asked for: a LoRA
    export never materialises the frozen base."""
    rank0 = not torch.distributed.is_initialized() or torch.distributed.get_rank() == 0
    out = {}
    for name, t in [*model.named_parameters(), *model.named_buffers()]:
        name = clean_name(name)
        if only is not None and not only(name):
            continue
        t = t.detach()
        t = t.full_tensor() if isinstance(t, DTensor) else t  # collective: every rank walks the same names
        if rank0:
            out[name] = t.cpu()
    return out


def load_full_state_dict(model, sd):
    """Load a full state dict that rank 0 holds (other ranks pass {}) into the sharded model: rank 0 broadcasts.
    Strictness is the caller's job (it knows which keys may be missing, e.g. fresh LoRA weights)."""
    set_model_state_dict(model, dict(sd), options=StateDictOptions(full_state_dict=True, broadcast_from_rank0=True,
                                                                   strict=False))
