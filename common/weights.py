"""Reading weight files and checking them against a model: what every script's loader needs, model-agnostic.

    files = safetensors_files(folder, "diffusion_pytorch_model")   # one file, or the shards of its index
    sd = read_safetensors(files, dtype=torch.bfloat16)              # cast tensor by tensor while reading
    check_keys(model.state_dict(), sd, path, hint="...")           # names the missing and unexpected keys
"""
import json
import os

import torch
from safetensors import safe_open


def read_safetensors(files, dtype=None):
    """Read one or more .safetensors files into one dict on CPU, casting each floating tensor as it is read (so a
    57 GB fp32 checkpoint needs 28.6 GB of host memory when it is wanted in bf16). ComfyUI's fp8_scaled files
    (mochi_preview_fp8_scaled, t5xxl_fp8_e4m3fn_scaled, ...) come back dequantized: dequantize_scaled_fp8."""
    sd = {}
    for fn in files:
        with safe_open(fn, framework="pt", device="cpu") as f:
            for k in f.keys():
                t = f.get_tensor(k)
                keep = t.element_size() == 1 or k.endswith(SCALE_KEYS)  # fp8 and its fp32 scale: cast after
                sd[k] = t.to(dtype) if dtype is not None and t.is_floating_point() and not keep else t
    sd = dequantize_scaled_fp8(sd, lambda k: dtype or torch.float32)
    return sd if dtype is None else {k: v.to(dtype) if v.is_floating_point() and v.element_size() == 1 else v
                                     for k, v in sd.items()}  # unscaled fp8 (a plain cast) and nothing else


SCALE_KEYS = (".scale_weight", ".scale_input")


def dequantize_scaled_fp8(sd, dtype_of):
    """ComfyUI's "fp8_scaled" files (a DiT's or a text encoder's): an fp8 `<name>.weight` with a per-tensor fp32
    `<name>.scale_weight`, plus markers that hold no weight (the top-level `scaled_fp8`, `<name>.scale_input`).
    -> sd with each such weight = weight.float() * scale, cast at once to dtype_of(its key) (a tensor at a time: no fp32
    copy of the model is ever made), the scales and markers gone. Works on meta tensors too (the header's shapes)."""
    for k in [k for k in sd if k.endswith(".scale_weight")]:
        w = k[: -len("scale_weight")] + "weight"
        sd[w] = (sd[w].float() * sd.pop(k).float()).to(dtype_of(w))
    return {k: v for k, v in sd.items() if k != "scaled_fp8" and not k.endswith(".scale_input")}


def safetensors_header(file):
    """(metadata dict, {key: shape}) of a .safetensors file, reading only its header (no tensor data)."""
    with open_safetensors(file) as f:
        return dict(f.metadata() or {}), {k: tuple(f.get_slice(k).get_shape()) for k in f.keys()}


def open_safetensors(file):
    """safe_open(file) on CPU; a folder, or a file that is not a whole .safetensors (a .pt renamed, a download cut
    short), is a ValueError naming the file instead of the reader's bare "header too small" / "os error 19"."""
    from safetensors import SafetensorError
    if os.path.isdir(file):
        raise ValueError(f"{file}: a folder, where a .safetensors file was expected")
    try:
        return safe_open(file, framework="pt", device="cpu")
    except SafetensorError as e:
        raise ValueError(f"{file}: not a readable .safetensors file ({e})") from None


def read_pth(path):
    """A .pth state dict. weights_only: a .pth is a pickle, and this way it cannot run code; mmap: no second copy
    in RAM (tensors are paged in from the file as they are used)."""
    return torch.load(path, map_location="cpu", weights_only=True, mmap=True)


def read_weights(path, dtype=None):
    """A .safetensors or .pth file -> state dict on CPU."""
    path = str(path)
    if path.endswith(".safetensors"):
        return read_safetensors([path], dtype)
    sd = read_pth(path)
    return sd if dtype is None else {k: v.to(dtype) if v.is_floating_point() else v for k, v in sd.items()}


def safetensors_files(folder, stem):
    """<stem>.safetensors, or the shards listed in <stem>.safetensors.index.json."""
    index = os.path.join(folder, stem + ".safetensors.index.json")
    if os.path.exists(index):
        with open(index) as f:
            return [os.path.join(folder, s) for s in sorted(set(json.load(f)["weight_map"].values()))]
    single = os.path.join(folder, stem + ".safetensors")
    if os.path.exists(single):
        return [single]
    raise FileNotFoundError(f"{folder}: neither {stem}.safetensors nor {stem}.safetensors.index.json is there")


def _show(keys, n=8):
    return ", ".join(keys[:n]) + (f" ... ({len(keys)} in all)" if len(keys) > n else "")


def check_keys(expected, got, path, ignore=lambda k: False, hint=""):
    """Fail with the names of the missing and unexpected keys (the first few of each) and a hint."""
    expected = {k for k in expected if not ignore(k)}
    missing, unexpected = sorted(expected - set(got)), sorted(set(got) - expected)
    if missing or unexpected:
        raise KeyError(f"{path}: the checkpoint does not match the model. missing: [{_show(missing)}]; "
                       f"unexpected: [{_show(unexpected)}]. {hint}")


def check_shapes(model_sd, sd, path):
    """Fail naming every tensor whose shape differs from the model's (the first few)."""
    bad = [f"{k} {tuple(sd[k].shape)} vs model {tuple(v.shape)}" for k, v in model_sd.items()
           if k in sd and tuple(sd[k].shape) != tuple(v.shape)]
    if bad:
        raise ValueError(f"{path}: shape mismatch: " + "; ".join(bad[:8]))
