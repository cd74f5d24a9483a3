"""LoRA files in the ComfyUI format, model-agnostic. The scripts name adapters after the official module they adapt
(`blocks.0.self_attn.q.lora_A.weight` (rank, in), `.lora_B.weight` (out, rank)); on disk they get a prefix
(`diffusion_model.` for ComfyUI) and one `.alpha` scalar per module, the format diffusion-pipe writes and that
ComfyUI and diffusers load as they are. Reading also takes kohya/musubi files (`lora_unet_blocks_0_self_attn_q.
lora_down.weight`), whose flattened module names only the model can map back: the script passes `kohya_name`, and
`lora_down` / `lora_up` under any prefix (Kijai's and lightx2v's `diffusion_model.X.lora_down.weight`). Full-weight
deltas (`X.diff` for X.weight, `X.diff_b` for X.bias, which ComfyUI adds as they are) go to the caller's `diffs` dict,
or are refused when it gives none."""
import os

import torch
from safetensors.torch import save_file

from common.args import UserError
from common.weights import open_safetensors

SUFFIX_A, SUFFIX_B = ".lora_A.weight", ".lora_B.weight"


def write_lora(path, sd, alpha, prefix="diffusion_model.", metadata=None, dtype=torch.bfloat16, fold_alpha=False):
    """Write {module.lora_A.weight, module.lora_B.weight} with `prefix` and a `.alpha` per module, atomically
    (a temporary file renamed when complete). fold_alpha: scale each lora_B by alpha / rank instead and write no
    `.alpha` (every reader then takes scale 1), for readers that choke on the 0-d alphas (diffusers' HunyuanVideo
    converter chunks every tensor of a fused-qkv module)."""
    import os
    out = {}
    for k, v in sd.items():
        if fold_alpha and k.endswith(SUFFIX_B):
            v = v.float() * (alpha / sd[k[: -len(SUFFIX_B)] + SUFFIX_A].shape[0])
        out[prefix + k] = v.to(dtype).contiguous()
    for k in sd if not fold_alpha else ():
        if k.endswith(SUFFIX_A):
            out[prefix + k[: -len(SUFFIX_A)] + ".alpha"] = torch.tensor(float(alpha))
    tmp = path + ".tmp"
    save_file(out, tmp, metadata={k: str(v) for k, v in (metadata or {}).items()})
    os.replace(tmp, path)


def read_lora(path, prefixes=("diffusion_model.",), kohya_name=None, diffs=None):
    """A LoRA file (ComfyUI/diffusion-pipe format, or kohya/musubi with `kohya_name`: flattened name -> module name)
    -> (fp32 state dict with official module names, rank, alpha). Where the modules' alphas differ (or only some
    have one), each alpha/rank scale is folded into its B and the returned alpha equals the rank (scale 1).
    diffs: a dict that receives the file's full-weight deltas, {"X.weight": diff, "X.bias": diff_b} in fp32 (to be
    added to the weights: no alpha, no rank); None refuses a file that has some."""
    sd, alphas = {}, {}
    with open_safetensors(path) as f:
        raw = {k: f.get_tensor(k) for k in f.keys()}
    for k, v in raw.items():
        if k.startswith("lora_unet_"):
            if kohya_name is None:
                raise ValueError(f"{path}: kohya-format keys ({k}) but this model gives no kohya name map")
            mod, _, rest = k[len("lora_unet_"):].partition(".")
            k = kohya_name(mod) + "." + rest
        k = k.replace(".lora_down.", ".lora_A.").replace(".lora_up.", ".lora_B.")
        for p in prefixes:
            k = k.removeprefix(p)
        if k.endswith((".diff", ".diff_b")):
            if diffs is None:
                raise ValueError(f"{path}: full-weight deltas (.diff / .diff_b, e.g. {k}) are not supported")
            mod, _, kind = k.rpartition(".")
            diffs[mod + (".weight" if kind == "diff" else ".bias")] = v.float()
        elif k.endswith(".alpha"):
            alphas[k[: -len(".alpha")]] = float(v)
        else:
            sd[k] = v.float()
    ranks = {v.shape[0] for k, v in sd.items() if k.endswith(SUFFIX_A)}
    if not ranks:
        raise ValueError(f"{path}: no LoRA weights (X.lora_A.weight or X.lora_down.weight) among its keys, e.g. "
                         f"{sorted(sd)[:3]}")
    if len(ranks) != 1:
        raise ValueError(f"{path}: expected one LoRA rank, found {sorted(ranks)}")
    rank = ranks.pop()
    mods = [k[: -len(SUFFIX_A)] for k in sd if k.endswith(SUFFIX_A)]
    per = {m: alphas.get(m, float(rank)) for m in mods}  # no .alpha = scale 1, as ComfyUI and diffusers read it
    if len(set(per.values())) > 1:
        for m, a in per.items():
            sd[m + SUFFIX_B] *= a / rank
        return sd, rank, float(rank)
    return sd, rank, next(iter(per.values()), float(rank))


def check_fits(path, sd, rank, model, diffs=None):
    """ValueError naming the keys unless the LoRA of `path` (read_lora's sd and rank; diffs: its deltas) fits
    `model` (a build on the meta device is enough): every adapter on one of its nn.Linear modules, A (rank, in) and
    B (out, rank), every delta on one of its tensors, with that tensor's shape. A LoRA of another model (more blocks,
    another width, modules this one lacks) then stops in one line instead of deep in a state-dict load."""
    linears = {n: m for n, m in model.named_modules() if isinstance(m, torch.nn.Linear)}
    params = model.state_dict()
    mods = sorted({k.rsplit(".lora_", 1)[0] for k in sd})
    lacks = [m for m in mods if m not in linears] + [k for k in diffs or {} if k not in params]
    if lacks:
        raise ValueError(f"{path}: adapters on modules this model does not have (no such Linear, or weight): "
                         f"{lacks[:4]}{f' ({len(lacks)} in all)' if len(lacks) > 4 else ''}")
    want = {}
    for m in mods:
        want[m + SUFFIX_A] = (rank, linears[m].in_features)
        want[m + SUFFIX_B] = (linears[m].out_features, rank)
    bad = [f"{k} {tuple(v.shape)} vs {want.get(k, 'none')}" for k, v in sd.items() if tuple(v.shape) != want.get(k)]
    bad += [f"{k} {tuple(v.shape)} vs {tuple(params[k].shape)}" for k, v in (diffs or {}).items()
            if v.shape != params[k].shape]
    if bad:
        raise ValueError(f"{path}: LoRA shapes that do not fit this model: {'; '.join(bad[:4])}")


def merge(sd, lsd, rank, alpha, diffs=None, mult=1.0):
    """Merge a LoRA into full weights, in place (--base_lora: a distillation or style LoRA under the one that trains):
    W += mult * (alpha / rank) * B @ A for every adapter of `lsd` (read_lora's), and mult * delta for every full-weight
    delta of `diffs` ({"X.weight" / "X.bias": delta}), in fp32, each result cast back to the dtype the weight has in
    `sd` (official keys; a bf16 base rounds once, as ComfyUI's merge does)."""
    scale = mult * alpha / rank
    for k in [k for k in lsd if k.endswith(SUFFIX_A)]:
        m = k[: -len(SUFFIX_A)] + ".weight"
        w = sd[m]
        sd[m] = (w.float() + scale * (lsd[k[: -len(SUFFIX_A)] + SUFFIX_B].float() @ lsd[k].float())).to(w.dtype)
    for k, d in (diffs or {}).items():
        sd[k] = (sd[k].float() + mult * d.float()).to(sd[k].dtype)


def parse_list(value, names=(), flag="--base_lora"):
    """--base_lora 'PATH[:MULT],...' -> [(name, path, mult)]: MULT (default 1) scales the LoRA's alpha / rank, and a
    `NAME=` before a path, one of `names` (e.g. the A14B experts high / low), applies it to that part alone (name
    "": to every part). A malformed entry is a UserError line naming `flag` and the entry."""
    out = []
    for entry in [e.strip() for e in value.split(",") if e.strip()]:
        name, sep, rest = entry.partition("=")
        if sep and os.sep not in name:  # NAME=PATH
            if name not in names:
                raise UserError(f"{flag} {entry}: {name}= names a part of the model: "
                                + (", ".join(names) if names else "this model has no parts"))
        else:
            name, rest = "", entry
        path, mult = rest, 1.0
        head, sep, tail = rest.rpartition(":")
        if sep:
            try:
                path, mult = head, float(tail)
            except ValueError:
                pass
        if not path:
            raise UserError(f"{flag} {entry}: expected PATH or PATH:MULTIPLIER")
        out.append((name, path, mult))
    return out


def fold_outside(lsd, rank, alpha, inside, diffs):
    """Adapters on modules whose names do not start with `inside` (the blocks' prefixes: what add_lora wraps) moved
    from `lsd` into `diffs` as the weight deltas they are, (alpha / rank) B @ A (added to a delta already there), in
    place: a file's adapter on e.g. an input embedding is then merged into that weight."""
    for m in sorted({k.rsplit(".lora_", 1)[0] for k in lsd if not k.startswith(inside)}):
        delta = (alpha / rank) * lsd.pop(m + SUFFIX_B) @ lsd.pop(m + SUFFIX_A)
        diffs[m + ".weight"] = diffs.get(m + ".weight", 0) + delta


def targets_of(sd):
    """The --lora_targets of a LoRA state dict: the module paths inside a block (`blocks.3.self_attn.q` ->
    `self_attn.q`, `double_blocks.0.img_attn_qkv` -> `img_attn_qkv`), sorted, comma-separated."""
    return ",".join(sorted({k.split(".", 2)[2].rsplit(".lora_", 1)[0] for k in sd}))


def adopt(args, rank, alpha, targets, default_targets):
    """--init_lora: the run takes its file's rank, alpha and targets (set on `args`, so that every later check sees a
    LoRA run). Flags left at their defaults, or equal to the file's, agree; any other is one UserError line."""
    if not (args.lora_rank in (0, rank) and args.lora_alpha in (0, alpha)
            and args.lora_targets in (default_targets, targets)):
        raise UserError(f"--init_lora {args.init_lora}: rank {rank}, alpha {alpha}, targets {targets}; leave "
                        "--lora_rank, --lora_alpha and --lora_targets out or give the file's")
    args.lora_rank, args.lora_alpha, args.lora_targets = rank, alpha, targets
