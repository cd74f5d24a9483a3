"""Learning-rate schedule and an EMA of the weights: the small optimisation pieces every script shares."""
import math

import torch


def lr_at(step, lr, warmup_steps, max_steps, schedule="constant"):
    """Linear warmup to `lr` over `warmup_steps`, then constant or cosine down to 0 at `max_steps`. step counts from 0."""
    if step < warmup_steps:
        return lr * (step + 1) / warmup_steps
    if schedule == "cosine":
        p = (step - warmup_steps) / max(1, max_steps - warmup_steps)
        return lr * 0.5 * (1 + math.cos(math.pi * min(1.0, p)))
    if schedule != "constant":
        raise ValueError(f"unknown lr schedule {schedule!r} (constant | cosine)")
    return lr


def _local(t):
    """The rank's own shard of an FSDP2 DTensor (a view: writing it writes the DTensor), or `t` itself."""
    return t.to_local() if hasattr(t, "to_local") else t


class EMA:
    """An exponential moving average of `params` (the trainable ones), kept in fp32 beside them. Works on FSDP2's
    sharded parameters as they are (each rank averages its own shard), so it costs one fp32 copy of a shard.

    The decay warms up as min(decay, (1 + n) / (10 + n)) after n updates: early on the average follows the weights
    closely (a from-scratch model moves fast), later it averages over about 1 / (1 - decay) steps."""

    def __init__(self, named_params, decay):
        self.decay, self.updates = decay, 0
        self.names = [n for n, _ in named_params]
        self.params = [p for _, p in named_params]
        self.shadow = [p.detach().clone().float() for p in self.params]

    @torch.no_grad()
    def update(self):
        d = min(self.decay, (1 + self.updates) / (10 + self.updates))
        self.updates += 1
        # one foreach call on the plain local tensors: a per-parameter op on a DTensor costs a Python dispatch,
        # which on a small model is more than the arithmetic (the toy has 123 tensors)
        torch._foreach_lerp_([_local(s) for s in self.shadow], [_local(p).float() for p in self.params],
                             1 - d)

    def state_dict(self):  # DTensor shards under FSDP2: torch.distributed.checkpoint reshards them on load
        return {"updates": self.updates, **dict(zip(self.names, self.shadow))}

    def load_state_dict(self, sd):
        self.updates = int(sd["updates"])
        with torch.no_grad():
            for n, s in zip(self.names, self.shadow):
                s.copy_(sd[n])

    @torch.no_grad()
    def swap(self):
        """Exchange the live weights and the averages (call twice to undo): sample or export with the EMA weights."""
        for s, p in zip(self.shadow, self.params):
            tmp = p.detach().clone()
            p.copy_(s)
            s.copy_(tmp)


def param_groups(named, lora_plus=1.0):
    """AdamW's parameters from [(name, parameter)]: as they are, or with LoRA+ (lora_plus != 1) in two groups, the
    lora_B matrices at lora_plus times the schedule's lr (Hayou et al. 2024: B learns with a larger step than A; the
    paper's ratio is 16, musubi-tuner's loraplus_lr_ratio). The training loop sets each group's lr to the schedule's
    times its "lr_mult"."""
    if lora_plus == 1:
        return [p for _, p in named]
    return [{"params": [p for n, p in named if ".lora_B." not in n], "lr_mult": 1.0},
            {"params": [p for n, p in named if ".lora_B." in n], "lr_mult": lora_plus}]
