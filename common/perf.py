"""Speed and memory figures for logs and --mode bench: device peak FLOPs (for MFU), peak memory, a step timer."""
import time

import torch

# dense bf16 tensor-core peaks, TFLOP/s (no sparsity; NVIDIA's datasheets give twice these "with sparsity"), by a
# substring of torch.cuda.get_device_name(), the first that matches: the PCIe and NVL cards before their SXM names
PEAK_TFLOPS = (("H200 NVL", 835), ("H200", 989), ("H100 NVL", 835), ("H100 PCIe", 756), ("H100", 989),
               ("H800", 989), ("B200", 2250), ("A100", 312), ("A800", 312), ("L40S", 362), ("L40", 181),
               ("4090", 165), ("3090", 71), ("A10", 125), ("A6000", 155))


def device_peak_flops(device, override_tflops=0.0):
    """FLOP/s of the device's dense bf16 peak, or None where unknown (CPU): MFU is then not reported."""
    if override_tflops:
        return override_tflops * 1e12
    if device.type == "cuda":
        name = torch.cuda.get_device_name(device)
        for key, tf in PEAK_TFLOPS:
            if key in name:
                return tf * 1e12
    return None


def device_name(device):
    return torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu"


def peak_memory_gb(device):
    """Peak GPU memory allocated by torch; on CPU the process's peak resident memory (all of it, not just torch)."""
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**30
    import resource
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20  # Linux reports KiB


def pinned_gb(device):
    """Pinned host memory held by torch's caching host allocator, in use or cached (it keeps what it was given):
    --offload's chunks, --ac 2's parked inputs and the loader's pinned batches, GiB; None off CUDA."""
    if device.type != "cuda" or not hasattr(torch.cuda, "host_memory_stats"):  # (torch >= 2.7)
        return None
    return torch.cuda.host_memory_stats().get("allocated_bytes.current", 0) / 2**30


def reset_peak_memory(device):
    """Start the peak-memory count afresh (before the training loop: the caching encoders and the weight broadcast,
    which ran on the same device, are not the steps' memory)."""
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)


class StepTimer:
    """Wall time of a step, synchronising CUDA at both ends (so queued kernels are counted where they run).
    Only --mode bench uses it: the training loop does not synchronise the GPU every step."""

    def __init__(self, device):
        self.device = device

    def _sync(self):
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)

    def __enter__(self):
        self._sync()
        self.t0 = time.perf_counter()
        return self

    def __exit__(self, *exc):
        self._sync()
        self.seconds = time.perf_counter() - self.t0
