"""Pre-emption: SIGTERM (torchrun, SLURM and Kubernetes send it ~30 s before killing) or Ctrl-C sets a flag, and
the training loop asks `requested()` between micro-batches, so a long step with accumulation is cut short instead
of running past the kill. All ranks must agree to stop at the same point, or one rank leaves a collective the others
wait in: requested() is itself a (tiny, CPU) all-reduce, so every rank has to call it at the same places."""
import signal

import torch
import torch.distributed as dist


class StopSignal:
    def __init__(self, signals=(signal.SIGTERM, signal.SIGINT)):
        self.flag = False
        for s in signals:
            signal.signal(s, self._handler)

    def _handler(self, signum, frame):
        self.flag = True

    def requested(self):
        """True on every rank if any rank got a signal (collective)."""
        t = torch.tensor([float(self.flag)])  # CPU: goes through gloo, never waits on the GPU queue
        if dist.is_initialized() and dist.get_world_size() > 1:
            dist.all_reduce(t, op=dist.ReduceOp.MAX, group=_cpu_group())
        self.flag = bool(t.item())
        return self.flag


_GROUP = []


def _cpu_group():
    # the default group is "cuda:nccl,cpu:gloo" on GPU (common/dist.py): a CPU tensor already takes gloo; a plain
    # nccl group (someone else's init) gets a gloo group of its own once
    if not _GROUP:
        backend = str(dist.get_backend())
        _GROUP.append(None if "gloo" in backend else dist.new_group(backend="gloo"))
    return _GROUP[0]
