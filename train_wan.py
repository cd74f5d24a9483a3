"""
Train Wan in one file: Wan 2.1 text-to-video (1.3B / 14B), image-to-video and first-last-frame (14B), Wan 2.2
TI2V-5B (text- and image-to-video) and the two A14B experts. The DiT, both VAEs, the umT5 text encoder, the CLIP
vision tower, LoRA, flow matching, loading of the official weights by their own key names, FSDP2, a flat main().

    python train_wan.py --preset toy                                   # tiny model from scratch, CPU ok
    python train_wan.py --preset 1.3B --ckpt_dir Wan2.1-T2V-1.3B --data my_clips/ --lora_rank 32
    torchrun --nproc_per_node=8 train_wan.py --preset 14B --ckpt_dir Wan2.1-T2V-14B --data my_clips/
    python train_wan.py --ckpt_dir Wan2.2-TI2V-5B --task i2v --data my_clips/ --lora_rank 32 --height 704 --width 1280
    torchrun --nproc_per_node=8 train_wan.py --ckpt_dir Wan2.2-T2V-A14B --expert both --data my_clips/ --lora_rank 32

Reading order: DiT config and presets -> DiT -> VAE -> text encoder -> LoRA -> flow matching and samplers ->
loading -> flags -> the pieces main() uses -> main. The model-agnostic helpers live in common/ (process group,
FSDP2 wrapping, checkpoints, flags, log) and data/ (video decoding, buckets, cache, batches, toy dataset).
Module names equal the official checkpoint keys (`blocks.3.self_attn.q.weight`), so the released files load as
they are. Facts and references: README.md.
"""
import dataclasses
import glob
import hashlib
import html
import json
import math
import os
import re
import time
import unicodedata
from dataclasses import dataclass

import sentencepiece
import tokenizers
import torch
import torch.nn as nn
import torch.nn.functional as F
from safetensors import safe_open
from safetensors.torch import load_file
from tqdm import tqdm

from common import ckpt, lora_file, memory, noise, preflight, sp
from common import dist as cdist
from common import run as run_folder
from common.args import UserError, cli, parse, prompts_from
from common.fsdp import clean_name, gather_params, load_full_state_dict, parallelize
from common.log import RunLog
from common.perf import StepTimer, device_name, device_peak_flops, peak_memory_gb, pinned_gb, reset_peak_memory
from common.prefetch import prefetch
from common.schedule import EMA, lr_at, param_groups
from common.stop import StopSignal
from common.weights import (check_keys, check_shapes, dequantize_scaled_fp8, read_weights, safetensors_files,
                            safetensors_header)
from data.cache import cache_entries, encode_dataset, load_batch
from data.dataset import load_dataset
from data.loader import batch_key, batches, split_val, val_batches, with_repeats
from data.toy import DEMO_PROMPTS, make_toy_dataset
from data.video import read_clip, write_video

# -----------------------------------------------------------------------------------------------------
# Configs and presets


@dataclass
class WanConfig:
    dim: int = 1536
    ffn_dim: int = 8960
    num_heads: int = 12
    num_layers: int = 30
    in_dim: int = 16  # latent channels in (Wan 2.1 VAE z_dim)
    out_dim: int = 16
    text_dim: int = 4096  # umT5-XXL width
    text_len: int = 512  # the context is always zero-padded to this many tokens
    freq_dim: int = 256  # sinusoidal timestep features
    patch_size: tuple = (1, 2, 2)  # (t, h, w)
    eps: float = 1e-6
    # What the model is conditioned on, as in the official config.json: t2v | i2v (Wan 2.1 I2V-14B, Wan 2.2 I2V-A14B)
    # | flf2v (Wan 2.1 FLF2V-14B) | ti2v (Wan 2.2 TI2V-5B). i2v/flf2v take in_dim = out_dim + 4 + out_dim channels:
    # the noisy latents, then `y` = the 4-channel frame mask (i2v_mask) and the latents of the conditioning video.
    model_type: str = "t2v"
    # CLIP image tokens in cross-attention: 1280 (ViT-H/14 width) for Wan 2.1 i2v/flf2v, which have img_emb and the
    # k_img/v_img projections; 0 for all others. Not in config.json (Wan 2.2's I2V-A14B expert is also "i2v" and has
    # none): read off the weights, see dit_config_from.
    img_dim: int = 0


DIT_PRESETS = {
    "1.3B": WanConfig(),
    "14B": WanConfig(dim=5120, ffn_dim=13824, num_heads=40, num_layers=40),
    # tiny: the tests; head_dim 32 keeps the 3-axis RoPE split non-trivial (6 + 5 + 5 rotation pairs)
    "tiny": WanConfig(dim=128, ffn_dim=256, num_heads=4, num_layers=2, text_dim=32, text_len=16),
    # toy: trained from scratch in pixel space on the synthetic dataset (in_dim 3 = RGB, 8x8-pixel patches: 2x2
    # tokens per 16x16 frame), README "The toy preset". dim 256 > the 192 values of a patch: predicting the velocity
    # means carrying the patch's noise through the residual stream, which needs the room.
    "toy": WanConfig(dim=256, ffn_dim=512, num_heads=4, num_layers=4, in_dim=3, out_dim=3, text_dim=64,
                     text_len=16, patch_size=(1, 8, 8)),
    # Wan 2.1 image-to-video (480P and 720P have the same shapes) and first-last-frame: 14B + CLIP cross-attention
    "i2v-14B": WanConfig(dim=5120, ffn_dim=13824, num_heads=40, num_layers=40, in_dim=36, model_type="i2v",
                         img_dim=1280),
    "flf2v-14B": WanConfig(dim=5120, ffn_dim=13824, num_heads=40, num_layers=40, in_dim=36, model_type="flf2v",
                           img_dim=1280),
    # Wan 2.2: TI2V-5B (48-channel Wan 2.2 VAE latents, text- and image-to-video in one model) and the A14B experts
    # (high_noise_model/ and low_noise_model/ each hold one, with these shapes; the I2V one has no CLIP)
    "ti2v-5B": WanConfig(dim=3072, ffn_dim=14336, num_heads=24, num_layers=30, in_dim=48, out_dim=48,
                         model_type="ti2v"),
    "t2v-A14B": WanConfig(dim=5120, ffn_dim=13824, num_heads=40, num_layers=40),
    "i2v-A14B": WanConfig(dim=5120, ffn_dim=13824, num_heads=40, num_layers=40, in_dim=36, model_type="i2v"),
}

# -----------------------------------------------------------------------------------------------------
# DiT (wan/modules/model.py in the official repo)


def sinusoidal_embedding(t, dim):
    """t (B,) in [0, 1000] -> (B, dim) fp32. Computed in float64 like upstream; cos first, then sin."""
    half = dim // 2
    t = t.to(torch.float64)
    freqs = torch.pow(10000, -torch.arange(half, dtype=torch.float64, device=t.device) / half)
    arg = t[:, None] * freqs[None]
    return torch.cat([torch.cos(arg), torch.sin(arg)], dim=1).float()


def rope_angles(f, h, w, head_dim, device):
    """3-D RoPE angles for a (f, h, w) token grid -> (f*h*w, head_dim/2) float64.
    The head_dim/2 rotation pairs are split 22/21/21 (for head_dim 128) between time, height and width, and
    each axis uses its own exponent base: theta^(-2j/d_axis) with d_axis = 44, 42, 42."""
    c = head_dim // 2
    splits = [c - 2 * (c // 3), c // 3, c // 3]  # complex pairs per axis: 22, 21, 21
    out = []
    for n, pos in zip(splits, (f, h, w)):
        d_axis = 2 * n
        inv = 1.0 / torch.pow(10000, torch.arange(0, d_axis, 2, dtype=torch.float64, device=device) / d_axis)
        out.append(torch.arange(pos, dtype=torch.float64, device=device)[:, None] * inv[None])  # (pos, n)
    af, ah, aw = out
    ang = torch.cat([af[:, None, None].expand(f, h, w, -1), ah[None, :, None].expand(f, h, w, -1),
                     aw[None, None, :].expand(f, h, w, -1)], dim=-1)  # token order f, h, w (w fastest)
    return ang.reshape(f * h * w, c)


def rope_apply(x, cos, sin):
    """x (B, L, n, d); rotate ADJACENT pairs (x[2j], x[2j+1]) by the angles; cos/sin (L, d/2) fp32. Returns fp32."""
    x0, x1 = x.float().unflatten(-1, (-1, 2)).unbind(-1)  # (B, L, n, d/2) each; unbind's backward is one stack
    cos, sin = cos[None, :, None], sin[None, :, None]
    return torch.stack([x0 * cos - x1 * sin, x0 * sin + x1 * cos], dim=-1).flatten(-2)


class WanRMSNorm(nn.Module):
    """RMSNorm over the whole width (all heads together), in fp32, cast back, then times weight."""

    def __init__(self, dim, eps=1e-6):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x):
        return F.rms_norm(x.float(), (x.shape[-1],), eps=self.eps).type_as(x) * self.weight  # fused kernel


class WanLayerNorm(nn.LayerNorm):
    """LayerNorm in fp32, returns fp32. norm1/norm2/head.norm have no affine params; norm3 (before cross-attention)
    has, and under FSDP mixed precision (or a bf16 LoRA base) its weight arrives in bf16: it is upcast here, as
    upstream's fp32 autocast region does, so the statistics and the affine both run in fp32."""

    def __init__(self, dim, eps=1e-6, elementwise_affine=False):
        super().__init__(dim, eps=eps, elementwise_affine=elementwise_affine)

    def forward(self, x):
        w = self.weight.float() if self.weight is not None else None
        b = self.bias.float() if self.bias is not None else None
        return F.layer_norm(x.float(), self.normalized_shape, w, b, self.eps)


class WanSelfAttention(nn.Module):
    def __init__(self, dim, num_heads, eps=1e-6):
        super().__init__()
        self.num_heads = num_heads
        self.q, self.k, self.v, self.o = (nn.Linear(dim, dim) for _ in range(4))
        self.norm_q = WanRMSNorm(dim, eps)
        self.norm_k = WanRMSNorm(dim, eps)

    def forward(self, x, rope):
        # x (B, L, C) in the compute dtype; rope = (cos, sin), each (L, head_dim/2); under --sp, (cos, sin, group,
        # L_all): x and the tables hold this rank's tokens and the attention goes over the group's (common/sp.py)
        B, L, C = x.shape
        n = self.num_heads
        q = self.norm_q(self.q(x)).view(B, L, n, -1)
        k = self.norm_k(self.k(x)).view(B, L, n, -1)
        v = self.v(x).view(B, L, n, -1)
        # RoPE is computed in fp32 (upstream: float64), then q/k go back to the compute dtype for attention.
        # Every sample of a batch has the same shape (bucketing), so no padding and no mask: plain SDPA.
        cos, sin, *group = rope
        q, k = rope_apply(q, cos, sin).type_as(v), rope_apply(k, cos, sin).type_as(v)
        if group:
            return self.o(sp.attention(q, k, v, *group).reshape(B, L, C))
        y = F.scaled_dot_product_attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2))
        return self.o(y.transpose(1, 2).reshape(B, L, C))


class WanCrossAttention(WanSelfAttention):
    """Cross-attention: the same layers (as upstream), but q from the video tokens and k/v from the context tokens
    (all attended, no mask), and no RoPE. Text only (t2v, ti2v, Wan 2.2 i2v): the context is the 512 text tokens.
    With CLIP image tokens (Wan 2.1 i2v/flf2v, img_len 257 or 514) the context is [image tokens, 512 text tokens]:
    the image tokens have their own k_img/v_img (k normed by norm_k_img), the same q attends to text and image
    separately, and the two outputs are summed before the shared o (upstream's WanI2VCrossAttention)."""

    def __init__(self, dim, num_heads, eps=1e-6, img_len=0):
        super().__init__(dim, num_heads, eps)
        self.img_len = img_len
        if img_len:
            self.k_img, self.v_img = nn.Linear(dim, dim), nn.Linear(dim, dim)
            self.norm_k_img = WanRMSNorm(dim, eps)

    def forward(self, x, context):
        B, L, C = x.shape
        n = self.num_heads
        img, context = context[:, :self.img_len], context[:, self.img_len:]
        q = self.norm_q(self.q(x)).view(B, L, n, -1).transpose(1, 2)
        k = self.norm_k(self.k(context)).view(B, -1, n, C // n).transpose(1, 2)
        v = self.v(context).view(B, -1, n, C // n).transpose(1, 2)
        y = F.scaled_dot_product_attention(q, k, v)
        if self.img_len:
            k = self.norm_k_img(self.k_img(img)).view(B, -1, n, C // n).transpose(1, 2)
            v = self.v_img(img).view(B, -1, n, C // n).transpose(1, 2)
            y = y + F.scaled_dot_product_attention(q, k, v)
        return self.o(y.transpose(1, 2).reshape(B, L, C))


def clip_tokens(cfg):
    """How many CLIP image tokens lead the context: 257 (CLS + 16x16 patches of one frame) for Wan 2.1 i2v, 514 (the
    first frame's, then the last frame's) for flf2v, 0 for the models without image cross-attention."""
    return 0 if not cfg.img_dim else 514 if cfg.model_type == "flf2v" else 257


class WanAttentionBlock(nn.Module):
    def __init__(self, cfg: WanConfig):
        super().__init__()
        dim = cfg.dim
        self.norm1 = WanLayerNorm(dim, cfg.eps)
        self.self_attn = WanSelfAttention(dim, cfg.num_heads, cfg.eps)
        self.norm3 = WanLayerNorm(dim, cfg.eps, elementwise_affine=True)  # yes, norm3 comes before norm2
        self.cross_attn = WanCrossAttention(dim, cfg.num_heads, cfg.eps, clip_tokens(cfg))
        self.norm2 = WanLayerNorm(dim, cfg.eps)
        self.ffn = nn.Sequential(nn.Linear(dim, cfg.ffn_dim), nn.GELU(approximate="tanh"), nn.Linear(cfg.ffn_dim, dim))
        self.modulation = nn.Parameter(torch.randn(1, 6, dim) / dim**0.5)

    def forward(self, x, e0, context, rope):
        # x (B, L, C) fp32 residual stream; e0 (B, G, 6, C) fp32: one modulation per group of L/G consecutive tokens
        # (G = 1: one t per sample; G = latent frames; G = L: per token, Wan 2.2); context (B, 512, C), or
        # (B, 257 or 514 image tokens + 512, C) for Wan 2.1 i2v/flf2v
        # compute dtype: bf16 under FSDP mixed precision, fp32 in tests; read off the bias, as under --base_dtype
        # float8 reading .weight upcasts the whole weight (common/float8.py)
        dt = self.ffn[0].bias.dtype
        mod = (self.modulation.float()[None] + e0).unbind(2)  # six (B, G, C)
        shift_msa, scale_msa, gate_msa, shift_ffn, scale_ffn, gate_ffn = mod
        y = self.self_attn(modulate(self.norm1(x), scale_msa, shift_msa).to(dt), rope)
        x = x + gated(y.float(), gate_msa)  # the gated residual adds happen in fp32, as upstream
        x = x + self.cross_attn(self.norm3(x).to(dt), context.to(dt)).float()  # no gate, no modulation
        y = self.ffn(modulate(self.norm2(x), scale_ffn, shift_ffn).to(dt))
        return x + gated(y.float(), gate_ffn)


def modulate(x, scale, shift):
    """x (B, L, C) * (1 + scale) + shift, scale and shift (B, G, C) holding one row per group of L/G consecutive
    tokens. Grouping instead of expanding to (B, L, C): a per-frame t (G = latent frames, all TI2V needs) then costs
    G rows, not L (upstream's per-token e0 is (B, L, 6, C) fp32, 2 GB a sample at 5B and 720p, saved in every block)."""
    return (x.unflatten(1, (scale.shape[1], -1)) * (1 + scale[:, :, None]) + shift[:, :, None]).flatten(1, 2)


def gated(y, gate):
    """y (B, L, C) * gate (B, G, C), grouped as in modulate."""
    return (y.unflatten(1, (gate.shape[1], -1)) * gate[:, :, None]).flatten(1, 2)


class Head(nn.Module):
    def __init__(self, cfg: WanConfig):
        super().__init__()
        self.norm = WanLayerNorm(cfg.dim, cfg.eps)
        self.head = nn.Linear(cfg.dim, math.prod(cfg.patch_size) * cfg.out_dim)
        self.modulation = nn.Parameter(torch.randn(1, 2, cfg.dim) / cfg.dim**0.5)

    def forward(self, x, e):
        # e (B, G, C) is the time embedding itself (not the 6-way projection), one row per group of tokens
        shift, scale = (self.modulation.float()[None] + e[:, :, None].float()).unbind(2)  # (B, G, C) each
        h = modulate(self.norm(x), scale, shift)
        return self.head(h.to(self.head.weight.dtype))


class MLPProj(nn.Module):
    """img_emb (Wan 2.1 i2v/flf2v): CLIP tokens (B, 257 or 514, 1280) -> image context (B, same, dim). LayerNorm ->
    Linear -> exact GELU -> Linear -> LayerNorm, both norms affine with torch's default eps 1e-5 (the DiT's own use
    1e-6), computed in fp32. FLF2V first adds emb_pos (1, 514, 1280), learned, which tells the first frame's tokens
    from the last frame's."""

    def __init__(self, in_dim, out_dim, flf=False):
        super().__init__()
        self.proj = nn.Sequential(WanLayerNorm(in_dim, 1e-5, True), nn.Linear(in_dim, in_dim), nn.GELU(),
                                  nn.Linear(in_dim, out_dim), WanLayerNorm(out_dim, 1e-5, True))
        self.emb_pos = nn.Parameter(torch.zeros(1, 514, in_dim)) if flf else None

    def forward(self, clip_fea):
        x = clip_fea.float()
        if self.emb_pos is not None:
            x = x + self.emb_pos.float()
        norm0, fc1, act, fc2, norm4 = self.proj
        return norm4(fc2(act(fc1(norm0(x).to(fc1.weight.dtype)))))  # fp32


class WanModel(nn.Module):
    """The Wan DiT: Wan 2.1 t2v / i2v / flf2v and Wan 2.2 ti2v / the A14B experts (one class, as upstream; the config
    says which). forward(x, t, context, y=None, clip_fea=None) -> velocity (B, C, F, H, W) fp32; see forward."""

    def __init__(self, cfg: WanConfig):
        super().__init__()
        self.cfg = cfg
        dim = cfg.dim
        self.patch_embedding = nn.Conv3d(cfg.in_dim, dim, kernel_size=cfg.patch_size, stride=cfg.patch_size)
        self.text_embedding = nn.Sequential(nn.Linear(cfg.text_dim, dim), nn.GELU(approximate="tanh"),
                                            nn.Linear(dim, dim))
        self.time_embedding = nn.Sequential(nn.Linear(cfg.freq_dim, dim), nn.SiLU(), nn.Linear(dim, dim))
        self.time_projection = nn.Sequential(nn.SiLU(), nn.Linear(dim, dim * 6))
        self.blocks = nn.ModuleList(WanAttentionBlock(cfg) for _ in range(cfg.num_layers))
        self.head = Head(cfg)
        if cfg.img_dim:  # Wan 2.1 i2v/flf2v (not the Wan 2.2 I2V expert, which conditions through y alone)
            self.img_emb = MLPProj(cfg.img_dim, dim, flf=cfg.model_type == "flf2v")
        self.rope_cache = {}  # (f, h, w, device) -> (cos, sin): a plain dict, not a buffer (not a checkpoint key)
        self.sp = None  # --sp N > 1: this rank's sequence-parallel group (common/sp.py), set by main

    def rope(self, f, h, w, device):
        """The RoPE tables of a token grid, computed once per grid shape (in float64, as upstream) and kept in fp32:
        a bucketed dataset has a handful of shapes, and rebuilding them every forward cost ~5% of a step."""
        key = (f, h, w, str(device))
        if key not in self.rope_cache:
            ang = rope_angles(f, h, w, self.cfg.dim // self.cfg.num_heads, device)
            self.rope_cache[key] = (ang.cos().float(), ang.sin().float())
        return self.rope_cache[key]

    def forward(self, x, t, context, y=None, clip_fea=None):
        """x (B, C, F, H, W) noisy latents (C = out_dim).
        t (B,) in [0, 1000], or (B, L) one per token, L = F/pt * H/ph * W/pw in the token order f, h, w (Wan 2.2
          TI2V: 0 on the clean first frame's tokens), or (B, F/pt) one per latent frame: the same result as the
          per-token t that repeats it, in a fraction of the memory. Upstream's Wan 2.2 forward also takes a 1-D t and
          expands it to (B, L), which is right only for B = 1: give (B,) for one t per sample.
        context (B, <= text_len, text_dim) umT5 states, trimmed or zero-padded.
        y (B, in_dim - C, F, H, W) for i2v/flf2v: the 4-channel frame mask, then the latents of the conditioning
          video (i2v_mask builds the mask); concatenated after x, as upstream.
        clip_fea (Wan 2.1 i2v/flf2v only) CLIP ViT-H/14 tokens (load_clip): (B, 257, 1280) of the first frame for
          i2v; (B, 514, 1280) for flf2v, the first frame's 257 then the last frame's 257. Upstream's flf2v takes
          (2B, 257, 1280) with the two frames interleaved per sample: that is exactly our clip_fea.view(2B, 257, 1280)
          (and ours is upstream's .view(B, 514, 1280))."""
        cfg = self.cfg
        if y is not None:
            x = torch.cat([x, y.to(x.dtype)], dim=1)
        if x.shape[1] != cfg.in_dim:
            raise ValueError(f"the DiT takes {cfg.in_dim} input channels, got {x.shape[1]}"
                             + (" (x and y together)" if y is not None else "")
                             + (f": a {cfg.model_type} model needs y, the mask and conditioning latents"
                                if cfg.in_dim != cfg.out_dim and y is None else ""))
        n_img = clip_tokens(cfg)
        if n_img and (clip_fea is None or tuple(clip_fea.shape[1:]) != (n_img, cfg.img_dim)):
            raise ValueError(f"this {cfg.model_type} model needs clip_fea (B, {n_img}, {cfg.img_dim}), got "
                             f"{None if clip_fea is None else tuple(clip_fea.shape)}")
        B = x.shape[0]
        pt, ph, pw = cfg.patch_size
        f, h, w = x.shape[2] // pt, x.shape[3] // ph, x.shape[4] // pw
        # patchify: (B, C, F, H, W) -> (B, f*h*w, dim), tokens ordered f, h, w (w fastest)
        wdt = self.patch_embedding.weight.dtype
        x = self.patch_embedding(x.to(wdt)).flatten(2).transpose(1, 2).float()
        # time: sinusoid -> MLP (fp32 island, as upstream's autocast(float32) region). t is kept as (B, G), one
        # per group of L/G consecutive tokens (G = 1, f or L), and the modulations broadcast over each group
        t = t[:, None] if t.dim() == 1 else t
        if t.shape[1] not in (1, f, x.shape[1]):
            raise ValueError(f"t {tuple(t.shape)}: expected (B,), (B, {f}) one per latent frame or (B, {x.shape[1]}) "
                             "one per token")
        e = self.time_embedding(sinusoidal_embedding(t.flatten(), cfg.freq_dim).to(wdt)).float()
        e = e.unflatten(0, t.shape)  # (B, G, dim)
        e0 = self.time_projection(e.to(wdt)).float().unflatten(-1, (6, cfg.dim))  # (B, G, 6, dim)
        # text: zero-pad to text_len (the padded rows are NOT masked: they become the bias vector after
        # text_embedding and every block attends to all 512 of them, exactly as upstream)
        if context.shape[1] < cfg.text_len:
            context = F.pad(context, (0, 0, 0, cfg.text_len - context.shape[1]))
        context = self.text_embedding(context.to(wdt))
        if n_img:  # the image tokens lead the context; each block's cross-attention splits them off again
            context = torch.cat([self.img_emb(clip_fea).to(context.dtype), context], dim=1)
        rope = self.rope(f, h, w, x.device)
        L = x.shape[1]
        if self.sp is not None:  # --sp N: from here to the head each rank holds ceil(L/N) of the tokens
            if e.shape[1] > 1:  # per-frame or per-token t: one modulation row per token, then this rank's rows
                group_of = torch.arange(L, device=x.device) * e.shape[1] // L  # token -> its group of L/G tokens
                e, e0 = sp.shard(e[:, group_of], self.sp), sp.shard(e0[:, group_of], self.sp)
            x = sp.shard(x, self.sp)
            rope = (*(sp.shard(r, self.sp, dim=0) for r in rope), self.sp, L)
        for block in self.blocks:
            x = block(x, e0, context, rope)
        x = self.head(x, e).float()  # (B, L, pt*ph*pw*C), features laid out (p, q, r, c), c fastest
        if self.sp is not None:
            x = sp.gather(x, self.sp, L)  # every rank of the group gets the whole output (the loss is computed whole)
        # unpatchify: (B, f, h, w, pt, ph, pw, C) -> (B, C, f*pt, h*ph, w*pw)
        x = x.view(B, f, h, w, pt, ph, pw, cfg.out_dim).permute(0, 7, 1, 4, 2, 5, 3, 6)
        return x.reshape(B, cfg.out_dim, f * pt, h * ph, w * pw)

    @torch.no_grad()
    def init_weights(self):
        """Upstream's from-scratch init (only used for toy/tiny runs; real runs load the released weights)."""
        for m in self.modules():
            if isinstance(m, nn.Linear):
                nn.init.xavier_uniform_(m.weight)
                nn.init.zeros_(m.bias)
            elif isinstance(m, (WanRMSNorm, nn.LayerNorm)) and m.weight is not None:
                nn.init.ones_(m.weight)
                if getattr(m, "bias", None) is not None:
                    nn.init.zeros_(m.bias)
        nn.init.xavier_uniform_(self.patch_embedding.weight.flatten(1))
        nn.init.zeros_(self.patch_embedding.bias)
        for m in [*self.text_embedding, *self.time_embedding]:
            if isinstance(m, nn.Linear):
                nn.init.normal_(m.weight, std=0.02)
        nn.init.zeros_(self.head.head.weight)
        for blk in self.blocks:
            blk.modulation.copy_(torch.randn_like(blk.modulation) / self.cfg.dim**0.5)
        self.head.modulation.copy_(torch.randn_like(self.head.modulation) / self.cfg.dim**0.5)


def i2v_mask(frames, lat_h, lat_w, last=False, device="cpu"):
    """The 4 mask channels of y (i2v: the first pixel frame is given; flf2v, last=True: the first and the last), as
    upstream's image2video.py / first_last_frame2video.py build them: one value per pixel frame (1 = given), frame 0
    repeated 4 times so that 1 + 4k pixel frames become 4 (1 + k) values, grouped 4 by 4: channel c of latent frame j is
    pixel frame 4j + c - 3 (frame 0 for j = 0). -> (4, 1 + (frames - 1) // 4, lat_h, lat_w) fp32. For flf2v only
    channel 3 of the last latent frame is 1 (the last pixel frame), exactly as upstream (diffusion-pipe sets all 4)."""
    m = torch.zeros(frames + 3, device=device)
    m[:4] = 1
    if last:
        m[-1] = 1
    return m.view(-1, 4).T[:, :, None, None].expand(4, -1, lat_h, lat_w).contiguous()


def per_token_t(t, f, h, w, clean_first=False):
    """t (B,) -> (B, f*h*w), one per token of an (f, h, w) token grid (latent frames, latent H/2, W/2), and 0 on the
    first latent frame's tokens with clean_first: Wan 2.2 TI2V's image-to-video, where latent frame 0 is the clean
    image latent (upstream textimage2video.py: mask2[0][0][:, ::2, ::2] * t). per_token_t(t, f, 1, 1) is the same as
    one t per latent frame, (B, f), which WanModel takes as well and which is far cheaper to train with."""
    tt = t.float()[:, None, None, None].expand(-1, f, h, w).clone()
    if clean_first:
        tt[:, 0] = 0
    return tt.flatten(1)


class Experts(nn.ModuleDict):
    """Wan 2.2 A14B's two experts as one model, forward(x, t, ...) as WanModel's: the high-noise expert where
    t >= boundary * 1000 (upstream's _prepare_model_for_timestep), the low-noise one below. A batch goes to one expert
    (a sampler's t is one value; training draws each step's sigmas on one side and calls the expert itself)."""

    def __init__(self, high, low, boundary):
        super().__init__({"high": high, "low": low})
        self.boundary = boundary

    def forward(self, x, t, context, y=None, clip_fea=None):
        high = t >= self.boundary * 1000
        if bool(high.any()) != bool(high.all()):
            raise ValueError(f"t {t.flatten().tolist()} straddles the experts' boundary {self.boundary * 1000}")
        return self["high" if bool(high.all()) else "low"](x, t, context, y, clip_fea)


def count_flops(cfg: WanConfig, f, h, w, text_len=None):
    """Forward FLOPs of one sample: 2 per multiply-add of every Linear/Conv, plus attention (QK^T and PV,
    4*L*L'*dim). Training (forward + backward) is 3x this; with a frozen base (LoRA) the backward skips the
    weight gradients, but MFU is conventionally reported against the 3x figure, and we say so."""
    L = (f // cfg.patch_size[0]) * (h // cfg.patch_size[1]) * (w // cfg.patch_size[2])
    Lt = text_len or cfg.text_len
    d = cfg.dim
    per_block = 2 * L * (4 * d * d) + 4 * L * L * d  # self-attn: q,k,v,o + attention
    per_block += 2 * (L * 2 * d * d + Lt * 2 * d * d) + 4 * L * Lt * d  # cross-attn: q,o on video, k,v on text
    per_block += 2 * L * 2 * d * cfg.ffn_dim  # ffn
    Li = clip_tokens(cfg)  # Wan 2.1 i2v/flf2v: k_img, v_img on the image tokens and a second attention
    per_block += 2 * Li * 2 * d * d + 4 * L * Li * d
    rest = 2 * L * cfg.in_dim * math.prod(cfg.patch_size) * d + 2 * L * d * math.prod(cfg.patch_size) * cfg.out_dim
    rest += 2 * Lt * (cfg.text_dim * d + d * d) + 2 * (cfg.freq_dim * d + d * d + d * 6 * d)  # text, time MLPs
    rest += 2 * Li * (cfg.img_dim * cfg.img_dim + cfg.img_dim * d)  # img_emb
    return cfg.num_layers * per_block + rest


# -----------------------------------------------------------------------------------------------------
# VAE: the Wan 2.1 causal 3-D VAE (video <-> 16-channel latents, stride 4 x 8 x 8)
#
# Same architecture and the same state_dict keys as the official wan/modules/vae.py (Wan2.1_VAE.pth, 194 tensors,
# 126.9M params), so the official file loads as is. Frozen and inference-only here: we only ever encode videos into
# training latents and decode samples. Shapes: video (B, 3, T, H, W) in [-1, 1] with T = 1 + 4k and H, W multiples of 8
# <-> latents (B, 16, 1 + k, H/8, W/8).

# Per-channel statistics of the latents (mu) over Wan's training data. encode() returns (mu - mean) / std, which is what
# the DiT was trained on; decode() undoes it. The same numbers are in diffusers' AutoencoderKLWan config.
WAN21_LATENTS_MEAN = (-0.7571, -0.7089, -0.9113, 0.1075, -0.1745, 0.9653, -0.1517, 1.5508,
                      0.4134, -0.0715, 0.5517, -0.3632, -0.1922, -0.9497, 0.2503, -0.2921)
WAN21_LATENTS_STD = (2.8184, 1.4541, 2.3275, 2.6558, 1.2196, 1.7708, 2.6052, 2.0743,
                     3.2687, 2.1526, 2.8652, 1.5579, 1.6382, 1.1253, 2.8251, 1.9160)


@dataclass
class VAEConfig:
    dim: int = 96                                   # base width; the 4 stages run at dim * dim_mult channels
    z_dim: int = 16                                 # latent channels (the encoder head makes 2 * z_dim: mu and log_var)
    dim_mult: tuple = (1, 2, 4, 4)
    num_res_blocks: int = 2                         # per encoder stage; each decoder stage has one more
    temperal_downsample: tuple = (False, True, True)  # (sic, upstream's name) which of the 3 downsamples also halve time
    latents_mean: tuple = WAN21_LATENTS_MEAN
    latents_std: tuple = WAN21_LATENTS_STD


VAE_PRESETS = {
    "2.1": VAEConfig(),
    "tiny": VAEConfig(dim=8),  # tests only: same blocks, same keys, same latent channels, 12x narrower
}

# -----------------------------------------------------------------------------------------------------
# How the video goes through the VAE: in time chunks, with a cache
#
# Every conv with a temporal kernel is causal: output frame t only sees input frames <= t, because all of its 2*pt
# temporal padding goes in front. The official code never runs the whole video at once. encode() feeds the encoder
# frame 0 alone, then frames 1-4, 5-8, ... (one latent frame per chunk); decode() feeds the decoder one latent frame at
# a time (latent 0 -> 1 video frame, every later latent -> 4). To make the chunks add up to one causal conv over the
# whole video, each conv keeps the last 2 frames of its input, and the next chunk uses them instead of zero padding.
#
# The cache is a plain dict {conv module: its last input frames}, created empty for each encode()/decode() call and
# handed down through every forward. It fills in forward order during the first chunk (one entry per temporal conv:
# 24 in the encoder, 32 in the decoder at this architecture). Upstream keeps a list with a running index instead;
# keying by the module itself is the same thing without the index bookkeeping.
#
# This is not only a memory trick: the temporal down/upsampling (Resample below) is *defined* by the chunking. The
# first chunk is never resampled in time, which is where the "1 +" in T = 1 + 4k comes from. Run without chunks,
# upstream skips temporal resampling altogether, so we don't offer that mode.


class CausalConv3d(nn.Conv3d):
    # A 3-D conv whose temporal padding (2 * pt frames) is all in front. H and W are zero padded on both sides as usual.
    # The conv is built with padding 0 and we pad in forward, because in chunked mode the front padding is replaced by
    # the frames cached from the previous chunk.
    def __init__(self, c_in, c_out, kernel_size, padding=0):
        super().__init__(c_in, c_out, kernel_size)
        pt, ph, pw = (padding,) * 3 if isinstance(padding, int) else padding
        assert pt > 0, "a conv with no temporal padding needs no cache: use nn.Conv3d"
        self.time_pad = 2 * pt
        self.space_pad = (pw, pw, ph, ph)

    def forward(self, x, cache):
        # x: (B, C, T, H, W) -> (B, C', T, H, W). cache[self] holds the last (up to time_pad) frames this conv saw in
        # the previous chunk; None or absent means "start of the video", i.e. zero padding.
        prev = cache.get(self)
        if prev is not None:
            x = torch.cat([prev, x], dim=2)
        # .clone(): a slice would keep the whole chunk's activation alive until the next chunk
        cache[self] = x[:, :, -self.time_pad:].clone()
        x = F.pad(x, self.space_pad + (self.time_pad - (0 if prev is None else prev.shape[2]), 0))
        return super().forward(x)


class ChannelRMSNorm(nn.Module):
    # RMS norm over the channel dim (dim 1) with a learned per-channel gain and no bias. F.normalize divides by the L2
    # norm, times sqrt(C) that is x / rms(x). gamma is (C, 1, 1, 1) for video tensors and (C, 1, 1) for the per-frame
    # images in the attention block: those are the checkpoint's shapes.
    def __init__(self, dim, images=False):
        super().__init__()
        self.scale = dim ** 0.5
        self.gamma = nn.Parameter(torch.ones(dim, 1, 1) if images else torch.ones(dim, 1, 1, 1))

    def forward(self, x):
        return F.normalize(x, dim=1) * self.scale * self.gamma


class ResBlock3d(nn.Module):
    def __init__(self, c_in, c_out):
        super().__init__()
        # a Sequential only so that the keys come out as upstream's residual.{0,2,3,6}.*; slot 5 is upstream's
        # Dropout, with p = 0 in every Wan config, so an Identity here
        self.residual = nn.Sequential(
            ChannelRMSNorm(c_in), nn.SiLU(), CausalConv3d(c_in, c_out, 3, padding=1),
            ChannelRMSNorm(c_out), nn.SiLU(), nn.Identity(), CausalConv3d(c_out, c_out, 3, padding=1))
        # a 1x1x1 conv has nothing to look back at, so a plain Conv3d (no cache)
        self.shortcut = nn.Conv3d(c_in, c_out, 1) if c_in != c_out else nn.Identity()

    def forward(self, x, cache):
        h = self.shortcut(x)
        for layer in self.residual:
            x = layer(x, cache) if isinstance(layer, CausalConv3d) else layer(x)
        return x + h


class FrameAttention(nn.Module):
    # Single-head self-attention over the H*W positions of each frame on its own. Nothing mixes across time, so it
    # needs no cache. Only used in the middle (1/8 resolution) of the encoder and the decoder.
    def __init__(self, dim):
        super().__init__()
        self.norm = ChannelRMSNorm(dim, images=True)
        self.to_qkv = nn.Conv2d(dim, 3 * dim, 1)
        self.proj = nn.Conv2d(dim, dim, 1)

    def forward(self, x):
        B, C, T, H, W = x.shape
        y = x.transpose(1, 2).reshape(B * T, C, H, W)                    # every frame is an image
        qkv = self.to_qkv(self.norm(y)).reshape(B * T, 3 * C, H * W)
        q, k, v = qkv.transpose(1, 2).unsqueeze(1).chunk(3, dim=-1)      # each (B*T, 1, H*W, C)
        y = F.scaled_dot_product_attention(q, k, v)                      # (B*T, 1, H*W, C)
        y = self.proj(y.squeeze(1).transpose(1, 2).reshape(B * T, C, H, W))
        return x + y.reshape(B, T, C, H, W).transpose(1, 2)


class Resample(nn.Module):
    # 2x down/upsampling in H, W (mode *2d), and also in time (mode *3d). Keys: resample.1 is the 2-D conv (slot 0 is
    # the parameter-free pad / upsample), time_conv only exists in the 3d modes. keep_channels: Wan 2.2's upsample conv
    # keeps C where Wan 2.1's halves it.
    def __init__(self, dim, mode, keep_channels=False):
        super().__init__()
        assert mode in ("down2d", "down3d", "up2d", "up3d")
        self.mode = mode
        if mode.startswith("down"):
            # pad right and bottom by one, then a stride-2 3x3 conv: (H, W) -> (H/2, W/2)
            self.resample = nn.Sequential(nn.ZeroPad2d((0, 1, 0, 1)), nn.Conv2d(dim, dim, 3, stride=2))
        else:
            # upstream does the upsample in fp32 to dodge missing bf16 kernels; nearest at exactly 2x is a pure copy
            # (nearest-exact == nearest here), so any dtype gives identical values and we skip the cast.
            # The conv halves the channels: (C, H, W) -> (C/2, 2H, 2W) (Wan 2.2: -> (C, 2H, 2W)).
            self.resample = nn.Sequential(nn.Upsample(scale_factor=2.0, mode="nearest-exact"),
                                          nn.Conv2d(dim, dim if keep_channels else dim // 2, 3, padding=1))
        if mode == "down3d":
            # kernel 3, stride 2 over time, no padding: the cache supplies the one frame of history (see forward)
            self.time_conv = nn.Conv3d(dim, dim, (3, 1, 1), stride=(2, 1, 1))
        elif mode == "up3d":
            # causal over time; makes 2C channels per frame that become 2 frames of C (see forward)
            self.time_conv = CausalConv3d(dim, 2 * dim, (3, 1, 1), padding=(1, 0, 0))

    def forward(self, x, cache):
        if self.mode == "up3d":
            # Frame doubling. Chunk 0 (latent frame 0) is not doubled: it becomes exactly one video frame. We only
            # record that chunk 0 went by (an entry of None), so that chunk 1 starts time_conv from zero padding, and
            # from then on time_conv is an ordinary cached causal conv.
            if self.time_conv not in cache:
                cache[self.time_conv] = None
            else:
                B, C, T, H, W = x.shape
                x = self.time_conv(x, cache)                             # (B, 2C, T, H, W)
                # channels [0, C) are frame 2t, [C, 2C) frame 2t+1
                x = x.reshape(B, 2, C, T, H, W).permute(0, 2, 3, 1, 4, 5).reshape(B, C, 2 * T, H, W)

        B, C, T, H, W = x.shape
        x = self.resample(x.transpose(1, 2).reshape(B * T, C, H, W))   # every frame is an image
        x = x.reshape(B, T, *x.shape[1:]).transpose(1, 2)              # (B, C', T, H', W')

        if self.mode == "down3d":
            # Frame halving: time_conv (kernel 3, stride 2) runs over [last frame of the previous chunk, this chunk].
            # Chunk 0 (one frame) passes through unchanged and only leaves its frame behind. Later chunks bring 4
            # frames (at the first down3d) or 2 (at the second): with the one cached frame that is 5 -> 2 or 3 -> 1,
            # and each window starts on the frame where the previous one ended.
            prev = cache.get(self.time_conv)
            cache[self.time_conv] = x[:, :, -1:].clone()
            if prev is not None:
                x = self.time_conv(torch.cat([prev, x], dim=2))
        return x


class Encoder3d(nn.Module):
    def __init__(self, cfg):
        super().__init__()
        dims = [cfg.dim * m for m in (1,) + tuple(cfg.dim_mult)]        # 96, 96, 192, 384, 384
        self.conv1 = CausalConv3d(3, dims[0], 3, padding=1)
        blocks = []                                                      # indices = upstream's downsamples.N
        for i, (c_in, c_out) in enumerate(zip(dims[:-1], dims[1:])):
            for _ in range(cfg.num_res_blocks):
                blocks.append(ResBlock3d(c_in, c_out))
                c_in = c_out
            if i < len(cfg.dim_mult) - 1:
                blocks.append(Resample(c_out, "down3d" if cfg.temperal_downsample[i] else "down2d"))
        self.downsamples = nn.Sequential(*blocks)
        C = dims[-1]
        self.middle = nn.Sequential(ResBlock3d(C, C), FrameAttention(C), ResBlock3d(C, C))
        self.head = nn.Sequential(ChannelRMSNorm(C), nn.SiLU(), CausalConv3d(C, 2 * cfg.z_dim, 3, padding=1))

    def forward(self, x, cache):
        # one chunk: (B, 3, 1 or 4, H, W) -> (B, 2*z_dim, 1, H/8, W/8)
        x = self.conv1(x, cache)
        for block in self.downsamples:
            x = block(x, cache)
        x = self.middle[0](x, cache)
        x = self.middle[1](x)
        x = self.middle[2](x, cache)
        return self.head[2](F.silu(self.head[0](x)), cache)


class Decoder3d(nn.Module):
    def __init__(self, cfg):
        super().__init__()
        mult = tuple(cfg.dim_mult)
        dims = [cfg.dim * m for m in (mult[-1],) + mult[::-1]]           # 384, 384, 384, 192, 96
        temperal_upsample = tuple(cfg.temperal_downsample)[::-1]         # (True, True, False)
        self.conv1 = CausalConv3d(cfg.z_dim, dims[0], 3, padding=1)
        self.middle = nn.Sequential(ResBlock3d(dims[0], dims[0]), FrameAttention(dims[0]), ResBlock3d(dims[0], dims[0]))
        blocks = []                                                      # indices = upstream's upsamples.N
        for i, (c_in, c_out) in enumerate(zip(dims[:-1], dims[1:])):
            if i > 0:
                c_in //= 2                                               # the Resample before this stage halved C
            for _ in range(cfg.num_res_blocks + 1):
                blocks.append(ResBlock3d(c_in, c_out))
                c_in = c_out
            if i < len(mult) - 1:
                blocks.append(Resample(c_out, "up3d" if temperal_upsample[i] else "up2d"))
        self.upsamples = nn.Sequential(*blocks)
        self.head = nn.Sequential(ChannelRMSNorm(dims[-1]), nn.SiLU(), CausalConv3d(dims[-1], 3, 3, padding=1))

    def forward(self, x, cache):
        # one latent frame: (B, z_dim, 1, h, w) -> (B, 3, 1 (first chunk) or 4, 8h, 8w)
        x = self.conv1(x, cache)
        x = self.middle[0](x, cache)
        x = self.middle[1](x)
        x = self.middle[2](x, cache)
        for block in self.upsamples:
            x = block(x, cache)
        return self.head[2](F.silu(self.head[0](x)), cache)


class WanVAE(nn.Module):
    def __init__(self, cfg=VAEConfig()):
        super().__init__()
        self.cfg = cfg
        # what the training script needs to know of either VAE: latent channels and (frames, height, width) per latent
        self.z_dim = cfg.z_dim                                                 # 16
        s = 2 ** (len(cfg.dim_mult) - 1)
        self.stride = (2 ** sum(cfg.temperal_downsample), s, s)                # (4, 8, 8)
        self.encoder = Encoder3d(cfg)
        self.conv1 = nn.Conv3d(2 * cfg.z_dim, 2 * cfg.z_dim, 1)   # after the encoder, on (mu, log_var)
        self.conv2 = nn.Conv3d(cfg.z_dim, cfg.z_dim, 1)           # before the decoder
        self.decoder = Decoder3d(cfg)

    def _stats(self, device):
        # (1, z_dim, 1, 1, 1) fp32. Plain constants rather than buffers: they are not checkpoint keys, and buffers
        # would stay on the meta device through load_vae's assign=True load.
        mean = torch.tensor(self.cfg.latents_mean, device=device).view(1, -1, 1, 1, 1)
        std = torch.tensor(self.cfg.latents_std, device=device).view(1, -1, 1, 1, 1)
        return mean, std

    def encode(self, video):
        # (B, 3, T, H, W) in [-1, 1] -> normalised latents (B, z_dim, 1 + (T-1)/4, H/8, W/8), fp32.
        # Returns (mu - mean) / std: the posterior mean, no sampling (log_var is computed and dropped, as upstream).
        B, C, T, H, W = video.shape
        assert C == 3 and T % 4 == 1 and H % 8 == 0 and W % 8 == 0, \
            f"video must be (B, 3, 1+4k, 8m, 8n), got {tuple(video.shape)}"
        x = video.to(self.conv1.weight.dtype)
        cache = {}
        chunks = [x[:, :, :1]] + [x[:, :, i:i + 4] for i in range(1, T, 4)]
        out = torch.cat([self.encoder(chunk, cache) for chunk in chunks], dim=2)  # (B, 2*z_dim, 1+k, H/8, W/8)
        mu = self.conv1(out)[:, :self.cfg.z_dim]
        mean, std = self._stats(mu.device)
        return (mu.float() - mean) / std

    def decode(self, latents):
        # normalised latents (B, z_dim, t, h, w) -> video (B, 3, 1 + 4(t-1), 8h, 8w) clamped to [-1, 1], fp32
        mean, std = self._stats(latents.device)
        z = (latents.float() * std + mean).to(self.conv2.weight.dtype)
        x = self.conv2(z)
        cache = {}
        out = torch.cat([self.decoder(x[:, :, i:i + 1], cache) for i in range(x.shape[2])], dim=2)
        return out.float().clamp(-1, 1)


# -----------------------------------------------------------------------------------------------------
# VAE: the Wan 2.2 causal 3-D VAE (video <-> 48-channel latents, stride 4 x 16 x 16), the one TI2V-5B runs on
#
# Same keys as the official wan/modules/vae2_2.py (Wan2.2_VAE.pth, 196 tensors, 704.7M params). It is built from the
# Wan 2.1 blocks above (CausalConv3d, ResBlock3d, FrameAttention, Resample) and goes through the video the same way
# (the same cache; frame 0 alone, then 4 at a time; decode one latent frame at a time), with three changes:
# - 2x2 pixel patches around the network: the encoder sees (B, 12, T, H/2, W/2) and the decoder makes 12 channels that
#   are put back into pixels, so the 3 spatial halvings inside make 16x, not 8x;
# - every stage is one module (keys downsamples.i.downsamples.j, upsamples.i.upsamples.j) that adds a shortcut without
#   weights to its output: its input folded space/time-to-channels and averaged (encoder), or channels repeated and
#   unfolded back into space/time (decoder);
# - the decoder is wider than the encoder (base 256 vs 160) and its upsample convs keep the channel count.

WAN22_LATENTS_MEAN = (-0.2289, -0.0052, -0.1323, -0.2339, -0.2799, 0.0174, 0.1838, 0.1557, -0.1382, 0.0542, 0.2813,
                      0.0891, 0.1570, -0.0098, 0.0375, -0.1825, -0.2246, -0.1207, -0.0698, 0.5109, 0.2665, -0.2108,
                      -0.2158, 0.2502, -0.2055, -0.0322, 0.1109, 0.1567, -0.0729, 0.0899, -0.2799, -0.1230, -0.0313,
                      -0.1649, 0.0117, 0.0723, -0.2839, -0.2083, -0.0520, 0.3748, 0.0152, 0.1957, 0.1433, -0.2944,
                      0.3573, -0.0548, -0.1681, -0.0667)
WAN22_LATENTS_STD = (0.4765, 1.0364, 0.4514, 1.1677, 0.5313, 0.4990, 0.4818, 0.5013, 0.8158, 1.0344, 0.5894, 1.0901,
                     0.6885, 0.6165, 0.8454, 0.4978, 0.5759, 0.3523, 0.7135, 0.6804, 0.5833, 1.4146, 0.8986, 0.5659,
                     0.7069, 0.5338, 0.4889, 0.4917, 0.4069, 0.4999, 0.6866, 0.4093, 0.5709, 0.6065, 0.6415, 0.4944,
                     0.5726, 1.2042, 0.5458, 1.6887, 0.3971, 1.0600, 0.3943, 0.5537, 0.5444, 0.4089, 0.7468, 0.7744)


@dataclass
class VAE22Config:
    dim: int = 160                                  # encoder base width: stages at 160 * (1, 2, 4, 4) channels
    dec_dim: int = 256                              # decoder base width: stages at 256 * (4, 4, 2, 1) channels
    z_dim: int = 48
    dim_mult: tuple = (1, 2, 4, 4)
    num_res_blocks: int = 2                         # per encoder stage; each decoder stage has one more
    temperal_downsample: tuple = (False, True, True)
    latents_mean: tuple = WAN22_LATENTS_MEAN
    latents_std: tuple = WAN22_LATENTS_STD


VAE22_PRESETS = {
    "2.2": VAE22Config(),
    "tiny": VAE22Config(dim=8, dec_dim=16),  # tests only: same blocks, keys and latent channels; encoder != decoder width
}


def pixel_patchify(x):
    # (B, 3, T, H, W) -> (B, 12, T, H/2, W/2). Channel 4c + 2j + i holds pixel (2y + i, 2x + j) of channel c: column
    # offset before row offset, upstream's order.
    B, C, T, H, W = x.shape
    x = x.reshape(B, C, T, H // 2, 2, W // 2, 2)                                  # (B, c, T, y, i, x, j)
    return x.permute(0, 1, 6, 4, 2, 3, 5).reshape(B, 4 * C, T, H // 2, W // 2)


def pixel_unpatchify(x):
    # (B, 12, T, h, w) -> (B, 3, T, 2h, 2w), the inverse of pixel_patchify
    B, C, T, h, w = x.shape
    x = x.reshape(B, C // 4, 2, 2, T, h, w)                                       # (B, c, j, i, T, y, x)
    return x.permute(0, 1, 4, 5, 3, 6, 2).reshape(B, C // 4, T, 2 * h, 2 * w)


def avg_down(x, c_out, ft, fs):
    # An encoder stage's shortcut: (B, C, T, H, W) -> (B, c_out, T/ft, H/fs, W/fs), no weights. Every ft x fs x fs block
    # of a channel becomes ft*fs*fs channels (time offset, row, column), and each run of C*ft*fs*fs/c_out consecutive
    # channels is averaged into one. Time is zero-padded in front to a multiple of ft: the 1-frame first chunk gives 1.
    B, C, T, H, W = x.shape
    x = F.pad(x, (0, 0, 0, 0, (-T) % ft, 0))
    t = x.shape[2] // ft
    x = x.reshape(B, C, t, ft, H // fs, fs, W // fs, fs).permute(0, 1, 3, 5, 7, 2, 4, 6)
    return x.reshape(B, c_out, -1, t, H // fs, W // fs).mean(2)


def dup_up(x, c_out, ft, fs, first_chunk):
    # A decoder stage's shortcut: (B, C, T, H, W) -> (B, c_out, ft*T, fs*H, fs*W), no weights: each channel repeated
    # c_out*ft*fs*fs/C times in a row, then every ft*fs*fs channels unfolded into an ft x fs x fs block. On the first
    # chunk the main path does not double time (one latent frame -> one video frame), so the first ft - 1 frames go.
    B, C, T, H, W = x.shape
    x = x.repeat_interleave(c_out * ft * fs * fs // C, dim=1)
    x = x.reshape(B, c_out, ft, fs, fs, T, H, W).permute(0, 1, 5, 2, 6, 3, 7, 4)  # (B, c, T, ft, H, fs, W, fs)
    x = x.reshape(B, c_out, ft * T, fs * H, fs * W)
    return x[:, :, ft - 1:] if first_chunk else x


class DownStage(nn.Module):
    # num_res_blocks ResBlock3d, then (except in the last stage) a Resample, plus avg_down of the stage's input
    def __init__(self, c_in, c_out, num_res_blocks, mode):
        super().__init__()
        self.c_out, self.mode = c_out, mode                                      # mode: down2d | down3d | None
        blocks = [ResBlock3d(c_in if j == 0 else c_out, c_out) for j in range(num_res_blocks)]
        self.downsamples = nn.Sequential(*blocks, *([Resample(c_out, mode)] if mode else []))

    def forward(self, x, cache):
        h = x
        for block in self.downsamples:
            h = block(h, cache)
        return h + avg_down(x, self.c_out, 2 if self.mode == "down3d" else 1, 2 if self.mode else 1)


class UpStage(nn.Module):
    # num_res_blocks + 1 ResBlock3d, then (except in the last stage) a Resample keeping C, plus dup_up of the input;
    # the last stage has no shortcut
    def __init__(self, c_in, c_out, num_res_blocks, mode):
        super().__init__()
        self.c_out, self.mode = c_out, mode                                      # mode: up2d | up3d | None
        blocks = [ResBlock3d(c_in if j == 0 else c_out, c_out) for j in range(num_res_blocks + 1)]
        self.upsamples = nn.Sequential(*blocks, *([Resample(c_out, mode, keep_channels=True)] if mode else []))

    def forward(self, x, cache, first_chunk):
        h = x
        for block in self.upsamples:
            h = block(h, cache)
        if self.mode is None:
            return h
        return h + dup_up(x, self.c_out, 2 if self.mode == "up3d" else 1, 2, first_chunk)


class Encoder22(nn.Module):
    def __init__(self, cfg):
        super().__init__()
        dims = [cfg.dim * m for m in (1,) + tuple(cfg.dim_mult)]                # 160, 160, 320, 640, 640
        last = len(cfg.dim_mult) - 1
        self.conv1 = CausalConv3d(12, dims[0], 3, padding=1)
        self.downsamples = nn.Sequential(*[                                      # modes: down2d, down3d, down3d, None
            DownStage(c_in, c_out, cfg.num_res_blocks,
                      None if i == last else "down3d" if cfg.temperal_downsample[i] else "down2d")
            for i, (c_in, c_out) in enumerate(zip(dims[:-1], dims[1:]))])
        C = dims[-1]
        self.middle = nn.Sequential(ResBlock3d(C, C), FrameAttention(C), ResBlock3d(C, C))
        self.head = nn.Sequential(ChannelRMSNorm(C), nn.SiLU(), CausalConv3d(C, 2 * cfg.z_dim, 3, padding=1))

    def forward(self, x, cache):
        # one chunk: (B, 12, 1 or 4, H/2, W/2) -> (B, 2*z_dim, 1, H/16, W/16)
        x = self.conv1(x, cache)
        for stage in self.downsamples:
            x = stage(x, cache)
        x = self.middle[0](x, cache)
        x = self.middle[1](x)
        x = self.middle[2](x, cache)
        return self.head[2](F.silu(self.head[0](x)), cache)


class Decoder22(nn.Module):
    def __init__(self, cfg):
        super().__init__()
        mult = tuple(cfg.dim_mult)
        dims = [cfg.dec_dim * m for m in (mult[-1],) + mult[::-1]]              # 1024, 1024, 1024, 512, 256
        temperal_upsample = tuple(cfg.temperal_downsample)[::-1]                 # (True, True, False)
        last = len(mult) - 1
        self.conv1 = CausalConv3d(cfg.z_dim, dims[0], 3, padding=1)
        self.middle = nn.Sequential(ResBlock3d(dims[0], dims[0]), FrameAttention(dims[0]), ResBlock3d(dims[0], dims[0]))
        self.upsamples = nn.Sequential(*[                                        # modes: up3d, up3d, up2d, None
            UpStage(c_in, c_out, cfg.num_res_blocks, None if i == last else "up3d" if temperal_upsample[i] else "up2d")
            for i, (c_in, c_out) in enumerate(zip(dims[:-1], dims[1:]))])
        self.head = nn.Sequential(ChannelRMSNorm(dims[-1]), nn.SiLU(), CausalConv3d(dims[-1], 12, 3, padding=1))

    def forward(self, x, cache, first_chunk):
        # one latent frame: (B, z_dim, 1, h, w) -> (B, 12, 1 (first chunk) or 4, 8h, 8w)
        x = self.conv1(x, cache)
        x = self.middle[0](x, cache)
        x = self.middle[1](x)
        x = self.middle[2](x, cache)
        for stage in self.upsamples:
            x = stage(x, cache, first_chunk)
        return self.head[2](F.silu(self.head[0](x)), cache)


class Wan22VAE(nn.Module):
    # The same API as WanVAE: encode, decode, cfg, z_dim, stride
    def __init__(self, cfg=VAE22Config()):
        super().__init__()
        self.cfg = cfg
        self.z_dim = cfg.z_dim                                                   # 48
        s = 2 * 2 ** (len(cfg.dim_mult) - 1)                                     # the 2x2 patch, then 3 halvings
        self.stride = (2 ** sum(cfg.temperal_downsample), s, s)                  # (4, 16, 16)
        self.encoder = Encoder22(cfg)
        self.conv1 = nn.Conv3d(2 * cfg.z_dim, 2 * cfg.z_dim, 1)   # after the encoder, on (mu, log_var)
        self.conv2 = nn.Conv3d(cfg.z_dim, cfg.z_dim, 1)           # before the decoder
        self.decoder = Decoder22(cfg)

    def _stats(self, device):
        # (1, z_dim, 1, 1, 1) fp32 constants, not buffers (see WanVAE._stats)
        mean = torch.tensor(self.cfg.latents_mean, device=device).view(1, -1, 1, 1, 1)
        std = torch.tensor(self.cfg.latents_std, device=device).view(1, -1, 1, 1, 1)
        return mean, std

    def encode(self, video):
        # (B, 3, T, H, W) in [-1, 1] -> normalised latents (B, z_dim, 1 + (T-1)/4, H/16, W/16), fp32 (the posterior mean)
        B, C, T, H, W = video.shape
        assert C == 3 and T % 4 == 1 and H % 16 == 0 and W % 16 == 0, \
            f"video must be (B, 3, 1+4k, 16m, 16n), got {tuple(video.shape)}"
        x = pixel_patchify(video.to(self.conv1.weight.dtype))                   # (B, 12, T, H/2, W/2)
        cache = {}
        chunks = [x[:, :, :1]] + [x[:, :, i:i + 4] for i in range(1, T, 4)]
        out = torch.cat([self.encoder(chunk, cache) for chunk in chunks], dim=2)  # (B, 2*z_dim, 1+k, H/16, W/16)
        mu = self.conv1(out)[:, :self.cfg.z_dim]
        mean, std = self._stats(mu.device)
        return (mu.float() - mean) / std

    def decode(self, latents):
        # normalised latents (B, z_dim, t, h, w) -> video (B, 3, 1 + 4(t-1), 16h, 16w) clamped to [-1, 1], fp32
        mean, std = self._stats(latents.device)
        z = (latents.float() * std + mean).to(self.conv2.weight.dtype)
        x = self.conv2(z)
        cache = {}
        out = torch.cat([self.decoder(x[:, :, i:i + 1], cache, first_chunk=i == 0) for i in range(x.shape[2])], dim=2)
        return pixel_unpatchify(out.float()).clamp(-1, 1)                       # (B, 12, ...) -> (B, 3, ...)


def vae_config_from(sd):
    """Which VAE the weights are, and its widths and latent channels, read off the tensors, never off the file name.
    Wan 2.2's stages are modules of their own (keys 'encoder.downsamples.0.downsamples.0...'), Wan 2.1's blocks sit
    flat in one list ('encoder.downsamples.0.residual...'). The released files are 2.1: dim 96, z_dim 16; 2.2: dim 160,
    dec_dim 256, z_dim 48; the tests' tiny ones are narrower. A tensor that is not there leaves its default, so that
    the key check in load_vae can name it."""
    shape = lambda k, i, default: sd[k].shape[i] if k in sd else default  # noqa: E731
    if any(k.startswith(("encoder.downsamples.0.downsamples.", "decoder.upsamples.0.upsamples.")) for k in sd):
        c = VAE22_PRESETS["2.2"]
        return dataclasses.replace(c, dim=shape("encoder.conv1.weight", 0, c.dim),
                                   dec_dim=shape("decoder.head.2.weight", 1, c.dec_dim),  # the last stage's width
                                   z_dim=shape("conv2.weight", 0, c.z_dim))
    c = VAE_PRESETS["2.1"]
    return dataclasses.replace(c, dim=shape("encoder.conv1.weight", 0, c.dim), z_dim=shape("conv2.weight", 0, c.z_dim))


def load_vae(path, dtype=torch.float32, device="cpu", config=None):
    # path: an official checkpoint folder (Wan2.1_VAE.pth; Wan2.2_VAE.pth in TI2V-5B's), the .pth itself, or a
    # .safetensors file with the same keys (ComfyUI's wan_2.1_vae.safetensors). Returns WanVAE or Wan22VAE, whichever
    # the weights are (vae_config_from), in eval mode, frozen, on device in dtype. Both have .encode, .decode, .z_dim
    # (16 / 48) and .stride ((4, 8, 8) / (4, 16, 16)).
    # config: None = read off the weights; a VAEConfig (2.1) or a VAE22Config (2.2) to insist on one.
    path = str(path)
    if os.path.isdir(path):
        found = [f for f in ("Wan2.1_VAE.pth", "Wan2.2_VAE.pth") if os.path.exists(os.path.join(path, f))]
        if len(found) > 1:
            raise ValueError(f"{path} has both {found[0]} and {found[1]}: pass the path of the one to load")
        path = os.path.join(path, found[0] if found else "Wan2.1_VAE.pth")
    sd = read_weights(path)  # .pth through torch.load(weights_only=True, mmap=True)
    config = config or vae_config_from(sd)
    version, cls = ("2.2", Wan22VAE) if isinstance(config, VAE22Config) else ("2.1", WanVAE)

    with torch.device("meta"):
        model = cls(config)
    expected = model.state_dict().keys()
    missing = sorted(expected - sd.keys())
    unexpected = sorted(sd.keys() - expected)
    if missing or unexpected:
        msg = f"{path} does not match the Wan {version} VAE: {len(missing)} missing keys {missing[:5]}, " \
              f"{len(unexpected)} unexpected keys {unexpected[:5]}. "
        if any(".down_blocks." in k or ".up_blocks." in k or k.startswith("quant_conv.") for k in sd):
            msg += "This looks like a diffusers-format VAE (AutoencoderKLWan, keys like 'decoder.up_blocks.0...'), " \
                   "which is not supported: use the official Wan2.1_VAE.pth / Wan2.2_VAE.pth (or ComfyUI's " \
                   "wan_2.1_vae.safetensors)."
        elif version == "2.1" and any(k.startswith("decoder.upsamples.0.upsamples.") for k in sd):
            msg += "This looks like the Wan 2.2 VAE (48 latent channels): leave config=None to load it as that."
        elif version == "2.2" and any(k.startswith("decoder.upsamples.0.residual.") for k in sd):
            msg += "This looks like the Wan 2.1 VAE (16 latent channels): leave config=None to load it as that."
        else:
            msg += "Is this a Wan VAE file? Expected the official keys, e.g. 'encoder.downsamples.0.residual.0.gamma' " \
                   "(Wan2.1_VAE.pth) or 'encoder.downsamples.0.downsamples.0.residual.0.gamma' (Wan2.2_VAE.pth)."
        raise ValueError(msg)
    # assign=True: the params become these tensors (no allocation on meta, no copy); shape mismatches still raise
    sd = {k: v.to(device=device, dtype=dtype) for k, v in sd.items()}
    model.load_state_dict(sd, assign=True)
    return model.eval().requires_grad_(False)


# -----------------------------------------------------------------------------------------------------
# Text encoder: umT5-XXL encoder (Wan 2.1 / 2.2), inference only, frozen.
# Facts from Wan-Video/Wan2.1 wan/modules/t5.py (model), wan/modules/tokenizers.py (cleaning),
# wan/text2video.py (how the context reaches the DiT) and HF transformers' UMT5EncoderModel (the parity reference).
# Module names equal the keys of the official models_t5_umt5-xxl-enc-bf16.pth, so that file loads with no renames.


@dataclass
class T5Config:
    vocab: int = 256384  # 256,000 sentencepiece pieces + 300 <extra_id_*>, rounded up to a multiple of 128
    dim: int = 4096
    dim_attn: int = 4096  # num_heads * head_dim (64)
    dim_ffn: int = 10240
    num_heads: int = 64
    num_layers: int = 24
    num_buckets: int = 32  # relative-position buckets, 16 per direction
    max_distance: int = 128  # the log-spaced buckets reach this far; farther keys are clamped into the last one
    eps: float = 1e-6


T5_PRESETS = {
    "umt5-xxl": T5Config(),  # 5,680,910,336 params, 242 tensors
    "tiny": T5Config(vocab=300, dim=64, dim_attn=64, dim_ffn=96, num_heads=4, num_layers=2),  # tests
}


class T5LayerNorm(nn.Module):
    # RMSNorm: no mean subtraction, no bias. Statistics in fp32; the normalized x is rounded to the weight dtype
    # *before* the scale, which is where upstream and HF round in bf16.
    def __init__(self, dim, eps):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x):
        x = x.float()
        x = x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + self.eps)
        return self.weight * x.to(self.weight.dtype)


def relative_position_bucket(rel, num_buckets, max_distance):
    # rel = key_pos - query_pos. Bidirectional: buckets [0, n) for rel <= 0 and [n, 2n) for rel > 0.
    # Within a direction, distances 0..n/2-1 get a bucket each; n/2..max_distance are spread logarithmically over
    # the other n/2 buckets; farther ones share the last bucket. (Must stay fp32 log + truncation, as upstream.)
    n = num_buckets // 2
    exact = n // 2
    bucket = (rel > 0).long() * n
    rel = rel.abs()
    far = exact + (torch.log(rel.float() / exact) / math.log(max_distance / exact) * (n - exact)).long()
    return bucket + torch.where(rel < exact, rel, far.clamp(max=n - 1))  # log(0) = -inf is never selected


class T5RelativeEmbedding(nn.Module):
    # umT5 has one of these per layer (mT5/T5 share the first layer's): a learned scalar per (bucket, head).
    def __init__(self, num_buckets, num_heads, max_distance):
        super().__init__()
        self.num_buckets, self.max_distance = num_buckets, max_distance
        self.embedding = nn.Embedding(num_buckets, num_heads)

    def forward(self, L):
        pos = torch.arange(L, device=self.embedding.weight.device)
        rel = pos[None, :] - pos[:, None]  # (Lq, Lk)
        bias = self.embedding(relative_position_bucket(rel, self.num_buckets, self.max_distance))  # (Lq, Lk, H)
        return bias.permute(2, 0, 1)[None]  # (1, H, Lq, Lk)


class T5Attention(nn.Module):
    def __init__(self, dim, dim_attn, num_heads):
        super().__init__()
        self.num_heads = num_heads
        self.q = nn.Linear(dim, dim_attn, bias=False)
        self.k = nn.Linear(dim, dim_attn, bias=False)
        self.v = nn.Linear(dim, dim_attn, bias=False)
        self.o = nn.Linear(dim_attn, dim, bias=False)

    def forward(self, x, bias):  # x (B, L, C); bias (B, H, L, L) additive: rel-pos bias + padding mask
        B, L, _ = x.shape
        q, k, v = (f(x).view(B, L, self.num_heads, -1).transpose(1, 2) for f in (self.q, self.k, self.v))
        # (B, H, L, D). T5 has no 1/sqrt(head_dim): Mesh-TF folded it into the init of q, so the trained weights
        # expect scale=1.0
        x = F.scaled_dot_product_attention(q, k, v, attn_mask=bias, scale=1.0)
        return self.o(x.transpose(1, 2).reshape(B, L, -1))


class T5FeedForward(nn.Module):
    # gated GELU (tanh approximation = HF "gelu_new"): fc2(fc1(x) * gelu(gate(x))). gate is an nn.Sequential only
    # so that its weight is called gate.0.weight, as in the checkpoint.
    def __init__(self, dim, dim_ffn):
        super().__init__()
        self.gate = nn.Sequential(nn.Linear(dim, dim_ffn, bias=False), nn.GELU(approximate="tanh"))
        self.fc1 = nn.Linear(dim, dim_ffn, bias=False)
        self.fc2 = nn.Linear(dim_ffn, dim, bias=False)

    def forward(self, x):
        return self.fc2(self.fc1(x) * self.gate(x))


class T5Block(nn.Module):
    # pre-norm self-attention + pre-norm FFN. Dropout (0.1 upstream) is omitted: this encoder is never trained here.
    def __init__(self, cfg):
        super().__init__()
        self.norm1 = T5LayerNorm(cfg.dim, cfg.eps)
        self.attn = T5Attention(cfg.dim, cfg.dim_attn, cfg.num_heads)
        self.norm2 = T5LayerNorm(cfg.dim, cfg.eps)
        self.ffn = T5FeedForward(cfg.dim, cfg.dim_ffn)
        self.pos_embedding = T5RelativeEmbedding(cfg.num_buckets, cfg.num_heads, cfg.max_distance)

    def forward(self, x, mask_bias):  # x (B, L, C); mask_bias (B, 1, 1, L)
        bias = self.pos_embedding(x.size(1)).to(x.dtype) + mask_bias  # (B, H, L, L)
        x = x + self.attn(self.norm1(x), bias)
        return x + self.ffn(self.norm2(x))


class T5Encoder(nn.Module):
    # No fp16 support: T5 activations overflow fp16 (upstream clamps them); use bf16 or fp32.
    def __init__(self, cfg):
        super().__init__()
        self.token_embedding = nn.Embedding(cfg.vocab, cfg.dim)
        self.blocks = nn.ModuleList([T5Block(cfg) for _ in range(cfg.num_layers)])
        self.norm = T5LayerNorm(cfg.dim, cfg.eps)

    def forward(self, ids, mask=None):  # ids (B, L) int64; mask (B, L), 1 = token, 0 = padding
        x = self.token_embedding(ids)  # (B, L, C); T5 does not scale embeddings by sqrt(dim)
        mask = torch.ones_like(ids) if mask is None else mask
        # padded keys get the dtype's most negative value (not -inf, so an all-padding row could never give NaN)
        mask_bias = torch.zeros(mask.shape, dtype=x.dtype, device=x.device)
        mask_bias = mask_bias.masked_fill(mask == 0, torch.finfo(x.dtype).min)[:, None, None, :]  # (B, 1, 1, L)
        for block in self.blocks:
            x = block(x, mask_bias)
        return self.norm(x)  # (B, L, C)


# What ftfy.fix_text does to plain (non-mojibake) text, as one str.translate table: fullwidth/halfwidth forms to
# normal width (，！（ -> ,!( : the Wan negative prompt is full of them), U+3000 to a space, Latin ligatures and
# digraphs split (ﬁ -> fi), curly quotes straightened (don’t -> don't, common in LLM captions), control chars
# dropped.
_FTFY_TABLE = {i: unicodedata.normalize("NFKC", chr(i)) for i in [
    *range(0xFF01, 0xFFF0), 0x132, 0x133, *range(0x1C4, 0x1CD), *range(0x1F1, 0x1F4), *range(0xFB00, 0xFB07)]}
_FTFY_TABLE |= {0x3000: " ", 0xFB05: "\u017ft", 0x149: "'n"}  # the two ligatures ftfy splits unlike NFKC
_FTFY_TABLE |= dict.fromkeys([0x2BC, *range(0x2018, 0x201C)], "'") | dict.fromkeys(range(0x201C, 0x2020), '"')
_FTFY_TABLE |= dict.fromkeys([*range(0x00, 0x09), 0x0B, *range(0x0E, 0x20), 0x7F, *range(0x206A, 0x2070), 0xFEFF,
                              *range(0xFFF9, 0xFFFD)])  # -> None: deleted
_ANSI_ESCAPES = re.compile("\x1b\\[[0-9;]*[a-zA-Z]")  # terminal colour codes, also removed by ftfy


def clean_prompt(text):
    # Upstream: ftfy.fix_text, html.unescape twice, strip, collapse whitespace runs to one space, strip.
    # ftfy is not a dependency, so its plain-text fixes are redone above (+ its final NFC); checked equal to upstream
    # on plain text in tests. Not redone is ftfy's real job, mojibake repair ("cafÃ©" -> "café", C1 controls);
    # plain text has no mojibake. Other differences, for HTML entities only: ftfy itself unescapes until nothing
    # changes when a line has no literal "<" (we stop after two levels: "&amp;amp;amp;" stays "&amp;"), and on lines
    # with a "<" the entities get the fixes here but not upstream ("<b>&rsquo;" keeps its ’ there).
    text = html.unescape(html.unescape(text))
    text = unicodedata.normalize("NFC", _ANSI_ESCAPES.sub("", text).translate(_FTFY_TABLE))
    # Python's \s also matches \x1c-\x1f, which upstream's `regex` module does not; the table removed them already.
    return re.sub(r"\s+", " ", text.strip()).strip()


class Tokenizer:
    # umT5 sentencepiece unigram tokenizer: pieces + EOS (id 1), no BOS, right-padded with <pad> (id 0). This is
    # what HF's tokenizer returns for padding="max_length", truncation=True, add_special_tokens=True: truncation
    # keeps max_len - 1 pieces so that EOS always fits (both HF's slow T5 tokenizer and the tokenizers library
    # reserve room for the special tokens the post-processor appends).
    # `path`: a folder (Wan's google/umt5-xxl/, diffusers' tokenizer/), a tokenizer.json or spiece.model file, or
    # the bytes of a spiece.model (ComfyUI embeds it as a uint8 tensor "spiece_model").
    # tokenizer.json (HF `tokenizers`, what upstream's AutoTokenizer actually runs) is preferred; the sentencepiece
    # fallback gives the same ids on normal text. Known difference: tokenizer.json also matches special tokens
    # written in the text ("</s>", "<extra_id_0>") as single ids; sentencepiece splits them into ordinary pieces.
    pad_id, eos_id = 0, 1

    def __init__(self, path):
        self.tok = self.sp = None
        path = path if isinstance(path, bytes) else os.fspath(path)
        if isinstance(path, str) and os.path.isdir(path):
            json_file = os.path.join(path, "tokenizer.json")
            path = json_file if os.path.exists(json_file) else os.path.join(path, "spiece.model")
        if isinstance(path, bytes):
            self.sp = sentencepiece.SentencePieceProcessor(model_proto=path)
        elif path.endswith(".json"):
            self.tok = tokenizers.Tokenizer.from_file(path)
        else:
            self.sp = sentencepiece.SentencePieceProcessor(model_file=path)
        to_id = self.tok.token_to_id if self.tok else self.sp.piece_to_id
        assert to_id("<pad>") == self.pad_id and to_id("</s>") == self.eos_id, "not a T5-style vocabulary"

    def __call__(self, prompts, max_len=512):  # -> ids, mask: (B, max_len) int64
        if self.tok:
            pieces = [e.ids for e in self.tok.encode_batch(prompts, add_special_tokens=False)]
        else:
            pieces = self.sp.encode(prompts)
        ids = torch.full((len(prompts), max_len), self.pad_id, dtype=torch.long)
        mask = torch.zeros(len(prompts), max_len, dtype=torch.long)
        for i, p in enumerate(pieces):
            p = p[: max_len - 1] + [self.eos_id]
            ids[i, : len(p)] = torch.tensor(p)
            mask[i, : len(p)] = 1
        return ids, mask


class TextEncoder:
    # prompts -> the DiT's text context, exactly as upstream builds it: clean, tokenize to 512, encode with the mask,
    # keep each row's first len tokens (EOS included) and zero-pad back to 512. The DiT then cross-attends to all
    # 512 rows with no mask, so the padded rows must be zeros, not the encoder's outputs at pad positions.
    def __init__(self, model, tokenizer, max_len=512):
        self.model, self.tokenizer, self.max_len = model, tokenizer, max_len

    @torch.no_grad()
    def encode(self, prompts):  # list[str] -> (B, max_len, dim) in the model's dtype
        ids, mask = self.tokenizer([clean_prompt(p) for p in prompts], self.max_len)
        device = self.model.token_embedding.weight.device
        ids, mask = ids.to(device), mask.to(device)
        x = self.model(ids, mask)  # (B, L, C)
        return x.masked_fill(mask[..., None] == 0, 0.0)  # mask is a prefix of ones: same as trim + zero-pad


WAN_T5_CHECKPOINT = "models_t5_umt5-xxl-enc-bf16.pth"


def hf_to_wan_keys(sd):
    # HF UMT5EncoderModel names (diffusers text_encoder/, ComfyUI umt5_xxl_*.safetensors) -> official Wan names.
    # HF ties encoder.embed_tokens.weight to shared.weight; files carry either or both.
    embed_tokens = sd.pop("encoder.embed_tokens.weight", None)
    out = {"token_embedding.weight": sd.pop("shared.weight", embed_tokens)}
    renames = [("encoder.final_layer_norm.", "norm."), ("encoder.block.", "blocks."),
               (".layer.0.layer_norm.", ".norm1."), (".layer.1.layer_norm.", ".norm2."),
               (".layer.0.SelfAttention.relative_attention_bias.", ".pos_embedding.embedding."),
               (".layer.0.SelfAttention.", ".attn."), (".layer.1.DenseReluDense.wi_0.", ".ffn.gate.0."),
               (".layer.1.DenseReluDense.wi_1.", ".ffn.fc1."), (".layer.1.DenseReluDense.wo.", ".ffn.fc2.")]
    for k, v in sd.items():
        for a, b in renames:
            k = k.replace(a, b)
        out[k] = v
    return out


def t5_config_from(sd):
    """The encoder's sizes read off the (official-key) weights: vocab and width from the embedding, heads and
    buckets from a relative-position table, depth from the block count. umT5-XXL where the keys are not there."""
    if "token_embedding.weight" not in sd or "blocks.0.pos_embedding.embedding.weight" not in sd:
        return T5_PRESETS["umt5-xxl"]
    vocab, dim = sd["token_embedding.weight"].shape
    buckets, heads = sd["blocks.0.pos_embedding.embedding.weight"].shape
    return T5Config(vocab=vocab, dim=dim, dim_attn=sd["blocks.0.attn.q.weight"].shape[0],
                    dim_ffn=sd["blocks.0.ffn.fc1.weight"].shape[0], num_heads=heads, num_buckets=buckets,
                    num_layers=1 + max(int(k.split(".")[1]) for k in sd if k.startswith("blocks.")))


def load_text_encoder(path, dtype=torch.bfloat16, device="cpu", config=None, tokenizer_path=None):
    # path: the official Wan folder (models_t5_umt5-xxl-enc-bf16.pth + google/umt5-xxl/), a diffusers-format folder
    # (text_encoder/*.safetensors + tokenizer/), or one file: the .pth, or an HF-key .safetensors such as ComfyUI's
    # umt5_xxl_fp16 / umt5_xxl_fp8_e4m3fn_scaled (their tokenizer is the embedded "spiece_model" tensor).
    # config: None = read off the weights (t5_config_from).
    assert dtype in (torch.bfloat16, torch.float32), "T5 overflows fp16; use bf16 or fp32"
    path, tok = str(path), None
    if os.path.isfile(os.path.join(path, WAN_T5_CHECKPOINT)):
        path, tok = os.path.join(path, WAN_T5_CHECKPOINT), os.path.join(path, "google", "umt5-xxl")
    if os.path.isdir(os.path.join(path, "text_encoder")):
        index = glob.glob(os.path.join(path, "text_encoder", "*.safetensors.index.json"))
        files = sorted(set(json.load(open(index[0]))["weight_map"].values())) if index else \
            [os.path.basename(f) for f in sorted(glob.glob(os.path.join(path, "text_encoder", "*.safetensors")))]
        sd = {k: v for f in files for k, v in load_file(os.path.join(path, "text_encoder", f)).items()}
        tok = os.path.join(path, "tokenizer")
    elif os.path.isdir(path):
        raise FileNotFoundError(f"{path}: expected {WAN_T5_CHECKPOINT} (Wan) or text_encoder/ (diffusers) in it")
    else:
        sd = read_weights(path)
    if "spiece_model" in sd:
        tok = sd.pop("spiece_model").numpy().tobytes()
    hf_keys = "shared.weight" in sd or "encoder.embed_tokens.weight" in sd
    if hf_keys:
        sd = hf_to_wan_keys(sd)
    sd = dequantize_scaled_fp8(sd, lambda k: dtype)  # ComfyUI's umt5_xxl_fp8_e4m3fn_scaled (the DiT loader's helper)
    config = config or t5_config_from(sd)

    with torch.device("meta"):
        model = T5Encoder(config)
    expected = model.state_dict().keys()
    missing, unexpected = sorted(expected - sd.keys()), sorted(sd.keys() - expected)
    if missing or unexpected:
        raise ValueError(f"{path}: {len(missing)} missing keys {missing[:5]}, {len(unexpected)} unexpected keys "
                         f"{unexpected[:5]}{' (HF names, shown renamed to Wan names)' if hf_keys else ''}. Expected "
                         f"the official Wan umT5-XXL encoder keys (or HF UMT5EncoderModel keys) for config {config}: "
                         f"is this the T5 encoder checkpoint (not the full encoder-decoder), with the matching config?")
    for k, v in sd.items():  # one tensor at a time, so a converted copy never coexists with all the originals
        sd[k] = v.to(device=device, dtype=dtype)
    # assign=True: the params become these tensors (nothing was allocated on meta); shape mismatches still raise
    model.load_state_dict(sd, assign=True)
    model.eval().requires_grad_(False)
    tok = tokenizer_path or tok
    if tok is None:
        raise FileNotFoundError(f"{path} has no tokenizer: pass tokenizer_path=<folder with tokenizer.json or "
                                f"spiece.model>, e.g. <Wan checkpoint folder>/google/umt5-xxl")
    return TextEncoder(model, Tokenizer(tok))

# -----------------------------------------------------------------------------------------------------
# Image encoder: the CLIP ViT-H/14 vision tower that Wan 2.1 i2v / flf2v condition on (inference only, frozen).
# models_clip_open-clip-xlm-roberta-large-vit-huge-14.pth is the whole open-clip XLM-RoBERTa-Large + ViT-H/14 (784
# tensors, text tower included); Wan uses only `visual.*`, and of it only the hidden states after block 31 of 32 (all
# 257 tokens, not the pooled embedding): the last block, post_norm and head are in the file but never run, so they
# are not built here. Module names equal the keys after `visual.` (upstream wan/modules/clip.py), so the file loads
# by its own names.

CLIP_FILE = "models_clip_open-clip-xlm-roberta-large-vit-huge-14.pth"
CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)  # OpenAI CLIP's pixel statistics, which this open-clip model keeps
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)


@dataclass
class CLIPConfig:
    dim: int = 1280
    num_heads: int = 16
    num_layers: int = 32  # in the file; the output is taken after block num_layers - 1, so the last is not built
    mlp_dim: int = 5120
    patch_size: int = 14
    image_size: int = 224  # 16 x 16 patches + the CLS token = 257 tokens
    eps: float = 1e-5


class CLIPAttention(nn.Module):
    def __init__(self, dim, num_heads):
        super().__init__()
        self.num_heads = num_heads
        self.to_qkv = nn.Linear(dim, 3 * dim)  # rows: q, then k, then v (each dim wide, heads inside)
        self.proj = nn.Linear(dim, dim)

    def forward(self, x):
        B, L, C = x.shape
        q, k, v = self.to_qkv(x).view(B, L, 3, self.num_heads, -1).permute(2, 0, 3, 1, 4)  # 3 x (B, n, L, d)
        y = F.scaled_dot_product_attention(q, k, v)  # bidirectional, scale 1/sqrt(d)
        return self.proj(y.transpose(1, 2).reshape(B, L, C))


class CLIPBlock(nn.Module):
    """Pre-norm ViT block: x + attn(norm1(x)), then x + mlp(norm2(x)); the MLP's GELU is the exact one (erf)."""

    def __init__(self, cfg: CLIPConfig):
        super().__init__()
        self.norm1 = WanLayerNorm(cfg.dim, cfg.eps, elementwise_affine=True)  # fp32 statistics, cast back below
        self.attn = CLIPAttention(cfg.dim, cfg.num_heads)
        self.norm2 = WanLayerNorm(cfg.dim, cfg.eps, elementwise_affine=True)
        self.mlp = nn.Sequential(nn.Linear(cfg.dim, cfg.mlp_dim), nn.GELU(), nn.Linear(cfg.mlp_dim, cfg.dim))

    def forward(self, x):
        x = x + self.attn(self.norm1(x).type_as(x))
        return x + self.mlp(self.norm2(x).type_as(x))


class CLIPVision(nn.Module):
    """forward(pixels (B, 3, image_size, image_size), already normalised) -> (B, 1 + (image_size/patch)^2, dim): the
    hidden states after block num_layers - 1 (block 31 of 32 for ViT-H/14: (B, 257, 1280)), in the weights' dtype."""

    def __init__(self, cfg: CLIPConfig):
        super().__init__()
        self.cfg = cfg
        n = (cfg.image_size // cfg.patch_size) ** 2
        # no bias: a pre-norm ViT (pre_norm follows), as open-clip builds it
        self.patch_embedding = nn.Conv2d(3, cfg.dim, cfg.patch_size, stride=cfg.patch_size, bias=False)
        self.cls_embedding = nn.Parameter(torch.zeros(1, 1, cfg.dim))
        self.pos_embedding = nn.Parameter(torch.zeros(1, 1 + n, cfg.dim))  # CLS first, then the patches row by row
        self.pre_norm = WanLayerNorm(cfg.dim, cfg.eps, elementwise_affine=True)
        self.transformer = nn.Sequential(*(CLIPBlock(cfg) for _ in range(cfg.num_layers - 1)))

    def forward(self, x):
        dt = self.patch_embedding.weight.dtype
        x = self.patch_embedding(x.to(dt)).flatten(2).transpose(1, 2)  # (B, n, dim)
        x = torch.cat([self.cls_embedding.to(dt).expand(x.shape[0], -1, -1), x], dim=1) + self.pos_embedding.to(dt)
        return self.transformer(self.pre_norm(x).to(dt))


class ImageEncoder:
    """encode_image(images (B, 3, H, W) in [-1, 1], any H, W) -> CLIP tokens (B, 257, 1280), as upstream's
    CLIPModel.visual: a bicubic resize of the whole image to 224 x 224 (no crop, no antialias, aspect ratio not
    kept), [-1, 1] -> [0, 1], the CLIP mean/std, the tower. The DiT's clip_fea for i2v; flf2v takes the first and the
    last frame's, concatenated on dim 1: (B, 514, 1280)."""

    def __init__(self, model: CLIPVision):
        self.model = model

    @torch.no_grad()
    def encode_image(self, images):
        p = self.model.patch_embedding.weight
        size = (self.model.cfg.image_size,) * 2
        x = F.interpolate(images.to(p.device, torch.float32), size=size, mode="bicubic", align_corners=False)
        mean, std = (torch.tensor(c, device=p.device).view(1, 3, 1, 1) for c in (CLIP_MEAN, CLIP_STD))
        return self.model(((x * 0.5 + 0.5) - mean) / std)


def clip_config_from(sd):
    """CLIPConfig from the shapes of the `visual.`-stripped state dict."""
    dim, _, patch, _ = sd["patch_embedding.weight"].shape
    n_layers = 1 + max(int(k.split(".")[1]) for k in sd if k.startswith("transformer."))
    n_pos = sd["pos_embedding"].shape[1] - 1
    return CLIPConfig(dim=dim, num_heads=dim // 80, num_layers=n_layers, patch_size=patch,
                      mlp_dim=sd["transformer.0.mlp.0.weight"].shape[0], image_size=round(n_pos ** 0.5) * patch)


CLIP_HINT = f"load_clip reads Wan 2.1's {CLIP_FILE} (open-clip XLM-RoBERTa-Large ViT-H/14; only visual.* is used)."


def load_clip(path, dtype=torch.float32, device="cpu", num_heads=None):
    """An ImageEncoder from the .pth (or the folder holding it; read with weights_only and mmap). Only `visual.*` is
    read, the text tower is ignored; the sizes come off the tensors (head_dim 80: 16 heads for ViT-H; the tests pass
    num_heads for their tiny towers). Upstream runs it in fp16 on GPU: pass dtype=torch.float16 or bfloat16 there."""
    path = str(path)
    if os.path.isdir(path):
        path = os.path.join(path, CLIP_FILE)
    sd = {k[len("visual."):]: v for k, v in read_weights(path).items() if k.startswith("visual.")}
    if "patch_embedding.weight" not in sd:
        raise KeyError(f"{path}: no visual.patch_embedding.weight. {CLIP_HINT}")
    cfg = clip_config_from(sd)
    if num_heads:
        cfg = dataclasses.replace(cfg, num_heads=num_heads)
    last = f"transformer.{cfg.num_layers - 1}."
    sd = {k: v for k, v in sd.items() if not k.startswith((last, "post_norm.")) and k != "head"}  # never run
    with torch.device("meta"):
        model = CLIPVision(cfg)
    check_keys(model.state_dict().keys(), sd, path, hint=CLIP_HINT)
    check_shapes(model.state_dict(), sd, path)
    model.load_state_dict({k: v.to(dtype) for k, v in sd.items()}, assign=True)
    return ImageEncoder(model.to(device).eval().requires_grad_(False))


# -----------------------------------------------------------------------------------------------------
# LoRA. The adapter lives INSIDE the Linear it adapts, so the base keeps its official key
# (`blocks.0.self_attn.q.weight`) and the adapter gets `blocks.0.self_attn.q.lora_A.weight` (rank, in) and
# `.lora_B.weight` (out, rank): the PEFT / ComfyUI naming, which is what we export (prefixed `diffusion_model.`).


class LoRALinear(nn.Linear):
    def __init__(self, base: nn.Linear, rank, alpha):
        nn.Module.__init__(self)
        self.in_features, self.out_features = base.in_features, base.out_features
        self.weight, self.bias = base.weight, base.bias  # the frozen base, same tensors, same names
        self.lora_A = nn.Linear(self.in_features, rank, bias=False, device=base.weight.device)
        self.lora_B = nn.Linear(rank, self.out_features, bias=False, device=base.weight.device)
        self.scale = alpha / rank

    def forward(self, x):
        return F.linear(x, self.weight, self.bias) + self.lora_B(self.lora_A(x)) * self.scale


LORA_TARGETS = "self_attn.q,self_attn.k,self_attn.v,self_attn.o,cross_attn.q,cross_attn.k,cross_attn.v,cross_attn.o,ffn.0,ffn.2"


def add_lora(model, rank, alpha, targets=LORA_TARGETS):
    """Swap the target Linears of every block for LoRALinear; freeze everything but the adapters."""
    names = targets.split(",")
    for blk in model.blocks:
        for name in names:
            parent_name, _, child = name.rpartition(".")
            parent = blk.get_submodule(parent_name)
            setattr(parent, child, LoRALinear(getattr(parent, child), rank, alpha))
    for n, p in model.named_parameters():
        p.requires_grad_(".lora_" in n)
    return model


def lora_init_state(model, seed):
    """Fresh adapter weights as a CPU state dict: A ~ kaiming-uniform (PEFT / kohya init), B = 0, so training starts
    from exactly the base model. Made on one rank and broadcast like any checkpoint, so 1 or N ranks start equal."""
    g = torch.Generator().manual_seed(seed)
    sd = {}
    for name, m in model.named_modules():
        if isinstance(m, LoRALinear):
            r, n_in = m.lora_A.weight.shape
            bound = 1 / math.sqrt(n_in)  # = kaiming_uniform_(a=sqrt(5)) for a (r, n_in) weight
            sd[name + ".lora_A.weight"] = (torch.rand(r, n_in, generator=g) * 2 - 1) * bound
            sd[name + ".lora_B.weight"] = torch.zeros(m.lora_B.weight.shape)
    return sd


def kohya_module_name(flat):
    """musubi/kohya LoRA files flatten the module path with underscores: blocks_0_self_attn_q -> blocks.0.self_attn.q."""
    mod = flat.replace("_", ".")
    # k.img/v.img: Wan 2.1 i2v/flf2v's image projections, which musubi adapts too (every Linear of a block)
    for a, b in (("self.attn", "self_attn"), ("cross.attn", "cross_attn"), ("norm.q", "norm_q"), ("norm.k", "norm_k"),
                 ("k.img", "k_img"), ("v.img", "v_img")):
        mod = mod.replace(a, b)
    return mod


def read_lora(path, diffs=None):
    """A LoRA file in ComfyUI's format (ours, diffusion-pipe's, Kijai's lora_down/lora_up), musubi's kohya format or
    diffusers' (`transformer.blocks.0.attn1.to_q.lora_A.weight`: renamed back by the DiT loader's table) ->
    (official-key state dict `X.lora_A.weight` / `X.lora_B.weight`, rank, alpha); common/lora_file.py has the rules.
    diffs: a dict
    for the full-weight deltas (`X.diff`, `X.diff_b`) as {"X.weight": .., "X.bias": ..}; None refuses them."""
    sd = lora_file.read_lora(path, prefixes=("diffusion_model.", "transformer."), kohya_name=kohya_module_name,
                             diffs=diffs)
    if any(k.startswith("condition_embedder.") or ".attn1." in k or ".attn2." in k or ".ffn.net." in k for k in sd[0]):
        if diffs:
            diffs.update(diffusers_to_official_dit({k: diffs.pop(k) for k in list(diffs)}))
        return (diffusers_to_official_dit(sd[0]), *sd[1:])
    return sd


def lora_for(path, cfg):
    """--mode sample --lora: the file read and checked against the model of `cfg` -> (adapters of the blocks'
    Linears, {"X.weight" / "X.bias": delta to add}, rank, alpha). The deltas are the file's .diff / .diff_b and its
    adapters outside the blocks merged ((alpha / rank) B @ A: add_lora adapts the blocks only). A module the model
    lacks (a Wan 2.1 i2v LoRA's cross_attn.k_img on a Wan 2.2 expert, a 14B LoRA's blocks.35 on the 1.3B) or a shape
    it does not have is one UserError line naming the keys."""
    diffs = {}
    with torch.device("meta"):
        model = WanModel(cfg)
    try:
        lsd, rank, alpha = read_lora(path, diffs)
        lora_file.check_fits(path, lsd, rank, model, diffs)
    except ValueError as e:
        raise UserError(str(e)) from None
    lora_file.fold_outside(lsd, rank, alpha, "blocks.", diffs)
    return lsd, diffs, rank, alpha


# The released model each preset is, for the exports' header (what a LoRA was trained on)
RELEASES = {"1.3B": "Wan2.1-T2V-1.3B", "14B": "Wan2.1-T2V-14B", "i2v-14B": "Wan2.1-I2V-14B",
            "flf2v-14B": "Wan2.1-FLF2V-14B", "ti2v-5B": "Wan2.2-TI2V-5B", "t2v-A14B": "Wan2.2-T2V-A14B",
            "i2v-A14B": "Wan2.2-I2V-A14B"}


def release_name(cfg, expert=""):
    """'Wan2.2-T2V-A14B-high-noise', 'Wan2.1-T2V-1.3B', ... from the architecture (an A14B expert has the 14B's
    shapes: `expert` tells them apart); 'Wan-<model_type>-custom' for shapes no release has (toy, tiny)."""
    names = [RELEASES[p] for p, c in DIT_PRESETS.items()
             if p in RELEASES and c == cfg and p.endswith("A14B") == bool(expert)]
    return (names[0] if names else f"Wan-{cfg.model_type}-custom") + (f"-{expert}-noise" if expert else "")


def export_weights(model, args, cfg, path, expert=""):
    """The LoRA in ComfyUI's key format (diffusion_model.<official module>.lora_A/.lora_B.weight + .alpha), which
    ComfyUI and diffusers load without conversion; a full fine-tune as the official-key DiT in bf16, its config in
    the header. Collective (every rank gathers); rank 0 writes. A LoRA export gathers only the adapters."""
    lora = args.lora_rank > 0
    sd = gather_params(model, only=(lambda k: ".lora_" in k) if lora else None)
    if torch.distributed.get_rank() != 0:
        return
    meta = {"format": "pt", "base_model": release_name(cfg, expert),
            "wan_config": json.dumps(dataclasses.asdict(cfg)), "args": json.dumps(dataclasses.asdict(args))}
    if lora:
        alpha = args.lora_alpha or args.lora_rank
        meta.update(lora_rank=args.lora_rank, lora_alpha=float(alpha), lora_targets=args.lora_targets)
        lora_file.write_lora(path, sd, alpha, metadata=meta)
    else:
        from safetensors.torch import save_file
        save_file({k: v.to(torch.bfloat16).contiguous() for k, v in sd.items()}, path + ".tmp", metadata=meta)
        os.replace(path + ".tmp", path)


# -----------------------------------------------------------------------------------------------------
# Flow matching, the Wan convention: sigma in [0, 1], sigma = 1 is pure noise,
#   x_t = (1 - sigma) * x0 + sigma * noise,   target velocity v = noise - x0,   model timestep t = 1000 * sigma.


def shift_sigma(sigma, shift):
    """The resolution shift used by Wan's schedulers: s*sigma / (1 + (s-1)*sigma). shift > 1 moves mass to noise."""
    return shift * sigma / (1 + (shift - 1) * sigma)


def sample_sigmas(n, method, shift=1.0, generator=None, device="cpu"):
    """Training sigmas. uniform: U(0,1). logit_normal: sigmoid(N(0,1)) (SD3; diffusion-pipe's default).
    shift: U(0,1) through shift_sigma (DiffSynth's Wan recipe; musubi's `shift` uses logit-normal first, which is
    `logit_normal` with --shift). Any method is shifted when shift != 1."""
    if method == "uniform" or method == "shift":
        s = torch.rand(n, generator=generator, device=device)
    elif method == "logit_normal":
        s = torch.sigmoid(torch.randn(n, generator=generator, device=device))
    else:
        raise ValueError(f"--timestep_sampling must be uniform, logit_normal or shift, got {method!r}")
    return shift_sigma(s, shift) if shift != 1.0 else s


def sigma_mass(method, shift, lo, hi):
    """P(lo <= sigma < hi) for the training sigmas of sample_sigmas(method, shift): undo the shift, then the CDF of
    U(0, 1) or of sigmoid(N(0, 1))."""
    def cdf(s):
        s = torch.tensor(s / (shift - (shift - 1) * s), dtype=torch.float64)  # shift_sigma's inverse
        return float(torch.special.ndtr(torch.logit(s))) if method == "logit_normal" else float(s)
    return cdf(hi) - cdf(lo)


def flow_loss(model, x0, context, sigma, noise, y=None, clip_fea=None, clean_first=False):
    """MSE between the predicted and the true velocity; x0, noise (B,C,F,H,W); sigma (B,). y, clip_fea: the image
    conditioning of i2v/flf2v (WanModel.forward). clean_first (TI2V-5B image-to-video, upstream textimage2video.py):
    latent frame 0 is given clean, its t is 0 (one t per latent frame, (B, F)) and it is left out of the loss. True
    for the whole batch, or a (B,) bool on the CPU, per sample (--first_frame_p: one batch mixes i2v and t2v): the
    mean is then over the elements that count, as if the batch's samples were one."""
    s = sigma.view(-1, 1, 1, 1, 1)
    xt = (1 - s) * x0 + s * noise
    t = sigma * 1000
    first = torch.as_tensor(clean_first).expand(len(x0))  # (B,) bool, CPU: testing it costs no device sync
    kw = {k: c for k, c in (("y", y), ("clip_fea", clip_fea)) if c is not None}
    if first.any() and not first.all():
        f0 = first.to(x0.device, non_blocking=True)
        xt = torch.cat([torch.where(f0.view(-1, 1, 1, 1, 1), x0[:, :, :1], xt[:, :, :1]), xt[:, :, 1:]], dim=2)
        t = per_token_t(t, x0.shape[2], 1, 1)  # (B, F)
        t[:, 0] = torch.where(f0, 0.0, t[:, 0])
        err = (model(xt, t, context, **kw).float() - (noise - x0).float()) ** 2
        keep = torch.ones(len(x0), 1, x0.shape[2], 1, 1, device=x0.device)  # (B, 1, F, 1, 1): 0 where frame 0 is
        keep[:, :, 0] = (~f0).float().view(-1, 1, 1, 1)                     # given clean
        return (err * keep).sum() / (keep.sum() * err[0, :, 0].numel())
    if first.all():
        xt = torch.cat([x0[:, :, :1], xt[:, :, 1:]], dim=2)
        t = per_token_t(t, x0.shape[2], 1, 1, clean_first=True)  # (B, F): 0 on latent frame 0
    v = model(xt, t, context, **kw)
    k = int(first.all())
    return F.mse_loss(v[:, :, k:].float(), (noise - x0)[:, :, k:].float())


# The official negative prompt (wan/configs/shared_config.py), used for classifier-free guidance.
NEGATIVE_PROMPT = ("色调艳丽，过曝，静态，细节模糊不清，字幕，风格，作品，画作，画面，静止，整体发灰，最差质量，低质量，JPEG压缩残留，丑陋的，"
                   "残缺的，多余的手指，画得不好的手部，画得不好的脸部，畸形的，毁容的，形态畸形的肢体，手指融合，静止不动的画面，杂乱的背景，"
                   "三条腿，背景人很多，倒着走")


def official_negative(cfg):
    """The negative prompt upstream samples this model with by default: Wan 2.1's image models prefix the shared one,
    I2V-14B with "镜头晃动，" (camera shake; wan/configs/wan_i2v_14B.py) and FLF2V-14B, whose config is a copy of the
    i2v one, with "镜头切换，" (shot change) in front of that (wan/configs/__init__.py). Wan 2.2 (I2V-A14B, TI2V-5B)
    and every t2v model use the shared one as it is."""
    if cfg.img_dim and cfg.model_type == "flf2v":
        return "镜头切换，镜头晃动，" + NEGATIVE_PROMPT
    return "镜头晃动，" + NEGATIVE_PROMPT if cfg.img_dim and cfg.model_type == "i2v" else NEGATIVE_PROMPT


def sampling_sigmas(steps, shift):
    """The official schedule: sigma = linspace(0.999, 0, steps+1)[:-1] shifted, then a final 0 (sigma_max is 0.999
    because the training table of the schedulers is 1 - linspace(1, 1/1000, 1000)). -> (steps+1,) float64."""
    s = torch.linspace(0.999, 0, steps + 1, dtype=torch.float64)[:-1]
    return torch.cat([shift_sigma(s, shift), torch.zeros(1, dtype=torch.float64)])


def conditioned(model, first=None, y=None, clip_fea=None):
    """The DiT as the samplers call it, model(x, t, context), with a sample's image conditioning bound in: y and
    clip_fea (i2v/flf2v, (1, ...), repeated over the batch of cond + uncond), or the clean first latent frame `first`
    (1, C, 1, h, w) of TI2V-5B: put in place of frame 0 at every call with t = 0 there, and velocity 0 on it, so that
    a sampler that starts from noise whose frame 0 is `first` keeps it exactly (upstream re-applies it every step)."""
    def call(x, t, context):
        n = x.shape[0]
        if first is not None:
            x = torch.cat([first.to(x).expand(n, -1, -1, -1, -1), x[:, :, 1:]], dim=2)
            t = per_token_t(t, x.shape[2], 1, 1, clean_first=True)
        v = model(x, t, context, None if y is None else y.expand(n, *y.shape[1:]),
                  None if clip_fea is None else clip_fea.expand(n, *clip_fea.shape[1:]))
        return v if first is None else torch.cat([torch.zeros_like(v[:, :, :1]), v[:, :, 1:]], dim=2)
    return call


def velocity(model, x, sigma, context, neg_context, guidance):
    """v = uncond + g * (cond - uncond); cond and uncond in one batch of 2B. guidance: the scale g, or (low, high,
    boundary) for the Wan 2.2 A14B experts: g = high on the high-noise expert's steps, t >= boundary * 1000 (the
    test Experts.forward makes, on this same t), low below, as upstream's text2video.py / image2video.py switch
    sample_guide_scale (low, high) with the expert."""
    t = torch.full((x.shape[0],), float(sigma) * 1000, device=x.device)
    if isinstance(guidance, tuple):
        low, high, boundary = guidance
        guidance = high if bool((t >= boundary * 1000).all()) else low
    if guidance == 1.0 or neg_context is None:
        return model(x, t, context).float()
    v = model(torch.cat([x, x]), torch.cat([t, t]), torch.cat([context, neg_context])).float()
    cond, uncond = v.chunk(2)
    return uncond + guidance * (cond - uncond)


@torch.no_grad()
def sample_euler(model, noise, context, neg_context=None, steps=50, guidance=5.0, shift=5.0):
    """First-order flow-matching ODE solver from sigma = 0.999 to 0. Given the exact velocity of the straight path
    through the current point, (x - x0) / sigma, every step stays on that path and x0 comes back exactly. guidance
    as in `velocity` (a scale, or the A14B experts' (low, high, boundary))."""
    sigmas = sampling_sigmas(steps, shift).tolist()
    x = noise.float()
    for s, s_next in zip(sigmas[:-1], sigmas[1:]):
        x = x + (s_next - s) * velocity(model, x, s, context, neg_context, guidance)
    return x


# -----------------------------------------------------------------------------------------------------
# UniPC: the official Wan 2.1 sampler (FlowUniPCMultistepScheduler in wan/utils/fm_solvers_unipc.py, called by
# wan/text2video.py with solver_order 2, bh2, predict_x0, lower_order_final, final_sigmas_type zero), as a plain
# loop. Same sigmas as sample_euler; the ODE is solved in the half log-SNR lambda = log(alpha / sigma), alpha =
# 1 - sigma, where it is exactly linear in the x0 prediction m = x - sigma * v (an exponential integrator):
#   x_t = (sigma_t / sigma_s) * x_s - alpha_t * expm1(-h) * m + (terms in past m's),   h = lambda_t - lambda_s
# Each step k: 1 model call at x_k -> m_k; UniC corrects x_k (redoes step k-1 -> k, now also using m_k); UniP
# predicts x_{k+1} from the corrected x_k with m_k and m_{k-1}. Order 1 on the first step (no m_{k-1} yet) and on the
# last (sigma = 0, where the update is exactly x = m). Coefficients in float64 python floats (upstream: fp32 scalars).
#
# Model timesteps: upstream feeds the DiT int64(sigma * 1000), truncated (999 for sigma 0.9998), while the solver
# uses the float sigma; we do the same so that a released model sees exactly the timesteps it sees upstream.
# unipc_timesteps() recomputes them op for op as upstream does (numpy's linspace from sigma_max = fp32(0.999)):
# int(sampling_sigmas * 1000) would differ by 1 wherever sigma * 1000 lands on an integer (shift 1: steps 3, 6, 9, ...).


def unipc_timesteps(steps, shift):
    """The integer timesteps upstream's FlowUniPCMultistepScheduler.set_timesteps(steps, shift=shift) passes to the
    model -> (steps,) int64. Its training table stores sigma_max = 1 - 1/1000 in fp32 (0.99900001287...), and
    np.linspace(a, 0, n + 1) computes a + i * ((0 - a) / n); the shift is in float64; astype(int64) truncates."""
    sigma_max = float(torch.tensor(0.999, dtype=torch.float32))
    s = torch.arange(steps + 1, dtype=torch.float64) * ((0 - sigma_max) / steps) + sigma_max
    return (shift_sigma(s[:-1], shift) * 1000).long()  # .long() truncates toward zero like astype(int64)


def _x0_step(x, m, s, s_next):
    """First-order exponential-integrator step from sigma s to s_next (> 0), x0-prediction form; also the base of
    every higher-order step. x, m (B,C,F,H,W). Returns (x_next, alpha_next * expm1(-h), h)."""
    h = math.log((1 - s_next) / s_next) - math.log((1 - s) / s)  # lambda_next - lambda > 0 (sigma decreases)
    a_e = (1 - s_next) * math.expm1(-h)  # alpha_next * (exp(-h) - 1) < 0
    return (s_next / s) * x - a_e * m, a_e, h


@torch.no_grad()
def sample_unipc(model, noise, context, neg_context=None, steps=50, guidance=5.0, shift=5.0):
    """UniPC-2 (bh2) flow-matching sampler, the official Wan 2.1 inference loop, from sigma = 0.999 (shifted) to 0.
    noise (B,C,F,H,W); context, neg_context (B,L,D); guidance as in `velocity`. -> x0 estimate (B,C,F,H,W) fp32."""
    sigmas = sampling_sigmas(steps, shift).tolist()  # (steps + 1,), last one 0
    lam = [math.log((1 - s) / s) if s > 0 else math.inf for s in sigmas]  # half log-SNR per sigma, increasing
    ts = unipc_timesteps(steps, shift).tolist()  # (steps,) ints the model sees
    x = noise.float()
    x_last = None  # x_{k-1}: the (corrected) point the previous predictor started from
    ms = []  # x0 predictions m_{k-2}, m_{k-1}, m_k (only the last 3 are kept)
    order_last = 1  # order of the previous predictor = order of this step's corrector
    for k in range(steps):
        # t/1000 * 1000 rounds back to the integer t in velocity's fp32 timestep (checked for t = 0..1000)
        v = velocity(model, x, ts[k] / 1000, context, neg_context, guidance)
        ms = (ms + [x - sigmas[k] * v])[-3:]  # m_k, from the *uncorrected* x_k, as upstream
        m = ms[-1]

        if k > 0:  # UniC: redo step k-1 -> k from x_{k-1}, using m_{k-1} and the new m_k (and m_{k-2} if order 2)
            x, a_e, h = _x0_step(x_last, ms[-2], sigmas[k - 1], sigmas[k])
            d_t = m - ms[-2]
            if order_last == 1:
                x = x - a_e * 0.5 * d_t  # upstream fixes rho = 0.5 for the order-1 corrector (the trapezoid rule)
            else:
                # rho solves [[1, 1], [r, 1]] @ rho = b, with r the previous lambda step relative to this one and b the
                # bh2 weights of the phi functions; D1 the backward difference of m over that previous step
                r = (lam[k - 2] - lam[k - 1]) / h  # < 0
                d1 = (ms[-3] - ms[-2]) / r
                phi1 = math.expm1(-h) / -h - 1  # upstream's h_phi_k after the first and second update
                phi2 = phi1 / -h - 0.5
                b1, b2 = phi1 / math.expm1(-h), 2 * phi2 / math.expm1(-h)
                rho0 = (b1 - b2) / (1 - r)
                rho1 = b1 - rho0
                x = x - a_e * (rho0 * d1 + rho1 * d_t)

        # UniP: predict x_{k+1}. Order 1 on the first step (warm-up) and the last (lower_order_final; sigma = 0)
        order = 1 if k == 0 or k == steps - 1 else 2
        x_last, order_last = x, order
        if sigmas[k + 1] == 0:  # lambda = inf: exp(-h) = 0, the step lands on the x0 prediction itself
            x = m
        else:
            x, a_e, h = _x0_step(x, m, sigmas[k], sigmas[k + 1])
            if order == 2:  # + alpha * expm1(-h) * 0.5 * D1 (bh2 predictor with upstream's fixed rho = 0.5)
                r = (lam[k - 1] - lam[k]) / h
                x = x - a_e * 0.5 * (ms[-2] - m) / r
    return x


# -----------------------------------------------------------------------------------------------------
# Loading the released weights. Accepted DiT layouts (README lists them):
#   1. the official folder (Wan-AI/Wan2.1-T2V-1.3B, -14B): config.json + diffusion_pytorch_model.safetensors, or
#      diffusion_pytorch_model-0000k-of-0000n.safetensors + diffusion_pytorch_model.safetensors.index.json
#   2. a single .safetensors file with the official keys, optionally prefixed `model.diffusion_model.` or
#      `diffusion_model.` (ComfyUI's repackaged wan2.1_t2v_*.safetensors); the config is read off the shapes
#   3. the diffusers repo (Wan-AI/Wan2.1-T2V-1.3B-Diffusers) or its transformer/ folder: renamed back below


# diffusers' WanTransformer3DModel names -> the official names (the reverse of diffusers' own conversion).
# Order matters: the specific patterns come before the general ones.
DIFFUSERS_DIT_RENAMES = [
    # Wan 2.1 i2v/flf2v: the image projection and the image keys/values of cross-attention
    ("condition_embedder.image_embedder.norm1.", "img_emb.proj.0."),
    ("condition_embedder.image_embedder.ff.net.0.proj.", "img_emb.proj.1."),
    ("condition_embedder.image_embedder.ff.net.2.", "img_emb.proj.3."),
    ("condition_embedder.image_embedder.norm2.", "img_emb.proj.4."),
    ("condition_embedder.image_embedder.pos_embed", "img_emb.emb_pos"),
    (".attn2.add_k_proj.", ".cross_attn.k_img."), (".attn2.add_v_proj.", ".cross_attn.v_img."),
    (".attn2.norm_added_k.", ".cross_attn.norm_k_img."),
    ("condition_embedder.time_embedder.linear_1.", "time_embedding.0."),
    ("condition_embedder.time_embedder.linear_2.", "time_embedding.2."),
    ("condition_embedder.time_proj.", "time_projection.1."),
    ("condition_embedder.text_embedder.linear_1.", "text_embedding.0."),
    ("condition_embedder.text_embedder.linear_2.", "text_embedding.2."),
    (".attn1.to_out.0.", ".self_attn.o."), (".attn1.to_", ".self_attn."), (".attn1.", ".self_attn."),
    (".attn2.to_out.0.", ".cross_attn.o."), (".attn2.to_", ".cross_attn."), (".attn2.", ".cross_attn."),
    (".norm2.", ".norm3."),  # diffusers' only affine block norm (the pre-cross-attention one) is norm2
    (".ffn.net.0.proj.", ".ffn.0."), (".ffn.net.2.", ".ffn.2."),
    (".scale_shift_table", ".modulation"), ("proj_out.", "head.head."),
]


def diffusers_to_official_dit(sd):
    out = {}
    for k, v in sd.items():
        if k == "scale_shift_table":
            k = "head.modulation"
        for a, b in DIFFUSERS_DIT_RENAMES:
            k = k.replace(a, b)
        out[k] = v
    return out


def model_type_from(in_dim, out_dim, flf):
    """The model_type a file without one implies: flf2v has emb_pos, i2v takes y (more channels in than out), the
    Wan 2.2 VAE's 48-channel latents mean TI2V-5B (for t2v/ti2v the type changes no weight: only how it is fed)."""
    return "flf2v" if flf else "i2v" if in_dim != out_dim else "ti2v" if out_dim == 48 else "t2v"


def dit_config_from(cfg_json=None, sd=None):
    """WanConfig from an official or diffusers config.json, else from the tensor shapes. The weights (`sd`, official
    keys; meta tensors will do) decide img_dim either way: a Wan 2.1 i2v/flf2v DiT has img_emb.*, a Wan 2.2 I2V-A14B
    expert (also "i2v" in its config.json) has a 36-channel patch_embedding and no img_emb."""
    if cfg_json is not None and "num_attention_heads" in cfg_json:  # diffusers
        c = cfg_json
        cfg_json = dict(dim=c["num_attention_heads"] * c["attention_head_dim"], ffn_dim=c["ffn_dim"],
                        num_heads=c["num_attention_heads"], num_layers=c["num_layers"], in_dim=c["in_channels"],
                        out_dim=c["out_channels"], text_dim=c.get("text_dim", 4096), freq_dim=c.get("freq_dim", 256),
                        eps=c.get("eps", 1e-6), model_type=model_type_from(c["in_channels"], c["out_channels"],
                                                                           bool(c.get("pos_embed_seq_len"))))
    if cfg_json is not None:
        fields = {f.name for f in dataclasses.fields(WanConfig)}
        cfg = WanConfig(**{k: v for k, v in cfg_json.items() if k in fields and k not in ("patch_size", "img_dim")})
        if "model_type" not in cfg_json:  # a hand-made config.json: the shapes say
            cfg = dataclasses.replace(cfg, model_type=model_type_from(cfg.in_dim, cfg.out_dim,
                                                                      sd is not None and "img_emb.emb_pos" in sd))
    else:
        dim, in_dim = sd["patch_embedding.weight"].shape[:2]
        out_dim = sd["head.head.weight"].shape[0] // 4
        n_layers = 1 + max(int(k.split(".")[1]) for k in sd if k.startswith("blocks."))
        cfg = WanConfig(dim=dim, in_dim=in_dim, num_heads=dim // 128, num_layers=n_layers,
                        ffn_dim=sd["blocks.0.ffn.0.weight"].shape[0], text_dim=sd["text_embedding.0.weight"].shape[1],
                        out_dim=out_dim, model_type=model_type_from(in_dim, out_dim, "img_emb.emb_pos" in sd))
    if sd is not None and "img_emb.proj.0.weight" in sd:
        cfg = dataclasses.replace(cfg, img_dim=sd["img_emb.proj.0.weight"].shape[0])
    mt, need_in = cfg.model_type, 2 * cfg.out_dim + 4 if cfg.model_type in ("i2v", "flf2v") else cfg.out_dim
    if mt not in ("t2v", "i2v", "flf2v", "ti2v"):
        raise ValueError(f"model_type {mt!r}: train_wan.py implements t2v, i2v, flf2v and ti2v (VACE, S2V and "
                         "Animate have other weights)")
    if cfg.in_dim != need_in:
        raise ValueError(f"model_type {mt!r} with in_dim {cfg.in_dim}: a {mt} DiT takes {need_in} input channels"
                         + (" (noisy latents, 4-channel mask, conditioning latents)" if mt in ("i2v", "flf2v") else ""))
    if mt == "flf2v" and not cfg.img_dim:
        raise ValueError("model_type 'flf2v' without img_emb.* weights: first-last-frame needs the CLIP projection")
    return cfg


# Wan 2.2 A14B roots: expert -> its DiT folder, in the official layout and in diffusers' (Wan2.2-*-A14B-Diffusers,
# whose pipeline_wan.py runs `transformer` at t >= boundary_ratio * 1000, the high-noise steps, `transformer_2` below)
A14B_LAYOUTS = ({"high": "high_noise_model", "low": "low_noise_model"}, {"high": "transformer", "low": "transformer_2"})


def a14b_folders(root):
    """{"high": DiT folder, "low": DiT folder} when `root` is a Wan 2.2 A14B root in either layout, else None."""
    for layout in A14B_LAYOUTS:
        if root and all(os.path.isdir(os.path.join(root, d)) for d in layout.values()):
            return {e: os.path.join(root, d) for e, d in layout.items()}
    return None


def a14b_boundary(root):
    """The boundary sigma a diffusers A14B root's model_index.json gives (`boundary_ratio`), else None."""
    index = os.path.join(root, "model_index.json")
    if not os.path.exists(index):
        return None
    with open(index) as f:
        return json.load(f).get("boundary_ratio")


def dit_files(path):
    """-> (the .safetensors files of the DiT at `path`, its config.json as a dict or None), for any layout above."""
    path = str(path)
    if os.path.isdir(path):
        experts = a14b_folders(path)
        if experts:  # two DiTs: main() takes the root (expert_folders); one model is one of the folders
            raise FileNotFoundError(f"{path}: a Wan 2.2 A14B folder holds one DiT per expert: load "
                                    f"{experts['high']} or {experts['low']} (the high-, the low-noise one)")
        if os.path.isdir(os.path.join(path, "transformer")):  # diffusers repo root
            path = os.path.join(path, "transformer")
        experts = [e for e in A14B_LAYOUTS[0].values() if os.path.isdir(os.path.join(path, e))]
        if experts and not glob.glob(os.path.join(path, "diffusion_pytorch_model*.safetensors")):
            raise FileNotFoundError(f"{path}: a Wan 2.2 A14B folder holds one DiT per expert: load "
                                    + " or ".join(os.path.join(path, e) for e in experts))
        cfg_file = os.path.join(path, "config.json")
        cfg_json = None
        if os.path.exists(cfg_file):
            with open(cfg_file) as f:
                cfg_json = json.load(f)
        return safetensors_files(path, "diffusion_pytorch_model"), cfg_json
    if path.endswith(".safetensors") and os.path.isfile(path):
        return [path], None
    raise FileNotFoundError(f"{path}: expected a DiT checkpoint folder or a .safetensors file")


def official_dit_keys(sd, dtype=None, root_dtype=None):
    """Strip a ComfyUI prefix, dequantize ComfyUI's fp8_scaled weights, rename diffusers keys back: -> the official key
    names. With `dtype`, every floating tensor ends in it, those outside the blocks in `root_dtype` (None: `dtype`)."""
    for prefix in ("model.diffusion_model.", "diffusion_model."):  # the fp8_scaled marker `scaled_fp8` is unprefixed
        if sd and all(k.startswith(prefix) for k in sd if k != "scaled_fp8"):
            sd = {k.removeprefix(prefix): v for k, v in sd.items()}

    def dtype_of(k):  # diffusers' block keys start with blocks. too
        return (dtype if k.startswith("blocks.") else root_dtype or dtype) or torch.float32
    sd = dequantize_scaled_fp8(sd, dtype_of)
    if dtype is not None:
        sd = {k: v.to(dtype_of(k)) if v.is_floating_point() else v for k, v in sd.items()}  # a no-op when it is
    if any(k.startswith("condition_embedder.") for k in sd):
        sd = diffusers_to_official_dit(sd)
    return sd


def read_dit_config(path):
    """The WanConfig of the DiT at `path` without reading its weights: config.json, or the config our own exports
    carry in their header, or the tensor shapes in the safetensors header."""
    files, cfg_json = dit_files(path)
    shapes = {}
    for f in files:
        meta, sh = safetensors_header(f)
        if "wan_config" in meta and cfg_json is None:  # our exports (toy/tiny/custom shapes)
            c = json.loads(meta["wan_config"])
            return WanConfig(**{**c, "patch_size": tuple(c["patch_size"])})
        shapes.update(sh)
    # config.json gives the dims; the header's shapes still tell a Wan 2.1 i2v DiT from a Wan 2.2 i2v expert
    sd = official_dit_keys({k: torch.empty(v, device="meta") for k, v in shapes.items()})
    try:
        return dit_config_from(cfg_json, sd)
    except KeyError as e:  # a tensor the shapes are read off (or a config.json field) is not there
        what = "its config.json has no" if cfg_json is not None else "no tensor"
        raise ValueError(f"{path}: {what} {e.args[0]} (keys such as {sorted(sd)[:3]}): is this a Wan DiT? "
                         + DIT_HINT) from None


def read_dit_checkpoint(path, dtype=None, root_dtype=None):
    """-> (WanConfig, state dict with official keys on CPU). Each tensor is cast to `dtype` as it is read, the ones
    outside the blocks to `root_dtype` (None: `dtype`): a LoRA's frozen blocks in bf16 beside the embeddings and head,
    which the model keeps in fp32, read as fp32. float8 tensors stay as they are until official_dit_keys casts them
    (fp8_scaled ones: dequantizes)."""
    files, _ = dit_files(path)
    sd = {}
    for fn in files:
        with safe_open(fn, framework="pt", device="cpu") as f:
            for k in f.keys():
                t = f.get_tensor(k)
                bare = k.removeprefix("model.").removeprefix("diffusion_model.")
                want = dtype if bare.startswith("blocks.") else root_dtype or dtype
                keep = t.element_size() == 1 or k.endswith((".scale_weight", ".scale_input"))  # fp8 and its fp32 scale
                sd[k] = t.to(want) if want is not None and t.is_floating_point() and not keep else t
    return read_dit_config(path), official_dit_keys(sd, dtype, root_dtype)


DIT_HINT = ("train_wan.py loads the Wan 2.1 t2v / i2v / flf2v and Wan 2.2 ti2v-5B DiTs and each Wan 2.2 A14B expert "
            "(its high_noise_model/ or low_noise_model/ folder, diffusers' transformer/ or transformer_2/): the "
            "official folder, a single official-key .safetensors (ComfyUI's repackaged files, fp8_scaled ones too) or "
            "a diffusers folder.")


def load_dit(path, dtype=torch.float32, device="cpu"):
    """A WanModel (eval mode) from any supported layout, built on the meta device and filled with the weights."""
    cfg, sd = read_dit_checkpoint(path, dtype)
    with torch.device("meta"):
        model = WanModel(cfg)
    check_keys(model.state_dict().keys(), sd, path, hint=DIT_HINT)
    check_shapes(model.state_dict(), sd, path)
    model.load_state_dict(sd, assign=True)
    return model.to(device).eval()


# -----------------------------------------------------------------------------------------------------
# Flags (common/args.py turns every field into --name value; the comment is its --help). The same names in every
# train_*.py.


@dataclass
class Args:
    mode: str = "train"  # train | cache (encode the dataset, stop) | sample (videos for --sample_prompts) | bench
    preset: str = "1.3B"  # toy|tiny|1.3B|14B|i2v-14B|flf2v-14B|ti2v-5B|t2v-A14B|i2v-A14B (a checkpoint's config wins)
    ckpt_dir: str = ""  # the official folder (DiT, VAE, umT5, CLIP): Wan2.1-*, Wan2.2-TI2V-5B, an A14B root; "" = init
    dit_path: str = ""  # a DiT elsewhere than ckpt_dir: a ComfyUI file, a diffusers folder, a model.safetensors of ours
    encoders: str = "official"  # official (the VAE and umT5 of --ckpt_dir) | toy (data/toy.py's pixel-space pair)
    # t2v | i2v | flf2v; "" = the model's own (config.json's model_type; TI2V-5B: t2v). TI2V-5B does either from one
    # checkpoint: i2v trains with the clip's first latent frame kept clean (t = 0, out of the loss)
    task: str = ""  # t2v | i2v | flf2v; "" = the model's own (TI2V-5B: t2v; --task i2v keeps frame 0 clean)
    # TI2V-5B learns both tasks in one run with a share of the samples trained as i2v (upstream trained it on both;
    # LTX's first_frame_p likewise): each sample's draw is a pure function of (seed, step, index), as the sigmas
    first_frame_p: float = -1.0  # TI2V-5B: the share of samples trained as i2v; -1: 1 with --task i2v, 0 with t2v
    # Wan 2.2 A14B (--ckpt_dir or --dit_path holding high_noise_model/ and low_noise_model/, or diffusers'
    # transformer/ and transformer_2/): which expert trains. high | low: one,
    # on its sigma range; both ("" too): each step's sigmas fall on one side of the boundary and pick the expert
    expert: str = ""  # A14B root: high | low (one expert, on its sigma range) | both ("" too: each step picks one)
    # --boundary 0 on a diffusers A14B root: its model_index.json's boundary_ratio
    boundary: float = 0.0  # A14B: the sigma where the high-noise expert hands over; 0 = official (t2v 0.875, i2v 0.9)
    data: str = ""  # a folder of videos/images + same-name .txt captions, or a .jsonl/.csv; several: clips/,stills/*3
    cache_dir: str = "cache"  # encoded latents and text embeddings (keyed by content and settings)
    out_dir: str = ""  # the run folder; default runs/wan-<preset> (runs/wan-<preset>-sample for --mode sample)
    # data
    height: int = 480  # the bucket area is height*width; buckets keep that area at other aspect ratios
    width: int = 832  # (sides are multiples of 16: the Wan 2.1 VAE's 8 times the patch's 2; 32 with the 2.2 VAE)
    frames: int = 81  # the most frames of a clip (4k+1); shorter videos get the largest 4k+1 that fits
    min_frames: int = 1  # shorter clips are skipped
    fps: int = 16  # Wan's frame rate: videos are resampled to it
    clips_per_video: int = 1  # consecutive clips from one long video (0 = as many as fit)
    val_count: int = 0  # source files held out for the validation loss
    caption_dropout: float = 0.0  # probability that a sample trains with the empty prompt (what guidance contrasts)
    # LoRA (rank 0 = full fine-tune)
    lora_rank: int = 0  # LoRA rank; 0 = full fine-tune
    lora_alpha: float = 0.0  # LoRA alpha; 0 = the rank (scale 1, as diffusion-pipe)
    lora_targets: str = LORA_TARGETS  # the Linears (inside each block) that get an adapter
    lora_plus: float = 1.0  # LoRA+: lora_B learns at this multiple of --lr (the paper: 16; musubi's loraplus_lr_ratio)
    lora: str = ""  # --mode sample: a LoRA file to apply (ours, diffusion-pipe's, musubi's); A14B: HIGH,LOW or a run folder
    init_lora: str = ""  # train: the adapter starts from this LoRA file, with its rank, alpha and targets (as --lora)
    base_lora: str = ""  # merged into the frozen base first (train, sample): PATH[:MULT],...; A14B: high=PATH for one
    # optimisation
    global_batch: int = 8  # samples per optimizer step, over all ranks; accumulation = global / (micro * world / sp)
    micro_batch: int = 1  # samples per forward on one rank; 0 = global_batch / (world / sp) (no accumulation)
    lr: float = 1e-4  # peak learning rate (AdamW)
    warmup_steps: int = 50  # linear warmup from 0
    lr_schedule: str = "constant"  # constant | cosine (after warmup, to 0 at max_steps)
    max_steps: int = 1000  # optimizer steps
    grad_clip: float = 1.0  # max gradient norm; 0 = no clipping
    weight_decay: float = 0.01  # AdamW weight decay
    ema: float = 0.0  # EMA decay of the trainable weights (e.g. 0.999); 0 = off. Samples use it; it is checkpointed
    ema_export: bool = False  # export the EMA weights (with --ema) instead of the last ones
    seed: int = 0  # one seed for init, data order, noise, sigmas and caption dropout
    timestep_sampling: str = "logit_normal"  # uniform | logit_normal | shift (uniform through a --shift != 1)
    shift: float = 1.0  # applied to the sampled sigmas when != 1 (see sample_sigmas)
    # speed
    dtype: str = "auto"  # compute dtype of the blocks: auto (bf16 on GPU, fp32 on CPU) | bf16 | fp32
    ac: int = 0  # activation checkpointing per block: 1; 2: with its saved inputs in CPU memory (common/fsdp.py)
    ac_interval: int = 1  # with --ac: checkpoint every N-th block only (2: every other one): faster, more memory
    compile: bool = False  # torch.compile per block, in place
    sp: int = 1  # sequence parallelism (Ulysses, common/sp.py): N consecutive ranks share each sample, split its tokens
    shard: int = 0  # FSDP2 shards each weight over N ranks, replicated across world/N (HSDP; 1: as DDP); 0 = all ranks
    preflight: bool = True  # before step 1, one forward + backward of the largest bucket (common/preflight.py)
    # memory, for a LoRA on one GPU (common/float8.py, common/offload.py; README "Wan on one GPU: memory options")
    base_dtype: str = "auto"  # frozen base of the blocks: auto (compute dtype) | float8 (e4m3 + row scales: half bf16)
    offload: bool = False  # blocks' frozen base in (pinned) CPU memory, copied to the device a block ahead (exact)
    # checkpoints, samples, validation, logging
    ckpt_every: int = 0  # write a checkpoint every N steps (0 = only when stopped by a signal)
    keep: int = 3  # keep the newest K checkpoints (0 = all)
    resume: bool = False  # continue the run in --out_dir from its newest valid checkpoint (none: start fresh)
    sample_every: int = 0  # write sample videos every N steps (0 = only at the end)
    sample_prompts: str = ""  # prompts separated by |, or a text file with one per line
    sample_negative: str = "official"  # negative prompt for guidance: official (Wan's own) or any text ("" = empty)
    sample_steps: int = 50  # sampler steps
    sample_guidance: float = 5.0  # classifier-free guidance scale (1 = none)
    # Wan 2.2 A14B: the scale while the high-noise expert samples (t >= boundary); 0 = --sample_guidance. Upstream's:
    # T2V-A14B --sample_guidance 3 --sample_guidance_high 4, I2V-A14B 3.5 and 3.5 (wan/configs/wan_*_A14B.py)
    sample_guidance_high: float = 0.0  # A14B: guidance on the high-noise expert's steps; 0 = --sample_guidance
    sample_shift: float = 5.0  # the sampling schedule's shift
    sample_solver: str = "unipc"  # unipc (the official sampler) | euler
    sample_frames: int = 0  # frames of the samples; 0 = --frames
    sample_image: str = ""  # i2v/flf2v samples: the first frame (an image, or a video whose first frame is used)
    sample_last_image: str = ""  # flf2v samples: the last frame (an image or a video's first frame)
    val_every: int = 0  # validation loss every N steps (needs --val_count)
    log_every: int = 10  # a log line (log.jsonl) every N steps
    tensorboard: bool = False  # also log to TensorBoard (<out_dir>/tb)
    wandb: str = ""  # also log to this W&B project
    # bench
    bench_steps: int = 5  # timed steps (after 2 warm-up steps)
    peak_tflops: float = 0.0  # the device's dense bf16 peak for MFU; 0 = known GPUs by name (H100: 989)


# The toy preset, the project's embedded demo: a tiny DiT trained from scratch on the synthetic dataset that
# data/toy.py writes, on CPU, in minutes. It runs in pixel space: a "latent" is the RGB video itself (no VAE; the
# DiT's 8x8 patches do the compression) and the text encoder is data/toy.py's fixed word embedding (--encoders toy).
# These are the defaults of --preset toy, applied before parsing: flags on the command line still win. Why these
# (README "The toy preset"): the samples must show their prompt's colour AND motion (data.toy.check_clip, tested
# for two seeds); motion comes last, between steps 2000 and 4000 here (at data/toy.py's RADIUS); uniform sigmas
# shifted by 3 spend the steps on high noise, where a clip's layout is decided; guidance 5 (with smaller shapes, at 3
# the dark green triangle faded out of a frame in 2 of 48 samples, at 5 in none); no validation split, which could
# take a sampled prompt's clip.
TOY_PROMPTS = "|".join(DEMO_PROMPTS)  # data/toy.py: one per direction, the dataset's first clips
# --preset tiny is the tests' random config: its default clip is small too (flags still override), so that
# `--mode bench --preset tiny` takes seconds on a CPU, not the minutes of the released size's default shape
TINY_ARGS = dict(height=64, width=64, frames=9)

TOY_ARGS = dict(encoders="toy", data="toy_data", height=16, width=16, frames=5, fps=4, global_batch=16, micro_batch=0,
                lr=3e-3, warmup_steps=20, max_steps=4000, weight_decay=0.0, timestep_sampling="uniform", shift=3.0,
                log_every=250, caption_dropout=0.1, ema=0.99, ema_export=True, sample_prompts=TOY_PROMPTS,
                sample_negative="", sample_steps=30, sample_guidance=5.0, sample_shift=3.0, val_count=0)

# What a latent is: the stride of the encoder in (frames, height, width). The Wan 2.1 VAE maps 1 + 4k frames of H x W
# to 1 + k latent frames of 16 channels at H/8 x W/8, the Wan 2.2 VAE (TI2V-5B's) to 48 channels at H/16 x W/16; the
# toy's pixel space is the identity. The flags are checked before any VAE is read, so the stride comes from the DiT's
# latent channels (its config, read off the checkpoint's header); build_encoders asserts that the VAE agrees.
VAE_STRIDE = {16: (4, 8, 8), 48: (4, 16, 16)}  # DiT out_dim (= VAE z_dim) -> stride
ENCODERS = ("official", "toy")


def expert_folders(args):
    """{expert: DiT folder} of what the run trains: {"high": .., "low": ..} (or one of them, --expert) when the DiT's
    path (--dit_path, else --ckpt_dir) is a Wan 2.2 A14B root, official (high_noise_model/, low_noise_model/) or
    diffusers (transformer/, transformer_2/); {"": the DiT's path} for every other model ("" for a fresh init)."""
    root = args.dit_path or args.ckpt_dir
    experts = a14b_folders(root)
    if experts:
        return {e: experts[e] for e in (("high", "low") if args.expert in ("", "both") else (args.expert,))}
    return {"": root}


def lora_files(value, experts, flag="--lora"):
    """{expert: LoRA file} of --lora (--mode sample) or --init_lora. One file for a single model; for the A14B experts
    either a run folder holding our exports (lora_high_noise.safetensors, lora_low_noise.safetensors) or two files
    "HIGH,LOW" (the high-noise expert's first, as ComfyUI users pair them)."""
    if "" in experts or len(experts) == 1 and "," not in value and not os.path.isdir(value):
        return {e: value for e in experts}
    if os.path.isdir(value):
        found = {e: os.path.join(value, f"lora_{e}_noise.safetensors") for e in ("high", "low")}
    else:
        parts = [p.strip() for p in value.split(",")]
        if len(parts) != 2:
            raise UserError(f"{flag} {value}: the A14B experts take two files, HIGH,LOW (or a run folder)")
        found = dict(zip(("high", "low"), parts))
    return {e: found[e] for e in experts}


def base_loras(args, experts):
    """{expert: [(file, multiplier), ...]} of --base_lora, in the order given: an entry without `high=` / `low=`
    goes to every expert (to the one model of a single-model run)."""
    entries = lora_file.parse_list(args.base_lora, names=() if "" in experts else ("high", "low"))
    return {e: [(path, mult) for name, path, mult in entries if name in ("", e)] for e in experts}


def dit_config(args):
    """The WanConfig of the run: the checkpoint's (header only, no weights read; the A14B experts share one), else
    the preset's."""
    path = next(iter(expert_folders(args).values()))
    return read_dit_config(path) if path else DIT_PRESETS[args.preset]


def boundary_of(args, cfg):
    """--boundary, else a diffusers A14B root's boundary_ratio (model_index.json), else upstream's for the model."""
    root = args.dit_path or args.ckpt_dir
    return args.boundary or (a14b_folders(root) and a14b_boundary(root)) or (0.9 if cfg.model_type == "i2v" else 0.875)


def sigma_range(expert, boundary):
    """[lo, hi) of the training sigmas of an expert: the high-noise one at and above the boundary (upstream's
    t >= boundary * 1000), the low-noise one below; every sigma for a model without experts."""
    return {"": (0.0, 1.0), "high": (boundary, 1.0), "low": (0.0, boundary)}[expert]


def latent_stride(args, cfg):
    return (1, 1, 1) if args.encoders == "toy" else VAE_STRIDE[cfg.out_dim]


TASKS = {"t2v": ("t2v",), "ti2v": ("t2v", "i2v"), "i2v": ("i2v",), "flf2v": ("flf2v",)}  # model_type -> tasks


def task_of(args, cfg):
    """t2v | i2v | flf2v: what the run trains and samples (--task, or the model's own)."""
    return args.task or TASKS[cfg.model_type][0]


def check_args(args):
    """Every mistake that the flags alone show, as one UserError line, before any work is done."""
    def need(ok, msg):
        if not ok:
            raise UserError(msg)
    choices = dict(mode=("train", "cache", "sample", "bench"), encoders=ENCODERS, task=("", "t2v", "i2v", "flf2v"),
                   expert=("", "high", "low", "both"),
                   lr_schedule=("constant", "cosine"), sample_solver=("unipc", "euler"), dtype=("auto", "bf16", "fp32"),
                   base_dtype=("auto", "float8"), timestep_sampling=("uniform", "logit_normal", "shift"))
    for k, allowed in choices.items():
        need(getattr(args, k) in allowed, f"--{k} {getattr(args, k)!r}: expected one of {', '.join(allowed)}")
    need(args.ac in (0, 1, 2), f"--ac {args.ac}: expected 0, 1 (checkpoint every block) or 2 (and keep what it "
         "saves in CPU memory)")
    need(args.ac_interval >= 1, f"--ac_interval {args.ac_interval}: expected 1 (every block) or more")
    need(args.preset in DIT_PRESETS, f"--preset {args.preset!r}: expected one of {', '.join(DIT_PRESETS)}")
    for k in ("lora_rank", "micro_batch", "max_steps", "warmup_steps", "ckpt_every", "keep", "sample_every",
              "val_every", "val_count", "sample_frames", "min_frames", "clips_per_video"):
        need(getattr(args, k) >= 0, f"--{k} {getattr(args, k)} must be >= 0")
    for k in ("global_batch", "fps", "log_every", "sample_steps", "bench_steps", "sp"):
        need(getattr(args, k) >= 1, f"--{k} {getattr(args, k)} must be >= 1")
    need(args.lora_alpha >= 0 and args.lr >= 0, "--lora_alpha and --lr must be >= 0")
    need(0 <= args.caption_dropout < 1 and 0 <= args.ema < 1, "--caption_dropout and --ema must be in [0, 1)")
    # musubi's `--timestep_sampling shift` is sigmoid(N(0,1)) then the shift; ours is U(0,1) then the shift, which at
    # --shift 1 is plain uniform: a musubi user would silently get another distribution
    need(not (args.timestep_sampling == "shift" and args.shift == 1), "--timestep_sampling shift with --shift 1 is "
         "plain uniform: give --shift N (musubi's `shift` is --timestep_sampling logit_normal --shift N here)")
    weights = args.dit_path or args.ckpt_dir
    for k in ("ckpt_dir", "dit_path", "lora", "init_lora", "sample_image", "sample_last_image"):
        for path in getattr(args, k).split(",") if "lora" in k else [getattr(args, k)]:  # A14B: --lora HIGH,LOW
            need(not path or os.path.exists(path), f"--{k} {path}: no such file or folder")
    try:
        cfg = dit_config(args)
    except (ValueError, FileNotFoundError, KeyError) as e:  # KeyError's str() is its key quoted: the message alone
        raise UserError(f"{weights}: {e.args[0] if isinstance(e, KeyError) else e}") from None
    need(args.encoders == "toy" or cfg.out_dim in VAE_STRIDE, f"{weights or args.preset}: a DiT of {cfg.out_dim} "
         "latent channels has no Wan VAE (16: Wan 2.1, 48: Wan 2.2); use --encoders toy")
    a14b, flag = "" not in expert_folders(args), "--dit_path" if args.dit_path else "--ckpt_dir"
    need(a14b or not args.expert, f"--expert {args.expert}: {flag} is not a Wan 2.2 A14B folder (with "
         "high_noise_model/ and low_noise_model/, or diffusers' transformer/ and transformer_2/)")
    need(0 <= args.boundary < 1, f"--boundary {args.boundary}: a sigma in (0, 1), or 0 for the official one")
    need(a14b or not args.sample_guidance_high, f"--sample_guidance_high {args.sample_guidance_high}: the guidance "
         f"of the high-noise expert's steps, for a Wan 2.2 A14B {flag} (with high_noise_model/ and "
         "low_noise_model/); this model samples with --sample_guidance alone")
    for flag, value in (("--lora", args.lora), ("--init_lora", args.init_lora)):
        for e, path in lora_files(value, expert_folders(args), flag).items() if a14b and value else ():
            need(os.path.isfile(path), f"{flag}: no {e}-noise LoRA file {path} (give a run folder holding "
                 "lora_high_noise.safetensors and lora_low_noise.safetensors, or HIGH.safetensors,LOW.safetensors)")
    if args.lora and args.mode == "sample":  # read and fitted to the model now, not after the prompts are encoded
        for path in lora_files(args.lora, expert_folders(args)).values():
            lora_for(path, cfg)
    need(not args.init_lora or args.mode == "train", "--init_lora starts a training run's adapter from a file; "
         "to sample with one use --lora")
    if args.init_lora and args.mode == "train":
        # the run's rank, alpha and targets are the file's, set here so that every later check sees a LoRA run
        got = set()
        for path in lora_files(args.init_lora, expert_folders(args), "--init_lora").values():
            lsd, diffs, r, a = lora_for(path, cfg)
            need(lsd and not diffs, f"--init_lora {path}: its full-weight deltas (.diff / .diff_b) or adapters outside "
                 "the blocks cannot train as LoRA adapters: merge it into the base with --base_lora")
            got.add((r, a, lora_file.targets_of(lsd)))
        need(len(got) == 1, f"--init_lora {args.init_lora}: the two experts' files differ in rank, alpha or targets "
             f"({sorted(got)}); one run trains one adapter shape")
        r, a, targets = got.pop()
        lora_file.adopt(args, r, a, targets, LORA_TARGETS)
    need(not args.base_lora or args.mode in ("train", "sample"), "--base_lora merges a LoRA into the base of a "
         "training or sampling run")
    if args.base_lora and args.mode in ("train", "sample"):
        for files in base_loras(args, expert_folders(args)).values():
            for path, _ in files:
                need(os.path.isfile(path), f"--base_lora {path}: no such file")
                lora_for(path, cfg)
    task = task_of(args, cfg)
    need(task in TASKS[cfg.model_type], f"--task {task}: a {cfg.model_type} model does "
         f"{' or '.join(TASKS[cfg.model_type])}")
    need(not args.sample_image or cfg.model_type != "t2v", "--sample_image: a t2v model samples from text alone")
    need(args.first_frame_p == -1 or (cfg.model_type == "ti2v" and 0 <= args.first_frame_p <= 1),
         f"--first_frame_p {args.first_frame_p}: the share of TI2V-5B samples trained as i2v, in [0, 1] (a "
         f"{cfg.model_type} model trains its --task on every sample)")
    need(not args.sample_last_image or task == "flf2v", "--sample_last_image is the last frame of flf2v samples")
    if args.mode in ("train", "sample") and prompts_from(args.sample_prompts):  # y needs the image(s)
        need(args.sample_image or cfg.in_dim == cfg.out_dim, f"a {cfg.model_type} model samples from an image: "
             "--sample_image PATH (an image, or a video's first frame)")
        need(args.sample_last_image or task != "flf2v", "flf2v samples need --sample_last_image PATH too")
    st, sh, sw = latent_stride(args, cfg)
    mh, mw = sh * cfg.patch_size[1], sw * cfg.patch_size[2]
    need(args.height % mh == 0 and args.width % mw == 0 and args.height > 0 and args.width > 0,
         f"--height {args.height} --width {args.width}: both must be positive multiples of {mh} "
         f"(the encoder's stride {sh} times the patch size {cfg.patch_size[1]})")
    for k in ("frames", "sample_frames"):
        n = getattr(args, k)
        need((n == 0 and k == "sample_frames") or (n >= 1 and (n - 1) % st == 0),
             f"--{k} {n}: must be 1 + {st}k (the VAE compresses {st} frames into one latent after the first)")
    need(not args.lora or args.mode == "sample", "--lora applies a LoRA file in --mode sample; to train one use "
         "--lora_rank")
    if args.mode in ("train", "cache"):
        need(args.data, "--data is needed: a folder of videos/images with .txt captions, or a .jsonl / .csv")
    if args.mode in ("train", "cache", "sample") and args.encoders == "official":
        need(args.ckpt_dir, f"--mode {args.mode} needs --ckpt_dir: the official Wan folder, for its VAE "
             "and umT5 (or --encoders toy)")
    if args.mode == "train":
        need(weights or args.preset in ("toy", "tiny"), f"--preset {args.preset} trains from the released weights: "
             "pass --ckpt_dir (random init is for the toy and tiny presets only)")
        need(not (args.lora_rank and not weights), "--lora_rank needs base weights to adapt: --ckpt_dir or --dit_path")
    need(args.lora_plus > 0 and (args.lora_plus == 1 or args.lora_rank), f"--lora_plus {args.lora_plus}: the "
         "multiple of --lr at which a LoRA's B matrices learn, > 0, for a LoRA run (--lora_rank or --init_lora)")
    memory.check_flags(args)  # --base_dtype float8 / --offload 1: where they do not apply
    if args.mode == "sample":
        need(weights, "--mode sample needs trained weights: --dit_path (e.g. runs/wan-toy/model.safetensors) or "
             "--ckpt_dir")
        need(prompts_from(args.sample_prompts), "--mode sample needs --sample_prompts ('a|b', or a file)")


# -----------------------------------------------------------------------------------------------------
# The pieces main() puts together


def encoder_settings(args, cfg, device):
    """What identifies the encoding of a clip or caption, for the cache key (data/cache.py)."""
    if args.encoders == "toy":
        from data.toy import toy_encoders
        return toy_encoders(cfg.text_dim, cfg.text_len)[3]
    s = dict(model="wan2.1" if cfg.out_dim == 16 else "wan2.2", vae="Wan2.1_VAE" if cfg.out_dim == 16 else "Wan2.2_VAE",
             text="umt5-xxl", text_len=512, ckpt=os.path.abspath(args.ckpt_dir),
             text_dtype="bf16" if device.type == "cuda" else "fp32")
    if cfg.in_dim != cfg.out_dim:  # y's conditioning latents (and Wan 2.1's CLIP tokens) are cached with the clip
        s["cond"] = "first+last" if task_of(args, cfg) == "flf2v" else "first"
    if cfg.img_dim:
        s.update(clip=CLIP_FILE, clip_dtype="fp32")
    return s


def cond_video(first, last, frames):
    """The video that y's conditioning latents encode, as upstream's image2video.py / first_last_frame2video.py build
    it: the first frame (B, 3, H, W), zeros (mid-gray in [-1, 1]) after it, and for flf2v the last frame at the end ->
    (B, 3, frames, H, W). The zero frames do not encode to zero latents: only latent frame 0 equals the clip's own."""
    v = torch.zeros(first.shape[0], 3, frames, *first.shape[2:], device=first.device)
    v[:, :, 0] = first
    if last is not None:
        v[:, :, -1] = last
    return v


def build_encoders(args, cfg, device, video=True, text=True):
    """-> (encode_video, decode_video, encode_text, encode_image) as plain functions (None for the parts not asked
    for). Built only while caching and sampling, so that neither the VAE nor the text encoder is in memory while the
    DiT trains. encode_image(first, last, frames), images (B, 3, H, W) in [-1, 1], is the image conditioning of a
    sample: {"first": its latent frame} (TI2V-5B), or {"cond": y's latents, "clip": CLIP tokens} (i2v / flf2v);
    encode_video caches the same beside the latents of a clip (its own first and last frame) for the models with y."""
    if args.encoders == "toy":
        from data.toy import toy_encoders
        return (*toy_encoders(cfg.text_dim, cfg.text_len)[:3], None)
    enc_v = dec_v = enc_t = enc_i = None
    if video:
        vae = load_vae(args.ckpt_dir, dtype=torch.float32, device=device)  # the VAE runs in fp32, as upstream
        if (vae.z_dim, tuple(vae.stride)) != (cfg.out_dim, latent_stride(args, cfg)):
            raise UserError(f"{args.ckpt_dir}: its VAE makes {vae.z_dim}-channel latents at stride "
                            f"{tuple(vae.stride)}; the DiT takes {cfg.out_dim}, stride {latent_stride(args, cfg)}")
        clip = load_clip(args.ckpt_dir, device=device) if cfg.img_dim else None
        dec_v = lambda z: vae.decode(z.float().to(device))  # noqa: E731

        def enc_i(first, last, frames):
            first = first.to(device)
            if cfg.in_dim == cfg.out_dim:  # TI2V-5B: the causal VAE encodes frame 0 alone, as latent frame 0
                return {"first": vae.encode(first[:, :, None]).cpu()}
            out = {"cond": vae.encode(cond_video(first, None if last is None else last.to(device), frames)).cpu()}
            if clip is not None:  # flf2v: (B, 514, 1280), each sample's first-frame tokens, then its last-frame ones
                imgs = first if last is None else torch.stack([first, last.to(device)], 1).flatten(0, 1)
                out["clip"] = clip.encode_image(imgs).reshape(first.shape[0], -1, cfg.img_dim).cpu()
            return out

        def enc_v(v):  # (1, 3, F, H, W) -> latents, and for the models with y: + "cond" and "clip" from the clip itself
            z = vae.encode(v.to(device)).cpu()
            if cfg.in_dim == cfg.out_dim:
                return z
            last = v[:, :, -1] if task_of(args, cfg) == "flf2v" else None
            return {None: z, **enc_i(v[:, :, 0], last, v.shape[2])}  # stored as latents, latents.cond, latents.clip
    if text:
        te = load_text_encoder(args.ckpt_dir, dtype=torch.bfloat16 if device.type == "cuda" else torch.float32,
                               device=device)

        def enc_t(prompts):  # trimmed to the true length: the DiT zero-pads to 512 again, so this is exact
            n = int(te.tokenizer([clean_prompt(p) for p in prompts], te.max_len)[1].sum(1).max())
            return te.encode(prompts)[:, :n].to(torch.bfloat16)  # stored in bf16, as upstream's encoder outputs
    return enc_v, dec_v, enc_t, enc_i


def read_dit_weights(args, cfg, rank, dtype, path=None):
    """The full state dict on rank 0 (None elsewhere): the checkpoint, its blocks read straight into `dtype` and the
    rest in fp32 (build_dit keeps the embeddings and the head fp32 parameters, as diffusers' _keep_in_fp32_modules
    does: a LoRA run's bf16 must not round them), or a fresh init (seeded) for the toy and tiny presets. Called after
    caching, so it is never in RAM beside the encoders."""
    if rank != 0:
        return None
    path = path or args.dit_path or args.ckpt_dir
    if path:
        return read_dit_checkpoint(path, dtype, root_dtype=torch.float32)[1]
    with torch.random.fork_rng():
        torch.manual_seed(args.seed)
        m = WanModel(cfg)
        m.init_weights()
    return m.state_dict()


def build_dit(args, cfg, sd, device, compute_dtype, lora_alpha=None, sp_group=None):
    """meta build -> LoRA -> FSDP2 (+AC, compile) -> storage on the device -> weights broadcast from rank 0.
    `sd`: the full state dict on rank 0 (None on the others), or "random" for --mode bench without weights
    (every shard filled with N(0, 0.02) where it lives: a 14B model never passes through host RAM).
    sp_group: --sp's group of this rank (None: every rank holds its samples whole)."""
    rank = torch.distributed.get_rank()
    with torch.device("meta"):
        model = WanModel(cfg)
    model.sp = sp_group
    if args.lora_rank:
        model.blocks.to(compute_dtype)  # the frozen base is stored in the compute dtype: half the memory in bf16
        add_lora(model, args.lora_rank, lora_alpha or args.lora_alpha or args.lora_rank, args.lora_targets)
        if rank == 0 and sd != "random" and not any(".lora_" in k for k in sd):
            sd.update(lora_init_state(model, args.seed))
    where = args.dit_path or args.ckpt_dir or "init"
    if rank == 0 and sd != "random":
        check_keys(model.state_dict().keys(), sd, where, hint=DIT_HINT)
        check_shapes(model.state_dict(), sd, where)
    one_gpu = memory.wanted(args)  # --base_dtype float8 / --offload 1: the base is loaded and converted on the CPU
    if one_gpu:
        memory.prepare(model, [model.blocks], sd, device, compute_dtype, args)
    parallelize(model, model.blocks, compute_dtype, ac=args.ac, compile=args.compile,
                ac_interval=args.ac_interval, shard=args.shard)
    if one_gpu:  # common/memory.py: the weights are in already
        return model
    model.to_empty(device=device)
    if sd == "random":
        g = torch.Generator(device=device).manual_seed(args.seed + rank)
        with torch.no_grad():
            for p in model.parameters():
                (p.to_local() if hasattr(p, "to_local") else p).normal_(0, 0.02, generator=g)
    else:
        load_full_state_dict(model, sd if rank == 0 else {})
    return model


def latent_shape(cfg, args, frames):
    """(C, f, h, w) of the latents of a frames x height x width clip (C = out_dim: i2v's in_dim counts y too)."""
    st, sh, sw = latent_stride(args, cfg)
    return (cfg.out_dim, (frames - 1) // st + 1, args.height // sh, args.width // sw)


def step_expert(args, step, experts, boundary):
    """The expert that trains `step` ("" for a model without experts, the one of --expert high|low). With both: the
    high-noise one with the probability that a training sigma falls at or above the boundary, drawn from (seed,
    step) alone, so that every rank (FSDP2's collectives need all of them in the same expert) and a resumed run
    agree. training_draws then draws all of the step's sigmas on that side: the steps of both experts together see
    exactly the sigma distribution of --timestep_sampling / --shift. (Routing each sample instead would split every
    micro-batch over two sharded models: both forward per step, twice the collectives, and micro-batches of 0.)"""
    if len(experts) == 1:
        return next(iter(experts))
    u = torch.rand(1, generator=noise.generator(args.seed, step, "expert")).item()
    return "high" if u < sigma_mass(args.timestep_sampling, args.shift, boundary, 1.0) else "low"


def training_draws(args, step, index, n, device, lo=0.0, hi=1.0):
    """sigma (n,) on `device` and caption-dropout flags (n,) bool on CPU for the samples index, index+1, ... of the
    global batch of `step`: a pure function of (seed, step, index), so 1 or N ranks and a resumed run agree. Sigmas
    in [lo, hi) (an A14B expert's range): the distribution restricted to it, by drawing again until one falls in."""
    sig, drop = [], []
    for j in range(n):
        g = noise.generator(args.seed, step, index + j)
        for _ in range(100_000):
            s = sample_sigmas(1, args.timestep_sampling, args.shift, generator=g)
            if lo <= s.item() < hi:
                break
        else:
            raise UserError(f"--timestep_sampling {args.timestep_sampling} --shift {args.shift} almost never draws a "
                            f"sigma in [{lo}, {hi}): raise --shift for the high-noise expert")
        sig.append(s)
        drop.append(torch.rand(1, generator=g) < args.caption_dropout)
    return torch.cat(sig).to(device, non_blocking=True), torch.cat(drop)


def first_frame_draws(args, task, step, index, n, frames):
    """(n,) bool on CPU: which of the samples index, index+1, ... of the global batch of `step` train TI2V-5B's i2v
    (latent frame 0 clean), each with probability --first_frame_p (-1: all with --task i2v, none with t2v); a pure
    function of (seed, step, index) in its own stream, so the sigmas and noise are those of a run without it. A
    batch of single frames (images, frames = 1 latent) has nothing left to learn with frame 0 clean: none."""
    p = args.first_frame_p if args.first_frame_p >= 0 else float(task == "i2v")
    if frames < 2 or p <= 0:
        return torch.zeros(n, dtype=torch.bool)
    if p >= 1:
        return torch.ones(n, dtype=torch.bool)
    return torch.cat([torch.rand(1, generator=noise.generator(args.seed, step, index + j, "first")) < p
                      for j in range(n)])


def training_noise(args, step, index, shape, n, device):
    """(n, *shape) noise made on the training device, one seeded generator per sample (no host-to-device copy)."""
    return torch.stack([noise.randn(shape, args.seed, step, index + j, "noise", device=device) for j in range(n)])


def reduce_now(args, m, n):
    """Whether micro-batch m of n reduce-scatters its gradients. A full fine-tune does it every micro-batch: FSDP2
    without it keeps an unsharded fp32 gradient of every weight until the last one (57 GB per GPU for 14B). LoRA's
    gradients are small, so it accumulates unsynced and reduces once per step (fewer collectives)."""
    return args.lora_rank == 0 or m == n - 1


def drop_captions(ctx, drop, empty):
    """ctx (B, L, D) with the rows where drop (B,) is True replaced by the empty prompt's context `empty` (n, D)."""
    if not drop.any():  # a CPU tensor: no device sync
        return ctx
    L = max(ctx.shape[1], empty.shape[0])
    ctx = F.pad(ctx, (0, 0, 0, L - ctx.shape[1]))
    e = F.pad(empty.to(ctx), (0, 0, 0, L - empty.shape[0]))
    return torch.where(drop.to(ctx.device).view(-1, 1, 1), e[None], ctx)


def make_y(cond, task):
    """y (B, 4 + C, f, h, w) of i2v/flf2v: the frame mask (i2v_mask), then the conditioning latents cond (B, C, ...)."""
    B, _, f, h, w = cond.shape
    mask = i2v_mask(1 + 4 * (f - 1), h, w, last=task == "flf2v", device=cond.device)
    return torch.cat([mask[None].expand(B, -1, -1, -1, -1), cond.float()], dim=1)


def conditioning(batch, cfg, task, device, first=None):
    """flow_loss's image-conditioning keywords for a cached batch. TI2V-5B's i2v (clean_first) needs nothing cached:
    the VAE is causal (frame 0 is encoded alone), so latent frame 0 of the clip is exactly the latent of its first
    frame as an image, which is what upstream conditions on; `first` (B,) bool: the samples trained so (training's
    first_frame_draws), None: all of them with --task i2v. i2v/flf2v: y from the cached conditioning latents (the
    clip's own first / last frame, zeros between) and, for Wan 2.1, the cached CLIP tokens."""
    if cfg.in_dim == cfg.out_dim:
        return dict(clean_first=task == "i2v" if first is None else first)
    y = make_y(batch["latents.cond"].to(device, non_blocking=True), task)
    clip = batch["latents.clip"].to(device, non_blocking=True).float() if cfg.img_dim else None
    return dict(y=y, clip_fea=clip)


def val_loss(model, val_idx, val, device, cfg, task):
    """Mean flow loss over the held-out clips at fixed sigmas with fixed noise: the same numbers at every
    evaluation, so the curve is comparable across steps and runs. Collective."""
    sigmas = [0.1, 0.3, 0.5, 0.7, 0.9]
    total = torch.zeros(2, dtype=torch.float64, device=device)
    with torch.no_grad():
        for idx in val_idx:
            b = load_batch([val[i]["file"] for i in idx])
            x0, ctx = b["latents"].to(device).float(), b["text"].to(device).float()
            cond = conditioning(b, cfg, task, device)
            for j, s in enumerate(sigmas):
                eps = torch.stack([noise.randn(x0.shape[1:], "val", val[i]["key"], j, device=device) for i in idx])
                loss = flow_loss(model, x0, ctx, torch.full((len(idx),), s, device=device), eps, **cond)
                total += torch.stack([loss.double() * len(idx), torch.tensor(float(len(idx)), device=device).double()])
    torch.distributed.all_reduce(total)
    return (total[0] / total[1]).item()


def write_samples(model, args, cfg, text_ctx, negative, out_dir, step, device):
    """One video per --sample_prompts prompt, seeded by (seed, prompt index), through the chosen sampler with
    guidance against `negative`. Collective (the sharded DiT runs on every rank); rank 0 decodes (loading the VAE
    for the occasion: it is not kept in memory while training) and writes samples/step_XXXXXXXX_i.mp4."""
    rank = torch.distributed.get_rank()
    decode = enc_i = None
    if rank == 0 or args.sample_image:  # every rank gives the sharded DiT the same image conditioning
        _, decode, _, enc_i = build_encoders(args, cfg, device, video=True, text=False)
    frames = args.sample_frames or args.frames
    cond = {}
    if args.sample_image:  # --sample_image (and --sample_last_image): i2v / flf2v samples; without: t2v
        first, last = (read_clip(f, 0, 1, args.fps, (args.height, args.width))[:, 0][None] if f else None
                       for f in (args.sample_image, args.sample_last_image))  # (1, 3, H, W), cover + centre crop
        cond = {k: v.to(device) for k, v in enc_i(first, last, frames).items()}
    del enc_i
    net = conditioned(model, cond.get("first"), make_y(cond["cond"], task_of(args, cfg)) if "cond" in cond else None,
                      cond.get("clip"))
    solver = sample_unipc if args.sample_solver == "unipc" else sample_euler
    guidance = args.sample_guidance  # A14B with --sample_guidance_high: (low, high, boundary), switched by t (velocity)
    if args.sample_guidance_high:
        guidance = (args.sample_guidance, args.sample_guidance_high, boundary_of(args, cfg))
    was_training = model.training
    model.eval()
    paths = []
    for i, p in enumerate(prompts_from(args.sample_prompts)):
        x = noise.randn(latent_shape(cfg, args, frames), args.seed, "sample", i)[None].to(device)  # CPU noise
        if "first" in cond:
            x[:, :, :1] = cond["first"]  # TI2V-5B i2v: frame 0 starts (and stays) the image's latent
        ctx, neg = text_ctx[p][None].to(device).float(), text_ctx[negative][None].to(device).float()
        L = max(ctx.shape[1], neg.shape[1])
        ctx, neg = (F.pad(c, (0, 0, 0, L - c.shape[1])) for c in (ctx, neg))
        z = solver(net, x, ctx, neg, steps=args.sample_steps, guidance=guidance, shift=args.sample_shift)
        if rank == 0:
            paths.append(os.path.join(out_dir, "samples", f"step_{step:08d}_{i}.mp4"))
            write_video(paths[-1], decode(z)[0].float().cpu(), args.fps)
    model.train(was_training)
    return paths


def bench(args, cfg, device, compute_dtype, world, micro, sp_group=None):
    """--mode bench: a few training steps on random latents of --height x --width x --frames and a random full-length
    context; prints step time, tokens/s, peak memory and MFU. No data, VAE or text encoder; the weights are the
    checkpoint's if given, else random."""
    path = next(iter(expert_folders(args).values()))  # A14B: the first expert (both have the same shapes)
    sd = read_dit_weights(args, cfg, torch.distributed.get_rank(), torch.float32 if not args.lora_rank else
                          compute_dtype, path) if path else "random"
    torch.manual_seed(args.seed)  # the same weights and inputs every run: eager and --compile give comparable losses
    model = build_dit(args, cfg, sd, device, compute_dtype, sp_group=sp_group)
    reset_peak_memory(device)  # mem_gb: the steps' peak, not the load's
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=1e-5, fused=True)
    shape = (micro, *latent_shape(cfg, args, args.frames))
    x0 = torch.randn(shape, device=device)
    ctx = torch.randn(micro, cfg.text_len, cfg.text_dim, device=device)
    cond = dict(y=torch.randn(micro, cfg.in_dim - cfg.out_dim, *shape[2:], device=device) if cfg.in_dim != cfg.out_dim
                else None, clip_fea=torch.randn(micro, clip_tokens(cfg), cfg.img_dim, device=device) if cfg.img_dim
                else None, clean_first=task_of(args, cfg) == "i2v" and cfg.in_dim == cfg.out_dim)
    f, h, w = shape[2:]
    tokens = micro * (f // cfg.patch_size[0]) * (h // cfg.patch_size[1]) * (w // cfg.patch_size[2])
    flops = micro * 3 * count_flops(cfg, f, h, w) / args.sp  # --sp: this rank's share of the samples' work
    peak = device_peak_flops(device, args.peak_tflops)
    times = []
    for i in range(args.bench_steps + 2):  # the first two steps warm up (compile, allocator) and are not counted
        with StepTimer(device) as t:
            loss = flow_loss(model, x0, ctx, torch.rand(micro, device=device), torch.randn_like(x0), **cond)
            (loss * args.sp).backward()
            opt.step()
            opt.zero_grad(set_to_none=True)
        if i >= 2:
            times.append(t.seconds)
    dt = sorted(times)[len(times) // 2]  # median
    res = dict(preset=args.preset, lora_rank=args.lora_rank, ac=args.ac,
               ac_interval=args.ac_interval, shard=args.shard, compile=args.compile, dtype=str(compute_dtype),
               base_dtype=args.base_dtype, offload=args.offload,
               shape=list(shape), tokens=tokens, step_s=dt, tokens_s=tokens / dt, tflops_s=flops / dt / 1e12,
               mfu=flops / dt / peak if peak else None, loss=loss.item(), mem_gb=peak_memory_gb(device),
               pinned_gb=pinned_gb(device),
               device=device_name(device), world=world, sp=args.sp)
    cdist.print0(json.dumps(res))
    return res


def git_hash():
    try:
        import subprocess
        return subprocess.run(["git", "rev-parse", "HEAD"], cwd=os.path.dirname(os.path.abspath(__file__)),
                              capture_output=True, text=True, timeout=10).stdout.strip() or None
    except Exception:  # no git, not a checkout: the hash is a courtesy
        return None


# -----------------------------------------------------------------------------------------------------
# main: a flat script. setup -> data and cache -> the DiT -> optimizer and resume -> the training loop -> export.


def main(argv=None):
    # 0. Setup: flags (checked before any work), the run folder (never another run's), the process group.
    args = parse(Args, argv, presets={"toy": TOY_ARGS, "tiny": TINY_ARGS})
    check_args(args)
    out_dir = args.out_dir or os.path.join("runs", f"wan-{args.preset}" + ("-sample" if args.mode == "sample" else ""))
    if args.mode == "train":
        run_folder.claim(out_dir, args.resume)
    rank, world, device = cdist.init()
    print0 = cdist.print0
    memory.check_world(args, world)  # --base_dtype float8 / --offload 1: one process
    cfg = dit_config(args)
    # --sp N: each group of N consecutive ranks trains the same samples, each rank a share of their tokens
    # (common/sp.py). The data, the noise draws and the batch arithmetic count data-parallel ranks: dp_rank of dp_world.
    sp_group, dp_rank, dp_world, micro, accum = sp.data_parallel(args, rank, world, cfg.num_heads)
    compute_dtype = torch.float32 if args.dtype == "fp32" or (args.dtype == "auto" and device.type == "cpu") \
        else torch.bfloat16
    task = task_of(args, cfg)
    print0(f"wan: {args.mode} {cfg.model_type} model, task {task}, preset={args.preset} world={world} device={device} "
           f"compute={compute_dtype} batch={args.global_batch} (micro {micro} x {dp_world} ranks x {accum} "
           "accumulation)" + (f", sequence parallel: {args.sp} ranks a sample" if args.sp > 1 else ""))
    if args.mode == "bench":
        bench(args, cfg, device, compute_dtype, world, micro, sp_group)
        return cdist.cleanup()

    # 1. Data -> cache. The VAE and the text encoder exist only inside this block, and only if something is not
    # cached yet. The texts: the sample prompts, the guidance's negative prompt, the empty prompt of caption dropout.
    prompts = prompts_from(args.sample_prompts)
    negative = official_negative(cfg) if args.sample_negative == "official" else args.sample_negative
    texts = list(dict.fromkeys(prompts + [negative] * bool(prompts) + [""] * (args.caption_dropout > 0)))
    settings = encoder_settings(args, cfg, device)
    key = hashlib.sha1(json.dumps([texts, settings]).encode()).hexdigest()[:16]
    text_file = os.path.join(args.cache_dir, f"texts-{key}.pt")
    records, entries, todo = [], [], 0
    if args.mode in ("train", "cache"):
        if args.encoders == "toy" and args.data == TOY_ARGS["data"]:
            make_toy_dataset(args.data)  # a no-op when it is already there
        st, sh, _ = latent_stride(args, cfg)
        # image-to-video conditions on frame 0 (and flf2v on the last): a clip needs a latent frame after it
        min_frames = args.min_frames if task == "t2v" else max(args.min_frames, st + 1)
        try:
            records = load_dataset(args.data, area=args.height * args.width, fps=args.fps, max_frames=args.frames,
                                   multiple=sh * cfg.patch_size[1], frame_step=st, min_frames=min_frames,
                                   clips_per_video=args.clips_per_video, log=print0, cache_dir=args.cache_dir)
        except (ValueError, FileNotFoundError) as e:  # no usable samples, no such folder: the user's to fix
            raise UserError(str(e)) from None
        entries, todo = cache_entries(records, args.cache_dir, settings, log=print0)
    need = torch.tensor(float(todo > 0 or (bool(texts) and not os.path.exists(text_file))))
    torch.distributed.all_reduce(need, op=torch.distributed.ReduceOp.MAX)  # every rank takes the same branch
    if need.item():
        encode_video, _, encode_text, _ = build_encoders(args, cfg, device, video=todo > 0)
        if todo:
            entries = encode_dataset(records, encode_video, encode_text, args.cache_dir, settings, log=print0)
        if texts and rank == 0:
            os.makedirs(args.cache_dir, exist_ok=True)  # --mode sample may be the first run to use this cache
            torch.save({p: encode_text([p])[0].cpu() for p in texts}, text_file + ".tmp")
            os.replace(text_file + ".tmp", text_file)
        del encode_video, encode_text  # frees the VAE and the text encoder before the DiT is read
        torch.distributed.barrier()
    if args.mode == "cache":
        return cdist.cleanup()
    if args.mode == "train" and not entries:
        raise UserError(f"no sample of {args.data} could be encoded (see the skip lines above)")
    text_ctx = torch.load(text_file) if texts else {}

    # 2. The DiT: (LoRA), FSDP2, weights. A full fine-tune keeps fp32 master weights; a LoRA's frozen base is read
    # straight into the compute dtype.
    # Wan 2.2 A14B: one DiT per expert, each with its own LoRA and its own FSDP2 sharding, read one after the other
    experts, boundary = expert_folders(args), boundary_of(args, cfg)
    # --lora (sample) / --init_lora (train): the file's adapters, rank, alpha and targets (each expert its own file)
    value = args.lora if args.mode == "sample" else args.init_lora if args.mode == "train" else ""
    loras, bases = lora_files(value, experts) if value else {}, base_loras(args, experts)
    built = {}
    for name, path in experts.items():
        lora_alpha, lsd, diffs = None, None, {}
        if name in loras:
            lsd, diffs, args.lora_rank, lora_alpha = lora_for(loras[name], cfg)
            args.lora_targets = lora_file.targets_of(lsd)
            if not lsd:  # only deltas (or adapters outside the blocks, merged): no LoRALinear
                lsd, args.lora_rank = None, 0
        sd = read_dit_weights(args, cfg, rank, torch.float32 if args.lora_rank == 0 else compute_dtype, path)
        if rank == 0:
            for file, mult in bases[name]:  # --base_lora: W += mult (alpha / rank) B @ A, in fp32, then its dtype
                print0(f"--base_lora: {file} x {mult} merged into the {name or 'DiT'}{' expert' if name else ''}")
                blsd, bdiffs, brank, balpha = lora_for(file, cfg)
                lora_file.merge(sd, blsd, brank, balpha, bdiffs, mult)
            lora_file.merge(sd, {}, 1, 1, diffs)  # --lora's deltas: W += diff, b += diff_b
        if lsd is not None and rank == 0:
            sd.update(lsd)
            # a LoRA that skips some blocks: the adapters there start as a fresh one does (training) or as zeros (B =
            # 0 and A = 0: a no-op in a sample)
            with torch.device("meta"):
                probe = add_lora(WanModel(cfg), args.lora_rank, lora_alpha, args.lora_targets)
            fill = lora_init_state(probe, args.seed) if args.mode == "train" else \
                {k: torch.zeros(v.shape) for k, v in probe.state_dict().items() if ".lora_" in k}
            sd.update({k: v for k, v in fill.items() if k not in sd})
        built[name] = build_dit(args, cfg, sd, device, compute_dtype, lora_alpha, sp_group)
        del sd
    model = Experts(built["high"], built["low"], boundary) if len(built) == 2 else built[next(iter(built))]
    for e in experts if len(experts) == 1 and "" not in experts else []:
        print0(f"A14B: the {e}-noise expert alone, sigma in [{sigma_range(e, boundary)[0]}, "
               f"{sigma_range(e, boundary)[1]}) (its samples use it for every sigma: a preview)")
    if args.mode == "sample":
        for path in write_samples(model, args, cfg, text_ctx, negative, out_dir, 0, device):
            print0(f"sample -> {path}")
        return cdist.cleanup()

    # 3. Optimizer, data order, resume. The run folder's run.json holds what a resume must not change.
    train, val = split_val(entries, args.val_count, args.seed) if args.val_count else (entries, [])
    if val:
        print0(f"validation: {len({e['path'] for e in val})} of {len({e['path'] for e in entries})} source files "
               f"held out (--val_count {args.val_count}; 0 trains on all)")
    if not train:
        raise UserError("no training samples left after the validation split: lower --val_count")
    train = with_repeats(train)
    fingerprint = dict(data=hashlib.sha1(json.dumps([[e["key"] for e in train], [e["key"] for e in val]]).encode())
                       .hexdigest(), seed=args.seed, global_batch=args.global_batch, micro_batch=args.micro_batch,
                       base=os.path.abspath(args.dit_path or args.ckpt_dir) if (args.dit_path or args.ckpt_dir) else
                       f"init:{args.preset}", lora_rank=args.lora_rank, lora_alpha=args.lora_alpha,
                       lora_targets=args.lora_targets, timestep_sampling=args.timestep_sampling, shift=args.shift,
                       caption_dropout=args.caption_dropout, ema=args.ema, encoders=args.encoders,
                       **({"base_dtype": "float8"} if args.base_dtype == "float8" else {}))  # not offload: exact
    if task != "t2v" or "" not in experts:  # only where they exist: a t2v run folder of before still resumes
        fingerprint.update(task=task, experts=",".join(experts), boundary=boundary)
    if args.first_frame_p >= 0:
        fingerprint.update(first_frame_p=args.first_frame_p)
    if args.init_lora:  # only where set: a run folder of before still resumes
        fingerprint.update(init_lora={e: os.path.abspath(f) for e, f in loras.items()})
    if args.base_lora:
        fingerprint.update(base_lora={e: [[os.path.abspath(f), m] for f, m in b] for e, b in bases.items()})
    if args.lora_plus != 1:
        fingerprint.update(lora_plus=args.lora_plus)
    run_folder.start_or_resume(out_dir, fingerprint, args.resume, rank)
    named = [(clean_name(n), p) for n, p in model.named_parameters() if p.requires_grad]
    params = [p for _, p in named]
    n_train = sum(p.numel() for p in params)
    print0(f"DiT {sum(p.numel() for p in model.parameters()) / 1e6:.1f}M params, training {n_train / 1e6:.2f}M"
           + (f" (LoRA rank {args.lora_rank})" if args.lora_rank else " (full fine-tune)"))
    # fused on CPU too: one kernel over all tensors; the for-loop default costs a DTensor dispatch per op per tensor,
    # more than the arithmetic on a small model (the Wan toy's bench step, 2 CPU threads: 0.15 -> 0.11 s; BENCHMARKS.md)
    opt = torch.optim.AdamW(param_groups(named, args.lora_plus), lr=args.lr, betas=(0.9, 0.999),
                            weight_decay=args.weight_decay, fused=True)
    ema = EMA(named, args.ema) if args.ema else None
    extra_state = {"ema": ema} if ema else None
    state, start = {"epoch": 0, "pos": 0}, 0
    if args.resume:
        found = [ckpt.latest_valid(out_dir, log=print0) if rank == 0 else None]
        torch.distributed.broadcast_object_list(found, src=0)  # rank 0 decides: file systems may disagree
        if found[0] is None:
            print0(f"--resume 1: no checkpoint in {out_dir}/checkpoints yet: starting from step 0")
        else:
            extra = ckpt.load(out_dir, found[0], model, opt, extra_state)
            state, start = extra["data"], extra["step"]
            print0(f"resumed from step {start} ({out_dir}/checkpoints)")
    if rank == 0:
        with open(os.path.join(out_dir, "args.json"), "w") as f:
            json.dump({**dataclasses.asdict(args), "micro_batch_resolved": micro, "world_size": world,
                       "data_parallel": dp_world,
                       "torch": torch.__version__, "git": git_hash()}, f, indent=1)
    pin = device.type == "cuda"
    if args.preflight:  # the largest micro-batch the data holds, once, before step 1 (common/preflight.py)
        def loss(b, x0, sigma, eps):
            return flow_loss(dit, x0, b["text"].to(device).float(), sigma, eps, **conditioning(b, cfg, task, device))
        dit = model[next(iter(experts))] if isinstance(model, Experts) else model  # A14B: either expert (same shapes)
        preflight.check(train, micro, lambda idx: load_batch([train[i]["file"] for i in idx], pin=pin), loss, dit,
                        device, args.sp, print0)
    # Each step's global batch comes from one bucket (data/loader.py), read a step ahead on a thread into pinned
    # memory; the data state saved with a checkpoint is the one after the last step actually trained.
    steps = batches([batch_key(e) for e in train], args.global_batch, micro, dp_rank, dp_world, args.seed,
                    state)
    it = prefetch(steps, lambda item: ([load_batch([train[i]["file"] for i in mb], pin=pin) for mb in item[0]],
                                       item[1]))
    val_idx = val_batches([batch_key(e) for e in val], micro, dp_rank, dp_world) if val else []
    stop = StopSignal()  # SIGTERM (pre-emption) or Ctrl-C: checkpoint the last whole step, exit
    log = RunLog(out_dir, enabled=rank == 0, tensorboard=args.tensorboard, wandb_project=args.wandb,
                 config=dataclasses.asdict(args), start_step=start)
    peak = device_peak_flops(device, args.peak_tflops)
    empty = text_ctx.get("")
    bar = tqdm(total=args.max_steps, initial=start, disable=rank != 0, desc="train", dynamic_ncols=True)

    # 4. The training loop. A14B with both experts: the step's expert (step_expert) takes all its micro-batches; the
    # other's gradients stay None, so AdamW leaves its weights and its state (per parameter) untouched: one optimizer
    # over both is each expert's own optimizer, in one checkpoint.
    model.train()
    reset_peak_memory(device)  # the logged mem_gb: the steps' peak, not the caching's, the load's or preflight's
    step, saved, stopped = start, start, None
    while step < args.max_steps:
        t0 = time.perf_counter()
        micro_batches, state_after = next(it)
        route = step_expert(args, step, experts, boundary)
        dit, (lo, hi) = model[route] if isinstance(model, Experts) else model, sigma_range(route, boundary)
        lr = lr_at(step, args.lr, args.warmup_steps, args.max_steps, args.lr_schedule)
        for g in opt.param_groups:
            g["lr"] = lr * g.get("lr_mult", 1.0)  # --lora_plus: lora_B's group at a multiple
        loss_sum = torch.zeros((), device=device)
        tokens = flops = 0
        for m, b in enumerate(micro_batches):
            if stop.requested():  # between micro-batches: a long accumulated step does not outlive the notice
                stopped = (m, len(micro_batches))
                break
            x0 = b["latents"].to(device, non_blocking=True).float()
            ctx = b["text"].to(device, non_blocking=True).float()
            first = (m * dp_world + dp_rank) * micro  # this micro-batch's first sample, as an index in the global batch
            sigma, drop = training_draws(args, step, first, len(x0), device, lo, hi)
            if args.caption_dropout:
                ctx = drop_captions(ctx, drop, empty)
            eps = training_noise(args, step, first, x0.shape[1:], len(x0), device)
            dit.set_requires_gradient_sync(reduce_now(args, m, len(micro_batches)))
            cond = conditioning(b, cfg, task, device, first_frame_draws(args, task, step, first, len(x0), x0.shape[2]))
            loss = flow_loss(dit, x0, ctx, sigma, eps, **cond)
            # --sp: each rank's gradients are the part through its own tokens and FSDP2 averages over all ranks, so
            # x sp makes the average the data-parallel mean of whole-sample gradients (common/sp.py)
            (loss * args.sp / accum).backward()
            loss_sum += loss.detach()
            f, h, w = x0.shape[2:]
            tokens += len(x0) * (f // cfg.patch_size[0]) * (h // cfg.patch_size[1]) * (w // cfg.patch_size[2])
            flops += len(x0) * 3 * count_flops(cfg, f, h, w) / args.sp  # this rank's share
        if stopped:
            opt.zero_grad(set_to_none=True)  # the step in flight is dropped; it is redone after the resume
            break
        grad_norm = torch.nn.utils.clip_grad_norm_(params, args.grad_clip if args.grad_clip > 0 else float("inf"))
        opt.step()
        opt.zero_grad(set_to_none=True)
        if ema:
            ema.update()
        step, state = step + 1, state_after
        bar.update(1)
        if step % args.log_every == 0 or step == 1 or step == args.max_steps:  # the only host syncs of a step
            loss_all = loss_sum / accum
            torch.distributed.all_reduce(loss_all)
            dt = time.perf_counter() - t0
            rec = dict(step=step, loss=loss_all.item() / world, lr=lr, grad_norm=float(
                grad_norm.full_tensor() if hasattr(grad_norm, "full_tensor") else grad_norm), step_s=dt,
                samples_s=args.global_batch / dt, tokens_s=tokens * dp_world / dt)
            if route:
                rec["expert"] = route
            if peak:
                rec["mfu"] = flops / dt / peak
            rec["mem_gb"] = peak_memory_gb(device)
            bar.set_postfix(loss=f"{rec['loss']:.4f}")
            log.log(rec, echo=bar.write)
        if val_idx and args.val_every and step % args.val_every == 0:
            log.log(dict(step=step, val_loss=val_loss(model, val_idx, val, device, cfg, task)), echo=bar.write)
        if prompts and args.sample_every and step % args.sample_every == 0 and step < args.max_steps:
            if ema:
                ema.swap()
            write_samples(model, args, cfg, text_ctx, negative, out_dir, step, device)
            if ema:
                ema.swap()
        if args.ckpt_every and step % args.ckpt_every == 0:
            ckpt.save(out_dir, step, model, opt, {"step": step, "data": state, "world": world}, args.keep, extra_state)
            saved = step
            print0(f"checkpoint -> {out_dir}/checkpoints/step_{step:08d}")
    bar.close()
    if stopped:
        print0(f"stopped by a signal in step {step + 1} (before micro-batch {stopped[0] + 1} of {stopped[1]}): "
               f"that step is dropped")
        if saved != step:
            ckpt.save(out_dir, step, model, opt, {"step": step, "data": state, "world": world}, args.keep, extra_state)
        print0(f"checkpoint -> {out_dir}/checkpoints/step_{step:08d}; continue with the same command and --resume 1")

    # 5. Export, and the final samples (with the EMA weights when there are some)
    if step >= args.max_steps:
        if ema and args.ema_export:
            ema.swap()
        # one file per A14B expert, named for the model it goes on: lora_high_noise.safetensors, lora_low_noise...
        for e, m in (model.items() if isinstance(model, Experts) else [(next(iter(experts)), model)]):
            name = ("lora" if args.lora_rank else "model") + (f"_{e}_noise" if e else "") + ".safetensors"
            export_weights(m, args, cfg, os.path.join(out_dir, name), e)
            print0(f"exported{' (EMA)' if ema and args.ema_export else ''} -> {os.path.join(out_dir, name)}")
        if ema and not args.ema_export:
            ema.swap()
        for path in write_samples(model, args, cfg, text_ctx, negative, out_dir, step, device) if prompts else []:
            print0(f"sample -> {path}")
    log.close()
    cdist.cleanup()


if __name__ == "__main__":
    cli(main)
