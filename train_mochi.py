"""
Train Mochi 1 (preview, the 10B AsymmDiT) in one file: the DiT, the VAE, the T5-v1.1-XXL text encoder, LoRA, flow
matching in Mochi's own convention, loading of the official weights by their own key names, FSDP2, and a flat main().

    python train_mochi.py --preset toy                                      # tiny model from scratch, CPU ok
    python train_mochi.py --ckpt_dir mochi-1-preview --data my_clips/ --lora_rank 16 --ac 1
    torchrun --nproc_per_node=8 train_mochi.py --ckpt_dir mochi-1-preview --data my_clips/ --ac 1

Reading order: DiT config and presets -> DiT -> VAE -> text encoder -> LoRA -> flow matching and sampler ->
loading -> flags -> the pieces main() uses -> main. The model-agnostic helpers live in common/ and data/, shared
with train_wan.py (the template this file mirrors). Module names equal the official checkpoint keys
(`blocks.3.attn.qkv_x.weight`), so genmo/mochi-1-preview's dit.safetensors, encoder.safetensors and
decoder.safetensors load as they are. Facts: the upstream code (github genmoai/mochi, src/genmo/mochi_preview/).
"""
import dataclasses
import glob
import hashlib
import json
import math
import os
import time
from dataclasses import dataclass

import sentencepiece
import tokenizers
import torch
import torch.nn as nn
import torch.nn.functional as F
from safetensors import safe_open
from safetensors.torch import save_file
from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard
from tqdm import tqdm

from common import ckpt, lora_file, memory, noise, preflight, sp
from common import dist as cdist
from common import run as run_folder
from common.args import UserError, cli, parse, prompts_from
from common.fsdp import clean_name, fsdp_mesh, gather_params, load_full_state_dict, parallelize
from common.log import RunLog
from common.perf import StepTimer, device_name, device_peak_flops, peak_memory_gb, pinned_gb, reset_peak_memory
from common.prefetch import prefetch
from common.schedule import EMA, lr_at, param_groups
from common.stop import StopSignal
from common.weights import (check_keys, check_shapes, read_safetensors, read_weights, safetensors_files,
                            safetensors_header)
from data.cache import cache_entries, encode_dataset, load_batch
from data.dataset import load_dataset
from data.loader import batch_key, batches, split_val, val_batches, with_repeats
from data.toy import DEMO_PROMPTS, make_toy_dataset
from data.video import write_video

# -----------------------------------------------------------------------------------------------------
# Configs and presets


@dataclass
class MochiConfig:
    dim_x: int = 3072  # visual stream width; heads are set by it (head_dim = dim_x / num_heads = 128)
    dim_y: int = 1536  # text stream width
    num_heads: int = 24
    depth: int = 48
    ffn_x: int = 8192  # SwiGLU hidden width of the visual MLP (w1 makes 2x this)
    ffn_y: int = 4096  # and of the text MLP
    in_channels: int = 12  # latent channels (out = in)
    patch_size: int = 2  # spatial only: every latent frame is patchified on its own
    t5_dim: int = 4096  # T5-v1.1-XXL width
    text_len: int = 256  # T5 tokens per prompt (padded/truncated to this)
    pool_heads: int = 8  # heads of the T5 attention pooling (head_dim t5_dim / 8 = 512)
    timestep_scale: float = 1000.0  # the time embedding sees 1000 * (1 - sigma)


DIT_PRESETS = {
    "10B": MochiConfig(),
    # tiny: the tests; widths multiples of 96 so that upstream's and diffusers' FFN widths agree (8d/3 is then a
    # multiple of 256), depth 3 so that two updating blocks and the last (no text update) one all run
    "tiny": MochiConfig(dim_x=192, dim_y=96, num_heads=2, depth=3, ffn_x=512, ffn_y=256, t5_dim=64, text_len=16),
    # toy: trained from scratch in pixel space on the synthetic dataset (3 channels = RGB, 4x4-pixel patches)
    "toy": MochiConfig(dim_x=128, dim_y=64, num_heads=4, depth=4, ffn_x=384, ffn_y=256, in_channels=3,
                       patch_size=4, t5_dim=64, text_len=16),
}


def swiglu_width(d, ratio=4.0, multiple_of=256):
    """Upstream's FeedForward width rule: int(2 * int(d * ratio) / 3) rounded UP to a multiple of 256 (3072 -> 8192,
    1536 -> 4096). Only for building configs; the loaders read the widths off the weights."""
    h = int(2 * int(d * ratio) / 3)
    return multiple_of * ((h + multiple_of - 1) // multiple_of)


# -----------------------------------------------------------------------------------------------------
# DiT (src/genmo/mochi_preview/dit/joint_model/ in the official repo)
#
# Precision: Linears run in the weight dtype (bf16 under FSDP mixed precision, fp32 in tests). The fp32 islands of
# upstream are explicit here: the time sinusoid, the RoPE positions and rotation (pos_frequencies is fp32), the
# q/k RMSNorms (fp32 weights), the modulated and the sandwich RMSNorms, the final LayerNorm. The residual streams
# x and y are kept in fp32 (upstream's are bf16 under autocast): cheap, and the gated adds do not round.


def timestep_embedding(t, dim=256, max_period=10000):
    """t (B,) -> (B, dim) fp32: [cos(t * f), sin(t * f)], f = exp(-ln(10000) * i / (dim/2)). Cos first."""
    half = dim // 2
    freqs = torch.exp(-math.log(max_period) * torch.arange(half, dtype=torch.float32, device=t.device) / half)
    arg = t.float()[:, None] * freqs[None]
    return torch.cat([torch.cos(arg), torch.sin(arg)], dim=-1)


def rope_positions(T, pH, pW, device, target_area=36864):
    """(T*pH*pW, 3) fp32 positions [t, h, w] of the visual tokens (t-major, then row, then column). t is the raw
    latent frame index; h and w are bin centres of a grid scaled so that its area is 192 x 192 whatever the
    resolution (480x848: 30 x 53 patches, scale 4.815)."""
    scale = math.sqrt(target_area / (pH * pW))

    def centers(n):
        edges = torch.linspace(-n * scale / 2, n * scale / 2, n + 1, device=device)
        return (edges[:-1] + edges[1:]) / 2

    t = torch.arange(T, dtype=torch.float32, device=device)
    grid = torch.meshgrid(t, centers(pH), centers(pW), indexing="ij")
    return torch.stack(grid, dim=-1).view(-1, 3)


def rope_apply(x, cos, sin):
    """x (B, N, heads, head_dim); rotate INTERLEAVED pairs (x[2j], x[2j+1]) by per-token, per-head angles;
    cos/sin (N, heads, head_dim/2) fp32. Returns fp32."""
    x0, x1 = x.float().unflatten(-1, (-1, 2)).unbind(-1)
    return torch.stack([x0 * cos - x1 * sin, x0 * sin + x1 * cos], dim=-1).flatten(-2)


def modulated_rmsnorm(x, scale, eps=1e-6):
    """RMSNorm with no weight, times (1 + scale): x (B, L, D), scale (B, D). fp32 in and out."""
    return F.rms_norm(x.float(), (x.shape[-1],), eps=eps) * (1 + scale.float()[:, None])


def residual_tanh_gated_rmsnorm(x, x_res, gate, eps=1e-6):
    """The "sandwich norm" residual: x + rmsnorm(x_res) * tanh(gate). x fp32 (B, L, D), gate (B, D)."""
    return x + F.rms_norm(x_res.float(), (x_res.shape[-1],), eps=eps) * torch.tanh(gate.float())[:, None]


class RMSNorm(nn.Module):
    """The per-head q/k RMSNorm (over head_dim, eps 1e-5, learned weight). fp32 statistics and weight: upstream keeps
    these weights in fp32 when it casts the model to bf16. Returns fp32 (RoPE comes next)."""

    def __init__(self, dim, eps=1e-5):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x):
        return F.rms_norm(x.float(), (x.shape[-1],), self.weight.float(), self.eps)


class PatchEmbed(nn.Module):
    def __init__(self, patch, c_in, dim):
        super().__init__()
        self.proj = nn.Conv2d(c_in, dim, kernel_size=patch, stride=patch)

    def forward(self, x):
        # (B, C, T, H, W) -> every frame an image -> (B, T*h*w, dim), tokens t-major, then row, then column
        B, C, T, H, W = x.shape
        x = self.proj(x.transpose(1, 2).reshape(B * T, C, H, W))
        return x.flatten(2).transpose(1, 2).reshape(B, -1, x.shape[1])


class TimestepEmbedder(nn.Module):
    def __init__(self, dim, scale, freq_dim=256):
        super().__init__()
        self.scale, self.freq_dim = scale, freq_dim
        self.mlp = nn.Sequential(nn.Linear(freq_dim, dim), nn.SiLU(), nn.Linear(dim, dim))

    def forward(self, t):  # t (B,) in [0, 1] (upstream passes 1 - sigma) -> (B, dim) fp32
        e = timestep_embedding(t.float() * self.scale, self.freq_dim)
        return self.mlp(e.to(self.mlp[0].weight.dtype)).float()


class AttentionPool(nn.Module):
    """The prompt as one vector: a single query (from the masked mean of the T5 tokens) attends over [mean; tokens]
    with the padding masked out (the mean itself is always attended, so an empty prompt still gives a vector)."""

    def __init__(self, dim, num_heads, out_dim):
        super().__init__()
        self.num_heads = num_heads
        self.to_kv = nn.Linear(dim, 2 * dim)
        self.to_q = nn.Linear(dim, dim)
        self.to_out = nn.Linear(dim, out_dim)

    def forward(self, x, mask):  # x (B, L, D) T5 features, mask (B, L) bool -> (B, out_dim) fp32
        B, L, D = x.shape
        m = mask[:, :, None].float()
        pooled = (x.float() * m).sum(1, keepdim=True) / m.sum(1, keepdim=True).clamp(min=1)  # (B, 1, D)
        dt = self.to_kv.weight.dtype
        x = torch.cat([pooled, x.float()], dim=1).to(dt)  # (B, 1+L, D)
        k, v = self.to_kv(x).view(B, L + 1, 2, self.num_heads, -1).permute(2, 0, 3, 1, 4)  # (B, h, 1+L, hd) each
        q = self.to_q(x[:, 0]).view(B, self.num_heads, 1, -1)
        keep = F.pad(mask.bool(), (1, 0), value=True)[:, None, None, :]  # (B, 1, 1, 1+L)
        # the softmax written out, not SDPA: one query costs nothing either way, and with an empty prompt (only the
        # mean attended) q's gradient is then exactly zero, where the CPU flash kernel leaves rounding noise
        s = (q.float() @ k.float().transpose(-1, -2)) * q.shape[-1] ** -0.5  # (B, h, 1, 1+L)
        y = (s.masked_fill(~keep, float("-inf")).softmax(-1) @ v.float()).to(dt)  # (B, h, 1, hd)
        return self.to_out(y.reshape(B, D)).float()


class FeedForward(nn.Module):
    """SwiGLU with no biases: w2(silu(a) * b), where a, b = the two halves of w1(x), silu on the FIRST half."""

    def __init__(self, dim, hidden):
        super().__init__()
        self.w1 = nn.Linear(dim, 2 * hidden, bias=False)
        self.w2 = nn.Linear(hidden, dim, bias=False)

    def forward(self, x):
        a, b = self.w1(x).chunk(2, dim=-1)
        return self.w2(F.silu(a) * b)


class AsymmetricAttention(nn.Module):
    """Joint attention over [the visual tokens; each sample's real text tokens], with separate projections per
    stream (the text stream is narrower: qkv_y maps 1536 -> 3 x 3072). Upstream removes the padded text tokens
    (flash-attn varlen, or slicing at batch 1); here the text is cut to the longest prompt of the batch and, when
    the prompts differ in length, the padded keys are masked out of one SDPA call: the same softmax as removing
    them, so every sample gets what it gets alone. Padded text positions leave the attention as zeros, as upstream
    (which zero-pads them back)."""

    def __init__(self, dim_x, dim_y, num_heads, update_y=True):
        super().__init__()
        self.num_heads = num_heads
        self.qkv_x = nn.Linear(dim_x, 3 * dim_x, bias=False)
        self.qkv_y = nn.Linear(dim_y, 3 * dim_x, bias=False)  # present in the last block too (its q/k/v are used)
        self.head_dim = head_dim = dim_x // num_heads
        self.q_norm_x, self.k_norm_x = RMSNorm(head_dim), RMSNorm(head_dim)
        self.q_norm_y, self.k_norm_y = RMSNorm(head_dim), RMSNorm(head_dim)
        self.proj_x = nn.Linear(dim_x, dim_x)
        self.proj_y = nn.Linear(dim_x, dim_y) if update_y else nn.Identity()

    def forward(self, x, y, rope, keep):
        # x (B, N, dim_x), y (B, L, dim_y) in the compute dtype, already modulated-normed; rope = (cos, sin) each
        # (N, heads, head_dim/2) fp32; keep (B, L) bool or None (None: every text token of every sample is real).
        # Under --sp, rope = (cos, sin, group, N_all): x and the tables hold this rank's ceil(N_all/sp) visual tokens,
        # y the whole text (replicated), and the joint attention goes over the group's (common/sp.py)
        B, N, _ = x.shape
        L, h, hd, dt = y.shape[1], self.num_heads, self.head_dim, x.dtype
        cos, sin, *group = rope
        q_x, k_x, v_x = self.qkv_x(x).view(B, N, 3, h, hd).unbind(2)  # rows of qkv_x: [q; k; v], head-major
        q_x = rope_apply(self.q_norm_x(q_x), cos, sin).to(dt)  # RoPE on the visual tokens only
        k_x = rope_apply(self.k_norm_x(k_x), cos, sin).to(dt)
        q_y, k_y, v_y = self.qkv_y(y).view(B, L, 3, h, hd).unbind(2)  # L may be 0: no text at all
        q_y, k_y = self.q_norm_y(q_y).to(dt), self.k_norm_y(k_y).to(dt)
        if group:  # the same keys per sample as below: all visual tokens (padding masked) and the kept text
            out_x, out_y = sp.joint_attention(q_x, k_x, v_x, *group, q_y, k_y, v_y, keep)
            out_x, out_y = out_x.flatten(2), out_y.flatten(2)  # (B, N, dim_x) this rank's, (B, L, dim_x) whole
        else:
            q, k, v = (torch.cat(p, dim=1).transpose(1, 2) for p in ((q_x, q_y), (k_x, k_y), (v_x, v_y)))
            # q, k, v (B, h, N+L, hd); mask (B, 1, 1, N+L): the keys attended
            mask = None if keep is None else F.pad(keep, (N, 0), value=True)[:, None, None, :]
            out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask).transpose(1, 2).flatten(2)  # (B,N+L,dim_x)
            out_x, out_y = out.split([N, L], dim=1)
        if keep is not None:
            out_y = out_y * keep[:, :, None].to(dt)
        return self.proj_x(out_x), self.proj_y(out_y)


class AsymmetricJointBlock(nn.Module):
    def __init__(self, cfg: MochiConfig, update_y=True):
        super().__init__()
        self.update_y = update_y
        self.mod_x = nn.Linear(cfg.dim_x, 4 * cfg.dim_x)
        # the last block only needs the text's attention-input scale: its text output is never used
        self.mod_y = nn.Linear(cfg.dim_x, (4 if update_y else 1) * cfg.dim_y)
        self.attn = AsymmetricAttention(cfg.dim_x, cfg.dim_y, cfg.num_heads, update_y)
        self.mlp_x = FeedForward(cfg.dim_x, cfg.ffn_x)
        if update_y:
            self.mlp_y = FeedForward(cfg.dim_y, cfg.ffn_y)

    def forward(self, x, c, y, rope, keep):
        # x (B, N, dim_x) fp32, c (B, dim_x) fp32 conditioning, y (B, L, dim_y) fp32
        dt = self.mod_x.bias.dtype  # the bias: a float8 .weight would be upcast just for its dtype
        c = F.silu(c).to(dt)
        scale_msa_x, gate_msa_x, scale_mlp_x, gate_mlp_x = self.mod_x(c).float().chunk(4, dim=1)
        if self.update_y:
            scale_msa_y, gate_msa_y, scale_mlp_y, gate_mlp_y = self.mod_y(c).float().chunk(4, dim=1)
        else:
            scale_msa_y = self.mod_y(c).float()
        x_attn, y_attn = self.attn(modulated_rmsnorm(x, scale_msa_x).to(dt), modulated_rmsnorm(y, scale_msa_y).to(dt),
                                   rope, keep)
        x = residual_tanh_gated_rmsnorm(x, x_attn, gate_msa_x)
        x = residual_tanh_gated_rmsnorm(x, self.mlp_x(modulated_rmsnorm(x, scale_mlp_x).to(dt)), gate_mlp_x)
        if not self.update_y:
            return x, None  # the last block's text output is never used
        y = residual_tanh_gated_rmsnorm(y, y_attn, gate_msa_y)
        y = residual_tanh_gated_rmsnorm(y, self.mlp_y(modulated_rmsnorm(y, scale_mlp_y).to(dt)), gate_mlp_y)
        return x, y


class FinalLayer(nn.Module):
    def __init__(self, cfg: MochiConfig):
        super().__init__()
        self.mod = nn.Linear(cfg.dim_x, 2 * cfg.dim_x)
        self.linear = nn.Linear(cfg.dim_x, cfg.patch_size ** 2 * cfg.in_channels)

    def forward(self, x, c):
        dt = self.mod.weight.dtype
        shift, scale = self.mod(F.silu(c).to(dt)).float().chunk(2, dim=1)  # order: shift, then scale
        x = F.layer_norm(x.float(), (x.shape[-1],), eps=1e-6) * (1 + scale[:, None]) + shift[:, None]
        return self.linear(x.to(dt)).float()


class AsymmDiT(nn.Module):
    """Mochi 1's DiT. forward(x (B,C,T,H,W) latents, sigma (B,) in [0,1] with 1 = noise, y_feat (B, L, t5_dim),
    y_mask (B, L) right-padded bool/0-1) -> upstream's prediction, the x0 - eps direction, (B,C,T,H,W) fp32."""

    def __init__(self, cfg: MochiConfig):
        super().__init__()
        self.cfg = cfg
        self.x_embedder = PatchEmbed(cfg.patch_size, cfg.in_channels, cfg.dim_x)
        self.t_embedder = TimestepEmbedder(cfg.dim_x, cfg.timestep_scale)
        self.t5_y_embedder = AttentionPool(cfg.t5_dim, cfg.pool_heads, cfg.dim_x)
        self.t5_yproj = nn.Linear(cfg.t5_dim, cfg.dim_y)
        # learned RoPE frequencies: (t, row, col) x heads x head_dim/2; kept in fp32 (upstream warns otherwise)
        self.pos_frequencies = nn.Parameter(torch.zeros(3, cfg.num_heads, cfg.dim_x // cfg.num_heads // 2))
        self.blocks = nn.ModuleList(AsymmetricJointBlock(cfg, update_y=i < cfg.depth - 1) for i in range(cfg.depth))
        self.final_layer = FinalLayer(cfg)
        self.text_multiple = 1  # the text stream's length is rounded up to this (main: 32 with --compile)
        self.sp = None  # --sp N > 1: this rank's sequence-parallel group (common/sp.py), set by build_dit

    def rope(self, T, pH, pW):
        """(cos, sin), each (N, heads, head_dim/2) fp32. Not cached: pos_frequencies is trained (and needs grads).
        Under --sp, this rank's tokens' rows only: (ceil(N/sp), heads, head_dim/2)."""
        pos = rope_positions(T, pH, pW, self.pos_frequencies.device)
        ang = torch.einsum("nd,dhf->nhf", pos, self.pos_frequencies.float())
        if self.sp is not None:  # per-token angles: shard like the tokens (padded rows: angle 0, masked keys)
            ang = sp.shard(ang, self.sp, dim=0)
        return ang.cos(), ang.sin()

    def forward(self, x, sigma, y_feat, y_mask):
        cfg = self.cfg
        B, C, T, H, W = x.shape
        p = cfg.patch_size
        pH, pW = H // p, W // p
        y_mask = y_mask.bool()
        wdt = self.x_embedder.proj.weight.dtype
        x = self.x_embedder(x.to(wdt)).float()  # (B, N, dim_x)
        N = x.shape[1]
        rope = self.rope(T, pH, pW)
        if self.sp is not None:  # --sp N: from here to the final layer each rank holds ceil(N/sp) visual tokens;
            x = sp.shard(x, self.sp)  # the text stream, the conditioning c and the pooling stay whole on every rank
            rope = (*rope, self.sp, N)
        # conditioning: time (the model sees 1 - sigma, scaled by 1000 inside) + the pooled prompt
        c = self.t_embedder(1 - sigma.float()) + self.t5_y_embedder(y_feat, y_mask)
        # the text stream: only the real tokens matter (padding never reaches x), so cut to the longest prompt
        # (rounded up to text_multiple: under torch.compile every distinct length is a recompile); mask the keys
        # only where some sample has fewer real tokens than that. (One host sync per forward.)
        n_text = y_mask.sum(1)
        L = -(-int(n_text.max()) // self.text_multiple) * self.text_multiple
        assert torch.equal(y_mask[:, :L].sum(1), n_text), "y_mask must be right-padded (real tokens first)"
        y_feat, y_mask = F.pad(y_feat[:, :L], (0, 0, 0, L - min(L, y_feat.shape[1]))), F.pad(
            y_mask[:, :L], (0, L - min(L, y_mask.shape[1])))
        keep = None if bool((n_text == L).all()) else y_mask
        y = self.t5_yproj(y_feat.to(wdt)).float()  # (B, L, dim_y)
        for block in self.blocks:
            x, y = block(x, c, y, rope, keep)
        x = self.final_layer(x, c)  # (B, N, p*p*C), features (p1, p2, c), c fastest
        if self.sp is not None:
            x = sp.gather(x, self.sp, N)  # every rank of the group gets the whole output (the loss is computed whole)
        x = x.view(B, T, pH, pW, p, p, C).permute(0, 6, 1, 2, 4, 3, 5)
        return x.reshape(B, C, T, H, W)

    @torch.no_grad()
    def init_weights(self):
        """A from-scratch init for the toy/tiny presets (upstream publishes none: real runs load the release)."""
        for m in self.modules():
            if isinstance(m, nn.Linear):
                nn.init.xavier_uniform_(m.weight)
                if m.bias is not None:
                    nn.init.zeros_(m.bias)
            elif isinstance(m, RMSNorm):
                nn.init.ones_(m.weight)
        nn.init.xavier_uniform_(self.x_embedder.proj.weight.flatten(1))
        nn.init.zeros_(self.x_embedder.proj.bias)
        for blk in self.blocks:  # modulations start at zero: scale 1, gates tanh(0) = 0 (every block is identity)
            nn.init.zeros_(blk.mod_x.weight)
            nn.init.zeros_(blk.mod_y.weight)
        nn.init.zeros_(self.final_layer.mod.weight)
        nn.init.zeros_(self.final_layer.linear.weight)
        # RoPE: the standard geometric frequencies on the 2 spatial axes, split between them per head
        hd2 = self.pos_frequencies.shape[2]
        f = 1.0 / (10000 ** (torch.arange(hd2, dtype=torch.float32) / hd2))
        self.pos_frequencies.zero_()
        self.pos_frequencies[0] = f * 0.5
        self.pos_frequencies[1, :, 0::2] = f[0::2] / 8
        self.pos_frequencies[2, :, 1::2] = f[1::2] / 8


def count_flops(cfg: MochiConfig, T, H, W, text_len=None):
    """Forward FLOPs of one sample with text_len real prompt tokens (default: all cfg.text_len): 2 per multiply-add
    of every Linear/Conv, plus attention (QK^T and PV: 4 * queries * keys * width). Training is 3x this (with a
    frozen base the backward skips the weight gradients; MFU is still quoted against 3x, as in train_wan.py).
    Equal to torch.utils.flop_counter's count of the real forward (tests)."""
    N = T * (H // cfg.patch_size) * (W // cfg.patch_size)
    L = cfg.text_len if text_len is None else text_len
    dx, dy, d5, p2c = cfg.dim_x, cfg.dim_y, cfg.t5_dim, cfg.patch_size ** 2 * cfg.in_channels
    visual = N * (3 * dx * dx + dx * dx + 3 * dx * cfg.ffn_x)  # qkv_x, proj_x, mlp_x (w1 makes 2 x ffn_x)
    text = L * (3 * dy * dx + dx * dy + 3 * dy * cfg.ffn_y) + dx * 4 * dy  # qkv_y, proj_y, mlp_y; mod_y
    last_text = L * 3 * dy * dx + dx * dy  # the last block: qkv_y and its narrow mod_y only
    per_block = 2 * (visual + dx * 4 * dx) + 4 * (N + L) ** 2 * dx  # + mod_x; joint attention
    total = cfg.depth * per_block + 2 * ((cfg.depth - 1) * text + last_text)
    total += 2 * N * 2 * p2c * dx  # patch embedding, final linear
    total += 2 * (256 * dx + dx * dx + dx * 2 * dx)  # time MLP, final modulation
    total += 2 * (L * d5 * dy + (cfg.text_len + 1) * d5 * 2 * d5 + d5 * d5 + d5 * dx)  # t5_yproj; pool: kv, q, out
    total += 4 * (cfg.text_len + 1) * d5  # the pool's one query over [mean; all tokens]
    return total + 2 * N * 3 * (dx // 2)  # the RoPE angles: positions (N, 3) @ pos_frequencies (3, heads * hd/2)


# -----------------------------------------------------------------------------------------------------
# VAE: Mochi's asymmetric causal video VAE (src/genmo/mochi_preview/vae/models.py upstream), inference only.
#
# video (B, 3, T, H, W) in [-1, 1], T = 6k + 1, H and W multiples of 8 <-> latents (B, 12, k + 1, H/8, W/8).
# The encoder (97M params, encoder.safetensors) and the decoder (363M, decoder.safetensors) are separate files and
# separate widths (64 vs 128 base channels). Every 3-D conv is causal in time (its k_t - 1 frames of padding all in
# front) and every padding, in time and space, replicates the edge. The whole clip goes through at once (no
# chunking: unlike Wan's VAE nothing here depends on it).

# Per-channel statistics of the encoder's posterior means (vae/vae_stats.py upstream). The DiT works in normalised
# latents: dit = (vae - mean) / std, and samples are decoded from dit * std + mean.
MOCHI_LATENTS_MEAN = (-0.06730895953510081, -0.038011381506090416, -0.07477820912866141, -0.05565264470995561,
                      0.012767231469026969, -0.04703542746246419, 0.043896967884726704, -0.09346305707025976,
                      -0.09918314763016893, -0.008729793427399178, -0.011931556316503654, -0.0321993391887285)
MOCHI_LATENTS_STD = (0.9263795028493863, 0.9248894543193766, 0.9393059390890617, 0.959253732819592,
                     0.8244560132752793, 0.917259975397747, 0.9294154431013696, 1.3720942357788521,
                     0.881393668867029, 0.9168315692124348, 0.9185249279345552, 0.9274757570805041)


@dataclass
class VAEConfig:
    enc_base: int = 64  # encoder stage widths: enc_base * mult
    dec_base: int = 128  # decoder stage widths: dec_base * mult
    mult: tuple = (1, 2, 4, 6)
    num_res_blocks: tuple = (3, 3, 4, 6, 3)  # per stage: the full-resolution stage, the 3 resampling ones, the bottom
    temporal: tuple = (1, 2, 3)  # time factors of the 3 resampling stages (1 * 2 * 3 = 6)
    spatial: tuple = (2, 2, 2)  # space factors (2 * 2 * 2 = 8)
    enc_attention: tuple = (False, True, True, True, True)  # the encoder's ResBlocks carry a time attention here
    latent_dim: int = 12


VAE_PRESETS = {
    "official": VAEConfig(),
    # tests: widths multiples of 32 (GroupNorm groups, attention head_dim), one ResBlock per stage
    "tiny": VAEConfig(enc_base=32, dec_base=32, mult=(1, 2, 3, 4), num_res_blocks=(1, 1, 1, 1, 1)),
}


class CausalConv3d(nn.Conv3d):
    """A 3-D conv whose time padding (k_t - 1 frames) is all in front; time and space are replicate-padded (space by
    (k - 1) / 2 on each side). Built with padding 0: the padding happens in forward."""

    def __init__(self, c_in, c_out, kernel_size, stride=1):
        super().__init__(c_in, c_out, kernel_size, stride=stride)
        kt, kh, kw = self.kernel_size
        self.pad = ((kw - 1) // 2, (kw - 1) // 2, (kh - 1) // 2, (kh - 1) // 2, kt - 1, 0)

    def forward(self, x):
        return super().forward(F.pad(x, self.pad, mode="replicate") if any(self.pad) else x)


class Conv1x1(nn.Linear):
    """A 1x1x1 conv stored as a Linear (2-D weight, as in the checkpoint): applied over the channel dim."""

    def forward(self, x):
        return super().forward(x.movedim(1, -1)).movedim(-1, 1)


class GroupNormSpatial(nn.GroupNorm):
    """GroupNorm (32 groups) of every frame on its own: statistics over (C/32, H, W), never across time."""

    def __init__(self, c):
        super().__init__(32, c, eps=1e-5)

    def forward(self, x):
        B, C, T, H, W = x.shape
        y = F.group_norm(x.transpose(1, 2).reshape(B * T, C, H, W), 32, self.weight, self.bias, self.eps)
        return y.reshape(B, T, C, H, W).transpose(1, 2)


class TimeAttention(nn.Module):
    """Causal self-attention over time at every spatial position; heads of 32, q and k L2-normalised (so the
    scale 1/sqrt(32) bounds the logits)."""

    def __init__(self, c, head_dim=32):
        super().__init__()
        self.head_dim = head_dim
        self.qkv = nn.Linear(c, 3 * c, bias=False)
        self.out = nn.Linear(c, c)

    def forward(self, x):
        B, C, T, H, W = x.shape
        x = x.permute(0, 3, 4, 2, 1).reshape(B * H * W, T, C)  # one sequence of T frames per position
        q, k, v = self.qkv(x).view(B * H * W, T, 3, C // self.head_dim, self.head_dim).permute(2, 0, 3, 1, 4)
        q, k = F.normalize(q, dim=-1), F.normalize(k, dim=-1)
        y = F.scaled_dot_product_attention(q, k, v, is_causal=True, scale=self.head_dim ** -0.5)  # (BHW, h, T, hd)
        y = self.out(y.transpose(1, 2).reshape(B * H * W, T, C))
        return y.view(B, H, W, T, C).permute(0, 4, 3, 1, 2)


class AttentionBlock(nn.Module):
    def __init__(self, c):
        super().__init__()
        self.norm = GroupNormSpatial(c)
        self.attn = TimeAttention(c)

    def forward(self, x):
        return x + self.attn(self.norm(x))


class ResBlock(nn.Module):
    def __init__(self, c, attention=False):
        super().__init__()
        # keys stack.{0,2,3,5}: GroupNorm, SiLU, conv, GroupNorm, SiLU, conv (3x3x3, causal, replicate)
        self.stack = nn.Sequential(GroupNormSpatial(c), nn.SiLU(), CausalConv3d(c, c, 3),
                                   GroupNormSpatial(c), nn.SiLU(), CausalConv3d(c, c, 3))
        self.attn_block = AttentionBlock(c) if attention else nn.Identity()

    def forward(self, x):
        return self.attn_block(x + self.stack(x))


class DownsampleBlock(nn.Module):
    def __init__(self, c_in, c_out, n_res, t, s, attention):
        super().__init__()
        # a conv with kernel = stride = (t, s, s); its t - 1 frames of causal padding repeat the first frame, so
        # 6k + 1 frames become k + 1 after the three stages (t = 1, 2, 3)
        self.layers = nn.Sequential(CausalConv3d(c_in, c_out, (t, s, s), stride=(t, s, s)),
                                    *[ResBlock(c_out, attention) for _ in range(n_res)])

    def forward(self, x):
        return self.layers(x)


class UpsampleBlock(nn.Module):
    def __init__(self, c_in, c_out, n_res, t, s):
        super().__init__()
        self.t, self.s = t, s
        self.blocks = nn.Sequential(*[ResBlock(c_in) for _ in range(n_res)])
        self.proj = Conv1x1(c_in, c_out * t * s * s)

    def forward(self, x):
        x = self.proj(self.blocks(x))
        # depth to space-time: (B, C*t*s*s, T, H, W) -> (B, C, T*t, H*s, W*s), channels ordered (C, t, s, s); then the
        # first t - 1 frames are dropped HERE, inside every stage (frames k+1 -> 3k+1 -> 6k+1), as upstream does.
        # (diffusers drops 5 frames once at the end instead, which is a different function: README.)
        B, C, T, H, W = x.shape
        c, t, s = C // (self.t * self.s * self.s), self.t, self.s
        x = x.view(B, c, t, s, s, T, H, W).permute(0, 1, 5, 2, 6, 3, 7, 4).reshape(B, c, T * t, H * s, W * s)
        return x[:, :, t - 1:]


class Encoder(nn.Module):
    def __init__(self, cfg: VAEConfig):
        super().__init__()
        ch = [cfg.enc_base * m for m in cfg.mult]
        att, n = cfg.enc_attention, cfg.num_res_blocks
        layers = [Conv1x1(15, ch[0])]  # 3 RGB + 12 Fourier channels in
        layers += [ResBlock(ch[0], att[0]) for _ in range(n[0])]
        for i in range(len(ch) - 1):
            layers.append(DownsampleBlock(ch[i], ch[i + 1], n[i + 1], cfg.temporal[i], cfg.spatial[i], att[i + 1]))
        layers += [ResBlock(ch[-1], att[-1]) for _ in range(n[-1])]
        self.layers = nn.Sequential(*layers)
        self.output_norm = GroupNormSpatial(ch[-1])
        self.output_proj = Conv1x1(ch[-1], 2 * cfg.latent_dim, bias=False)

    def forward(self, x):  # (B, 15, T, H, W) -> (mean, logvar), each (B, 12, t, h, w)
        x = self.output_proj(F.silu(self.output_norm(self.layers(x))))
        return x.chunk(2, dim=1)


class Decoder(nn.Module):
    def __init__(self, cfg: VAEConfig):
        super().__init__()
        ch = [cfg.dec_base * m for m in cfg.mult]
        n = cfg.num_res_blocks
        blocks = [nn.Sequential(nn.Conv3d(cfg.latent_dim, ch[-1], 1), *[ResBlock(ch[-1]) for _ in range(n[-1])])]
        for i in range(len(ch) - 1):  # from the bottom up: widths ch[-1] -> ch[-2] -> ... -> ch[0]
            blocks.append(UpsampleBlock(ch[-i - 1], ch[-i - 2], n[-i - 2], cfg.temporal[-i - 1], cfg.spatial[-i - 1]))
        blocks.append(nn.Sequential(*[ResBlock(ch[0]) for _ in range(n[0])]))
        self.blocks = nn.ModuleList(blocks)
        self.output_proj = Conv1x1(ch[0], 3)

    def forward(self, z):  # (B, 12, t, h, w) un-normalised latents -> (B, 3, 6(t-1)+1, 8h, 8w), about [-1, 1]
        for block in self.blocks:
            z = block(z)
        return self.output_proj(F.silu(z))


def add_fourier_features(x, freqs=(6, 7)):
    """(B, C, ...) fp32 -> (B, 3C, ...): [x, sin(2^f * 2pi * x), cos(...)] with channel c's two frequencies next to
    each other (c0f6, c0f7, c1f6, ...). Must be fp32 (upstream asserts it: bf16 phases at 2^7 * 2pi are noise)."""
    w = (2.0 ** torch.tensor(freqs, dtype=torch.float32, device=x.device)) * (2 * torch.pi)
    h = x.repeat_interleave(len(freqs), dim=1) * w.repeat(x.shape[1]).view(1, -1, *[1] * (x.dim() - 2))
    return torch.cat([x, torch.sin(h), torch.cos(h)], dim=1)


class MochiVAE(nn.Module):
    """encode(video) -> normalised latents (the posterior mean, no sampling); decode(latents) -> video. Either half
    may be absent (None) when only one of the files is loaded."""

    def __init__(self, cfg=VAEConfig(), encoder=True, decoder=True):
        super().__init__()
        self.cfg = cfg
        self.encoder = Encoder(cfg) if encoder else None
        self.decoder = Decoder(cfg) if decoder else None

    def _stats(self, device):  # (1, 12, 1, 1, 1) fp32 each; constants, not checkpoint keys
        mean = torch.tensor(MOCHI_LATENTS_MEAN, device=device).view(1, -1, 1, 1, 1)
        std = torch.tensor(MOCHI_LATENTS_STD, device=device).view(1, -1, 1, 1, 1)
        return mean, std

    def encode(self, video):
        # (B, 3, 6k+1, 8m, 8n) in [-1, 1] -> (B, 12, k+1, m, n) fp32: (posterior mean - mean) / std
        B, C, T, H, W = video.shape
        assert C == 3 and T % 6 == 1 and H % 8 == 0 and W % 8 == 0, \
            f"video must be (B, 3, 6k+1, 8m, 8n), got {tuple(video.shape)}"
        x = add_fourier_features(video.float())
        mu, _ = self.encoder(x.to(self.encoder.output_proj.weight.dtype))
        mean, std = self._stats(mu.device)
        return ((mu.float() - mean) / std).contiguous()

    def decode(self, latents, tiles=(1, 1), overlap=8):
        # normalised latents (B, 12, t, h, w) -> video (B, 3, 6(t-1)+1, 8h, 8w) clamped to [-1, 1], fp32.
        # tiles = (across, down), powers of 2: decode in spatial tiles that overlap by `overlap` latent pixels and
        # blend them, as upstream's single-GPU cli does (4 x 2 tiles, overlap 8) to bound the decoder's memory.
        mean, std = self._stats(latents.device)
        z = (latents.float() * std + mean).to(self.decoder.output_proj.weight.dtype)
        return decode_tiled(self.decoder, z, *tiles, overlap).float().clamp(-1, 1).contiguous()


def blend(a, b, n, dim):
    """a's last n and b's first n positions along dim cross-faded linearly (weights of b: 1/(n+1) ... n/(n+1)), with
    the rest of a before and the rest of b after."""
    if n == 0:
        return torch.cat([a, b], dim)
    w = torch.linspace(1 / (n + 1), n / (n + 1), n, device=a.device, dtype=a.dtype)
    w = w.view(-1, *[1] * (a.dim() - 1 - dim % a.dim()))
    mid = a.narrow(dim, a.shape[dim] - n, n) * (1 - w) + b.narrow(dim, 0, n) * w
    return torch.cat([a.narrow(dim, 0, a.shape[dim] - n), mid, b.narrow(dim, n, b.shape[dim] - n)], dim)


def decode_tiled(fn, z, tiles_w, tiles_h, overlap):
    """fn over spatial tiles of z (B, C, T, H, W), halving the width first, then the height, recursively (upstream's
    apply_tiled): each half is the half plus overlap/2 latent pixels past the middle, and the decoded halves are
    blended over overlap * (output pixels per latent pixel)."""
    if tiles_w == 1 and tiles_h == 1:
        return fn(z)
    dim, n_w, n_h = (-1, tiles_w // 2, tiles_h) if tiles_w >= 2 else (-2, tiles_w, tiles_h // 2)
    size, ov = z.shape[dim], overlap // 2
    half = size // 2
    a = decode_tiled(fn, z.narrow(dim, 0, half + ov), n_w, n_h, overlap)
    b = decode_tiled(fn, z.narrow(dim, half - ov, size - half + ov), n_w, n_h, overlap)
    return blend(a, b, int(overlap * a.shape[dim] / (half + ov)), dim)


# -----------------------------------------------------------------------------------------------------
# Text encoder: the T5-v1.1-XXL encoder (google/t5-v1_1-xxl), inference only, frozen, in fp32 as upstream runs it.
# Upstream loads it with transformers' T5EncoderModel, so the "official keys" are transformers' own
# (encoder.block.3.layer.0.SelfAttention.q.weight), and the modules below carry those names. Unlike umT5 (Wan), T5
# v1.1 has ONE relative-position table (in block 0) shared by every layer.


@dataclass
class T5Config:
    vocab: int = 32128  # 32,000 sentencepiece pieces + 100 <extra_id_*>, rounded up to a multiple of 128
    dim: int = 4096
    d_kv: int = 64  # per head
    num_heads: int = 64
    d_ff: int = 10240
    num_layers: int = 24
    num_buckets: int = 32  # relative-position buckets, 16 per direction
    max_distance: int = 128
    eps: float = 1e-6


T5_PRESETS = {
    "t5-v1_1-xxl": T5Config(),  # 4,762,310,656 params
    "tiny": T5Config(vocab=300, dim=64, d_kv=16, num_heads=4, d_ff=96, num_layers=2),  # tests
}


class T5LayerNorm(nn.Module):
    """RMSNorm, no mean, no bias; fp32 statistics, rounded to the weight dtype before the gain (as HF)."""

    def __init__(self, dim, eps):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x):
        x = x.float()
        x = x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + self.eps)
        return self.weight * x.to(self.weight.dtype)


def relative_position_bucket(rel, num_buckets, max_distance):
    """rel = key_pos - query_pos -> bucket. Bidirectional: [0, n) for rel <= 0, [n, 2n) for rel > 0; within a
    direction distances below n/2 get their own bucket, the rest log-spaced up to max_distance, then clamped."""
    n = num_buckets // 2
    exact = n // 2
    bucket = (rel > 0).long() * n
    rel = rel.abs()
    far = exact + (torch.log(rel.float() / exact) / math.log(max_distance / exact) * (n - exact)).long()
    return bucket + torch.where(rel < exact, rel, far.clamp(max=n - 1))


class T5Attention(nn.Module):
    def __init__(self, cfg: T5Config, has_bias):
        super().__init__()
        self.cfg = cfg
        inner = cfg.num_heads * cfg.d_kv
        self.q, self.k, self.v = (nn.Linear(cfg.dim, inner, bias=False) for _ in range(3))
        self.o = nn.Linear(inner, cfg.dim, bias=False)
        if has_bias:  # block 0 only
            self.relative_attention_bias = nn.Embedding(cfg.num_buckets, cfg.num_heads)

    def position_bias(self, L):  # -> (1, heads, L, L)
        pos = torch.arange(L, device=self.relative_attention_bias.weight.device)
        b = relative_position_bucket(pos[None, :] - pos[:, None], self.cfg.num_buckets, self.cfg.max_distance)
        return self.relative_attention_bias(b).permute(2, 0, 1)[None]

    def forward(self, x, bias):  # x (B, L, D); bias (B, heads, L, L): relative positions + padding mask
        B, L, _ = x.shape
        q, k, v = (f(x).view(B, L, self.cfg.num_heads, -1).transpose(1, 2) for f in (self.q, self.k, self.v))
        y = F.scaled_dot_product_attention(q, k, v, attn_mask=bias, scale=1.0)  # T5: no 1/sqrt(d_kv)
        return self.o(y.transpose(1, 2).reshape(B, L, -1))


class T5LayerSelfAttention(nn.Module):
    def __init__(self, cfg, has_bias):
        super().__init__()
        self.SelfAttention = T5Attention(cfg, has_bias)
        self.layer_norm = T5LayerNorm(cfg.dim, cfg.eps)

    def forward(self, x, bias):
        return x + self.SelfAttention(self.layer_norm(x), bias)


class T5DenseGatedActDense(nn.Module):
    """wo(gelu_tanh(wi_0 x) * wi_1 x) ("gated-gelu", HF's gelu_new)."""

    def __init__(self, cfg):
        super().__init__()
        self.wi_0 = nn.Linear(cfg.dim, cfg.d_ff, bias=False)
        self.wi_1 = nn.Linear(cfg.dim, cfg.d_ff, bias=False)
        self.wo = nn.Linear(cfg.d_ff, cfg.dim, bias=False)

    def forward(self, x):
        return self.wo(F.gelu(self.wi_0(x), approximate="tanh") * self.wi_1(x))


class T5LayerFF(nn.Module):
    def __init__(self, cfg):
        super().__init__()
        self.DenseReluDense = T5DenseGatedActDense(cfg)
        self.layer_norm = T5LayerNorm(cfg.dim, cfg.eps)

    def forward(self, x):
        return x + self.DenseReluDense(self.layer_norm(x))


class T5Block(nn.Module):
    def __init__(self, cfg, has_bias):
        super().__init__()
        self.layer = nn.ModuleList([T5LayerSelfAttention(cfg, has_bias), T5LayerFF(cfg)])

    def forward(self, x, bias):
        return self.layer[1](self.layer[0](x, bias))


class T5Stack(nn.Module):
    def __init__(self, cfg):
        super().__init__()
        self.block = nn.ModuleList(T5Block(cfg, has_bias=i == 0) for i in range(cfg.num_layers))
        self.final_layer_norm = T5LayerNorm(cfg.dim, cfg.eps)


class T5Encoder(nn.Module):
    """forward(ids (B, L) int64, mask (B, L) 0/1) -> last hidden state (B, L, dim). No fp16: T5 overflows it."""

    def __init__(self, cfg: T5Config):
        super().__init__()
        self.cfg = cfg
        self.shared = nn.Embedding(cfg.vocab, cfg.dim)  # HF's encoder.embed_tokens is this same tensor
        self.encoder = T5Stack(cfg)

    def forward(self, ids, mask):
        x = self.shared(ids)  # T5 does not scale the embeddings
        # padded keys get the dtype's most negative value (an all-padding row stays finite), plus the block-0
        # relative-position bias, computed once and shared by every layer
        pad = torch.zeros(mask.shape, dtype=x.dtype, device=x.device).masked_fill(mask == 0, torch.finfo(x.dtype).min)
        bias = self.encoder.block[0].layer[0].SelfAttention.position_bias(ids.shape[1]).to(x.dtype) + pad[:, None, None]
        for block in self.encoder.block:
            x = block(x, bias)
        return self.encoder.final_layer_norm(x)


class Tokenizer:
    """T5's sentencepiece tokenizer as upstream calls it (T5Tokenizer, legacy=False; padding="max_length",
    truncation=True): the pieces, then EOS (id 1), right-padded with <pad> (id 0); truncation keeps max_len - 1
    pieces so that EOS always fits. `path`: a folder (tokenizer.json preferred, else spiece.model) or either file."""
    pad_id, eos_id = 0, 1

    def __init__(self, path):
        self.tok = self.sp = None
        path = os.fspath(path)
        if os.path.isdir(path):
            json_file = os.path.join(path, "tokenizer.json")
            path = json_file if os.path.exists(json_file) else os.path.join(path, "spiece.model")
        if path.endswith(".json"):
            self.tok = tokenizers.Tokenizer.from_file(path)
        else:
            self.sp = sentencepiece.SentencePieceProcessor(model_file=path)
        to_id = self.tok.token_to_id if self.tok else self.sp.piece_to_id
        assert to_id("<pad>") == self.pad_id and to_id("</s>") == self.eos_id, "not a T5 vocabulary"

    def __call__(self, prompts, max_len=256):  # -> ids (B, max_len) int64, mask (B, max_len) bool
        if self.tok:
            pieces = [e.ids for e in self.tok.encode_batch(prompts, add_special_tokens=False)]
        else:
            pieces = self.sp.encode(prompts)
        ids = torch.full((len(prompts), max_len), self.pad_id, dtype=torch.long)
        mask = torch.zeros(len(prompts), max_len, dtype=torch.bool)
        for i, p in enumerate(pieces):
            p = p[: max_len - 1] + [self.eos_id]
            ids[i, : len(p)] = torch.tensor(p)
            mask[i, : len(p)] = True
        return ids, mask


class TextEncoder:
    """prompts -> (y_feat (B, 256, dim) fp32, y_mask (B, 256) bool), as upstream's get_conditioning_for_prompts:
    the encoder's whole output (the DiT never looks at padded positions) and the tokenizer's mask, except that the
    empty prompt gets ids 0 and an all-False mask (upstream does this for its empty negative prompt, which is every
    empty prompt it encodes): the DiT then attends to no text at all."""

    def __init__(self, model, tokenizer, max_len=256):
        self.model, self.tokenizer, self.max_len = model, tokenizer, max_len

    @torch.no_grad()
    def encode(self, prompts):
        ids, mask = self.tokenizer(list(prompts), self.max_len)
        for i, p in enumerate(prompts):
            if p == "":
                ids[i], mask[i] = 0, False
        device = self.model.shared.weight.device
        ids, mask = ids.to(device), mask.to(device)
        return self.model(ids, mask).float(), mask


# -----------------------------------------------------------------------------------------------------
# LoRA. The adapter lives INSIDE the Linear it adapts, so the base keeps its official key
# (`blocks.0.attn.qkv_x.weight`) and the adapter gets `blocks.0.attn.qkv_x.lora_A.weight` (rank, in) and
# `.lora_B.weight` (out, rank): the PEFT / ComfyUI naming, which is what we export (prefixed `diffusion_model.`).
# Genmo's fine-tuner adapts the same four Linears of every block (the last block has no proj_y: 191 adapters).


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


LORA_TARGETS = "attn.qkv_x,attn.qkv_y,attn.proj_x,attn.proj_y"


def add_lora(model, rank, alpha, targets=LORA_TARGETS):
    """Swap the target Linears of every block for LoRALinear (a target that is not a Linear in some block, such as
    the last block's proj_y, is skipped); freeze everything but the adapters."""
    for blk in model.blocks:
        for name in targets.split(","):
            parent_name, _, child = name.rpartition(".")
            parent = blk.get_submodule(parent_name) if parent_name else blk
            base = getattr(parent, child, None)
            if isinstance(base, nn.Linear) and not isinstance(base, LoRALinear):
                setattr(parent, child, LoRALinear(base, rank, alpha))
    for n, p in model.named_parameters():
        p.requires_grad_(".lora_" in n)
    return model


def lora_init_state(model, seed):
    """Fresh adapters as a CPU state dict: A ~ kaiming-uniform(a=sqrt(5)) (Genmo's and PEFT's init), B = 0, so training
    starts from exactly the base model. Made on one rank and broadcast, so 1 or N ranks start equal."""
    g = torch.Generator().manual_seed(seed)
    sd = {}
    for name, m in model.named_modules():
        if isinstance(m, LoRALinear):
            r, n_in = m.lora_A.weight.shape
            sd[name + ".lora_A.weight"] = (torch.rand(r, n_in, generator=g) * 2 - 1) / math.sqrt(n_in)
            sd[name + ".lora_B.weight"] = torch.zeros(m.lora_B.weight.shape)
    return sd


# Genmo's fine-tuner (genmoai/mochi demos/fine_tuner; the layer is dit/joint_model/lora.py `LoraLinear`) writes
# `model_{step}.lora.safetensors`: only the adapter tensors, named `blocks.{i}.attn.{qkv_x,qkv_y,proj_x,proj_y}.lora_A`
# (r, in) and `.lora_B` (out, r) with no `.weight`, stored in the model dtype (bf16), and the header's "kwargs" = the
# JSON of {qkv_proj_lora_rank, _alpha, _dropout, out_proj_lora_rank, _alpha, _dropout}: one rank and one alpha for
# the qkv group (qkv_x, qkv_y) and one for the out group (proj_x, proj_y). The `.pt` variant (its pipelines.py
# `DitModelFactory` reads both) is a pickle {"state_dict": those tensors, "kwargs": that dict}, or, as train.py
# writes it (save_safetensors: false), the bare tensor dict with no kwargs (read with scale 1). Upstream applies
#   y = F.linear(x, W, b) + (dropout(x) @ A.T @ B.T) * (alpha / r)   (LoraLinear.forward; eval() merges
#   W += B @ A * alpha / r, the same map), so each group's adapter is W + (alpha_g / r_g) * B @ A. Our LoRALinear has
# one rank and one scale per model: a smaller rank is zero-padded to the larger (zero rows of A, zero columns of B:
# the product is unchanged); one common scale s comes back as alpha = s * rank, two different scales are folded
# into their B's (alpha = rank, scale 1).
GENMO_GROUPS = {"qkv_proj": (".attn.qkv_x", ".attn.qkv_y"), "out_proj": (".attn.proj_x", ".attn.proj_y")}


def read_genmo_lora(path):
    """Genmo's fine-tuner's LoRA file (.safetensors or .pt) -> (official-key sd, rank, alpha), see above."""
    if path.endswith(".safetensors"):
        with safe_open(path, framework="pt", device="cpu") as f:
            raw, kw = {k: f.get_tensor(k) for k in f.keys()}, json.loads((f.metadata() or {}).get("kwargs", "{}"))
    else:  # plain dicts, tensors and numbers only: weights_only loads it without running pickled code
        try:
            obj = torch.load(path, map_location="cpu", weights_only=True)
        except Exception as e:  # not a pickle (or one with more than tensors): one line naming the file
            raise ValueError(f"{path}: not a readable LoRA .pt file ({type(e).__name__}: {str(e)[:200]})") from None
        # pipelines.py reads {"state_dict", "kwargs"}; the fine-tuner itself (train.py, save_safetensors: false)
        # writes torch.save(model_sd): the bare tensor dict, no kwargs (then scale 1, as for a bare .safetensors)
        raw, kw = (obj["state_dict"], obj.get("kwargs", {})) if "state_dict" in obj else (obj, {})
        kw = json.loads(kw) if isinstance(kw, str) else kw
    sd = {k + ".weight": v.float() for k, v in raw.items() if k.endswith((".lora_A", ".lora_B"))}
    if not sd:
        raise ValueError(f"{path}: no `*.lora_A` / `*.lora_B` tensors: not a Genmo fine-tuner LoRA file")
    mods = sorted(k[: -len(".lora_A.weight")] for k in sd if k.endswith(".lora_A.weight"))
    rank = max(sd[m + ".lora_A.weight"].shape[0] for m in mods)
    scale = {}
    for m in mods:
        group = next((g for g, ends in GENMO_GROUPS.items() if m.endswith(ends)), None)
        if group is None:
            raise ValueError(f"{path}: {m} is not one of Genmo's LoRA targets (attn.qkv_x/qkv_y/proj_x/proj_y)")
        a, b = sd[m + ".lora_A.weight"], sd[m + ".lora_B.weight"]
        r = a.shape[0]
        if kw.get(f"{group}_lora_rank", r) != r:
            raise ValueError(f"{path}: {m}.lora_A has rank {r} but the header says {group}_lora_rank="
                             f"{kw[f'{group}_lora_rank']}")
        scale[m] = float(kw.get(f"{group}_lora_alpha", r)) / r  # no header: scale 1, as ComfyUI reads these
        sd[m + ".lora_A.weight"], sd[m + ".lora_B.weight"] = F.pad(a, (0, 0, 0, rank - r)), F.pad(b, (0, rank - r))
    if len(set(scale.values())) == 1:  # one scale s: LoRALinear's alpha / rank = s
        return sd, rank, next(iter(scale.values())) * rank
    for m in mods:
        sd[m + ".lora_B.weight"] = sd[m + ".lora_B.weight"] * scale[m]
    return sd, rank, float(rank)


def read_lora(path):
    """A LoRA file -> (official-key state dict `X.lora_A.weight` / `X.lora_B.weight`, rank, alpha): ours and
    diffusion-pipe's (ComfyUI format: common/lora_file.py), or Genmo's fine-tuner output (read_genmo_lora)."""
    path = str(path)
    if not path.endswith(".safetensors"):
        return read_genmo_lora(path)
    check_lora_layout(path)
    if any(k.endswith((".lora_A", ".lora_B")) for k in safetensors_header(path)[1]):
        return read_genmo_lora(path)
    return lora_file.read_lora(path)


def lora_for(path, cfg):
    """--lora (--mode sample), --init_lora, --base_lora: the file read and checked against the model of `cfg` ->
    (adapters of the blocks' Linears, rank, alpha). Full-weight deltas (.diff) and adapters outside the blocks are
    refused (add_lora adapts the blocks only); a LoRA of another model (more blocks, another width) is one UserError
    line naming the keys, before any weight is read."""
    try:
        lsd, rank, alpha = read_lora(path)
    except ValueError as e:  # common/lora_file.py's: the file and what is wrong with it, in one line
        raise UserError(str(e)) from None
    outside = [k for k in lsd if not k.startswith("blocks.")]
    if outside:
        raise UserError(f"{path}: LoRA on modules outside the blocks is not supported: {outside[:4]}")
    with torch.device("meta"):
        fit = AsymmDiT(cfg)
    try:
        lora_file.check_fits(path, lsd, rank, fit)
    except ValueError as e:
        raise UserError(str(e)) from None
    return lsd, rank, alpha


def check_lora_layout(path):
    """One clear line for a diffusers-format LoRA (`transformer.transformer_blocks.N.attn1.to_q.lora_A.weight`), from
    the header alone. Not mapped: its adapters on the split to_q / to_k / to_v would become one block-diagonal
    adapter of 3 times the rank on each fused qkv, w1's B would need its halves swapped, and PEFT keeps alpha
    outside the tensors."""
    names = [k.removeprefix("transformer.").removeprefix("diffusion_model.") for k in safetensors_header(path)[1]]
    if any(k.startswith("transformer_blocks.") for k in names):
        raise UserError(f"{path}: diffusers-format LoRA (transformer_blocks.N.attn1.to_q...): not supported; the "
                        "formats that load: ComfyUI's with the official names (ours, diffusion-pipe's: "
                        "diffusion_model.blocks.N.attn.qkv_x.lora_A.weight) and Genmo's fine-tuner's "
                        "(blocks.N.attn.qkv_x.lora_A, .safetensors or .pt)")


def export_weights(model, args, cfg, path):
    """The LoRA in ComfyUI's key format (diffusion_model.<official module>.lora_A/.lora_B.weight + .alpha), or a
    full fine-tune as the official-key DiT in bf16 (keep_fp32's tensors in fp32) with its config in the header.
    Collective (every rank gathers); rank 0 writes. A LoRA export gathers only the adapters."""
    lora = args.lora_rank > 0
    sd = gather_params(model, only=(lambda k: ".lora_" in k) if lora else None)
    if torch.distributed.get_rank() != 0:
        return
    meta = {"format": "pt", "base_model": "mochi-1-preview" if args.preset == "10B" else "mochi-custom",
            "mochi_config": json.dumps(dataclasses.asdict(cfg)), "args": json.dumps(dataclasses.asdict(args))}
    if lora:
        alpha = args.lora_alpha or args.lora_rank
        meta.update(lora_rank=args.lora_rank, lora_alpha=float(alpha), lora_targets=args.lora_targets)
        lora_file.write_lora(path, sd, alpha, metadata=meta)
    else:
        save_file({k: v.to(torch.float32 if keep_fp32(k) else torch.bfloat16).contiguous() for k, v in sd.items()},
                  path + ".tmp", metadata=meta)
        os.replace(path + ".tmp", path)


# -----------------------------------------------------------------------------------------------------
# Flow matching, Mochi's own convention: sigma in [0, 1], sigma = 1 is pure noise,
#   z_sigma = (1 - sigma) * x0 + sigma * eps,   the model sees 1000 * (1 - sigma),   it predicts x0 - eps,
# and sampling integrates from sigma = 1 down to 0 with z <- z + (sigma_i - sigma_{i+1}) * pred.
#
# x0 is the NORMALISED latent ((posterior mean - mean) / std, what MochiVAE.encode returns), because that is the
# space inference samples in (z ~ N(0, 1), un-normalised only before decoding). Genmo's fine-tuner noises the RAW
# latent and normalises only the target difference ((z - eps - mean) / std), which matches neither its own
# inference nor itself at sigma = 1 (genmoai/mochi issue #110); training in the space the model is sampled in is
# the consistent choice. Its fine-tuner also draws sigma ~ U(0, 1) and samples the posterior; we use the mean
# (the posterior's std is small) so that the cache holds one deterministic latent per clip.


def shift_sigma(sigma, shift):
    """s*sigma / (1 + (s-1)*sigma): shift > 1 moves mass towards noise (sigma = 1)."""
    return shift * sigma / (1 + (shift - 1) * sigma)


def sample_sigmas(n, method, shift=1.0, generator=None, device="cpu"):
    """Training sigmas. uniform: U(0,1) (Genmo's fine-tuner). logit_normal: sigmoid(N(0,1)). shift: uniform through
    shift_sigma. Any method is shifted when shift != 1."""
    if method in ("uniform", "shift"):
        s = torch.rand(n, generator=generator, device=device)
    elif method == "logit_normal":
        s = torch.sigmoid(torch.randn(n, generator=generator, device=device))
    else:
        raise ValueError(f"--timestep_sampling must be uniform, logit_normal or shift, got {method!r}")
    return shift_sigma(s, shift) if shift != 1.0 else s


def flow_loss(model, x0, y_feat, y_mask, sigma, noise):
    """MSE between the model's prediction and x0 - eps; x0, noise (B,C,T,H,W); sigma (B,)."""
    s = sigma.view(-1, 1, 1, 1, 1)
    z = (1 - s) * x0 + s * noise
    pred = model(z, sigma, y_feat, y_mask)
    return F.mse_loss(pred.float(), (x0 - noise).float())


def linear_quadratic_schedule(steps, threshold_noise=0.025, linear_steps=None):
    """Upstream's sampling sigmas (pipelines.py), (steps + 1,) from 1 down to 0: the first linear_steps (default
    half) move 1 - sigma linearly from 0 to threshold_noise; the rest follow a quadratic in the step index that is
    continuous with that line and reaches 1 - sigma = 1 at the end. In float64 python floats, as upstream."""
    linear_steps = steps // 2 if linear_steps is None else linear_steps
    lin = [i * threshold_noise / linear_steps for i in range(linear_steps)]
    diff = linear_steps - threshold_noise * steps
    q_steps = steps - linear_steps
    a = diff / (linear_steps * q_steps ** 2)
    b = threshold_noise / linear_steps - 2 * diff / q_steps ** 2
    c = a * linear_steps ** 2
    quad = [a * i * i + b * i + c for i in range(linear_steps, steps)]
    return [1.0 - x for x in lin + quad + [1.0]]


def guided_pred(model, z, sigma, cond, uncond, guidance):
    """uncond + g * (cond - uncond), cond and uncond in one batch of 2B: their prompts may differ in length (the
    shorter is padded with masked-out rows; the DiT attends to each sample's own real tokens only).
    cond/uncond = (y_feat (B, L, D), y_mask (B, L)). fp32."""
    s = torch.full((z.shape[0],), float(sigma), device=z.device)
    if guidance == 1.0 or uncond is None:
        return model(z, s, *cond).float()
    L = max(cond[0].shape[1], uncond[0].shape[1])
    y = torch.cat([F.pad(c[0], (0, 0, 0, L - c[0].shape[1])) for c in (cond, uncond)])
    m = torch.cat([F.pad(c[1].bool(), (0, L - c[1].shape[1])) for c in (cond, uncond)])
    out = model(torch.cat([z, z]), torch.cat([s, s]), y, m).float()
    c, u = out.chunk(2)
    return u + guidance * (c - u)


@torch.no_grad()
def sample_euler(model, noise, cond, uncond=None, steps=64, guidance=6.0, threshold_noise=0.025, linear_steps=None):
    """Upstream's sampler: Euler on the linear-quadratic schedule with classifier-free guidance (cli.py defaults:
    64 steps, threshold 0.025, cfg 6.0). noise (B,12,t,h,w) -> normalised latents (B,12,t,h,w) fp32."""
    sigmas = linear_quadratic_schedule(steps, threshold_noise, linear_steps)
    z = noise.float()
    for s, s_next in zip(sigmas[:-1], sigmas[1:]):
        z = z + (s - s_next) * guided_pred(model, z, s, cond, uncond, guidance)
    return z


# -----------------------------------------------------------------------------------------------------
# Loading the released weights (genmo/mochi-1-preview). The files carry no config: the architecture is read off
# the tensor shapes. Accepted layouts:
#   DiT: the folder with dit.safetensors, or a .safetensors file with the official keys, optionally prefixed
#        `model.diffusion_model.` / `diffusion_model.` (ComfyUI's repackaged mochi_preview_*.safetensors), or our own
#        full fine-tune export (its config in the header); or a diffusers MochiTransformer3DModel folder
#        (transformer/: config.json + diffusion_pytorch_model*.safetensors), renamed to the official keys on load.
#   VAE: the folder with encoder.safetensors and/or decoder.safetensors.
#   T5:  the Mochi folder's text_encoder/ + tokenizer/ (the diffusers layout it also ships), a google/t5-v1_1-xxl
#        folder (config.json, *.safetensors or pytorch_model.bin, spiece.model / tokenizer.json), or one weights file.

DIT_FILE, ENCODER_FILE, DECODER_FILE = "dit.safetensors", "encoder.safetensors", "decoder.safetensors"
DIFFUSERS_WEIGHTS = "diffusion_pytorch_model"
DIT_HINT = ("train_mochi.py loads Mochi 1's AsymmDiT: dit.safetensors of genmo/mochi-1-preview (or a single "
            "official-key .safetensors such as ComfyUI's repackaged file, or diffusers' transformer/ folder).")


def keep_fp32(key):
    """The tensors upstream keeps in fp32 when it runs the DiT in bf16: the learned RoPE frequencies and the q/k
    RMSNorm gains (the maintainer, genmoai/mochi issue #115)."""
    return key == "pos_frequencies" or key.endswith(("_norm_x.weight", "_norm_y.weight"))


def official_dit_keys(sd):
    for prefix in ("model.diffusion_model.", "diffusion_model."):  # ComfyUI's fp8_scaled marker is unprefixed
        if sd and all(k.startswith(prefix) for k in sd if k != "scaled_fp8"):
            return {k[len(prefix):]: v for k, v in sd.items()}
    return sd


def dit_config_from(shapes):
    """MochiConfig from {official key: shape}: depth from the block count, the widths from the embedders, the heads
    from pos_frequencies (3, heads, head_dim/2), the MLP widths from w2."""
    if "pos_frequencies" not in shapes or "blocks.0.mlp_x.w2.weight" not in shapes:
        raise KeyError(f"no pos_frequencies / blocks.0.mlp_x.w2.weight: not a Mochi DiT. {DIT_HINT}")
    dim_x, c_in, p, _ = shapes["x_embedder.proj.weight"]
    dim_y, t5_dim = shapes["t5_yproj.weight"]
    return MochiConfig(dim_x=dim_x, dim_y=dim_y, num_heads=shapes["pos_frequencies"][1],
                       depth=1 + max(int(k.split(".")[1]) for k in shapes if k.startswith("blocks.")),
                       ffn_x=shapes["blocks.0.mlp_x.w2.weight"][1], ffn_y=shapes["blocks.0.mlp_y.w2.weight"][1],
                       in_channels=c_in, patch_size=p, t5_dim=t5_dim)


# diffusers' MochiTransformer3DModel names the same tensors differently (its scripts/convert_mochi_to_diffusers.py;
# spec section 1.5). Inverted here, per key: the top-level modules by prefix, the block modules by name; to_q/to_k/
# to_v (add_q/k/v_proj) are the row thirds of qkv_x (qkv_y), concatenated back in that order (q, k, v, each
# head-major); the SwiGLU w1 and the final modulation come with their halves swapped (diffusers gates with the
# first half and orders scale, shift; upstream gates with the second and orders shift, scale), swapped back.
DIFFUSERS_TOP = (("patch_embed.proj.", "x_embedder.proj."), ("time_embed.timestep_embedder.linear_1.",
                 "t_embedder.mlp.0."), ("time_embed.timestep_embedder.linear_2.", "t_embedder.mlp.2."),
                 ("time_embed.pooler.", "t5_y_embedder."), ("time_embed.caption_proj.", "t5_yproj."),
                 ("norm_out.linear.", "final_layer.mod."), ("proj_out.", "final_layer.linear."))
DIFFUSERS_BLOCK = {"norm1.linear": "mod_x", "norm1_context.linear": "mod_y", "norm1_context.linear_1": "mod_y",
                   "attn1.norm_q": "attn.q_norm_x", "attn1.norm_k": "attn.k_norm_x", "attn1.norm_added_q":
                   "attn.q_norm_y", "attn1.norm_added_k": "attn.k_norm_y", "attn1.to_out.0": "attn.proj_x",
                   "attn1.to_add_out": "attn.proj_y", "ff.net.0.proj": "mlp_x.w1", "ff.net.2": "mlp_x.w2",
                   "ff_context.net.0.proj": "mlp_y.w1", "ff_context.net.2": "mlp_y.w2"}
DIFFUSERS_QKV = {"attn1.to_q": ("attn.qkv_x", 0), "attn1.to_k": ("attn.qkv_x", 1), "attn1.to_v": ("attn.qkv_x", 2),
                 "attn1.add_q_proj": ("attn.qkv_y", 0), "attn1.add_k_proj": ("attn.qkv_y", 1),
                 "attn1.add_v_proj": ("attn.qkv_y", 2)}


def official_name(key):
    """A diffusers key -> (official key, slot): slot 0/1/2 = the q/k/v third of a fused qkv, else None. Keys it does
    not know pass through unchanged (check_keys then names them)."""
    if key.startswith("transformer_blocks."):
        _, i, rest = key.split(".", 2)
        mod, leaf = rest.rsplit(".", 1)
        if mod in DIFFUSERS_QKV:
            name, slot = DIFFUSERS_QKV[mod]
            return f"blocks.{i}.{name}.{leaf}", slot
        return f"blocks.{i}.{DIFFUSERS_BLOCK.get(mod, mod)}.{leaf}", None
    for a, b in DIFFUSERS_TOP:
        if key.startswith(a):
            return b + key[len(a):], None
    return key, None


def official_from_diffusers(sd):
    """{diffusers key: tensor} -> {official key: tensor} (emptied as it goes: no second copy of the model)."""
    out, qkv = {}, {}
    for k in list(sd):
        v = sd.pop(k)
        name, slot = official_name(k)
        if name.endswith((".mlp_x.w1.weight", ".mlp_y.w1.weight")) or name.startswith("final_layer.mod."):
            v = torch.cat(v.chunk(2)[::-1])
        if slot is None:
            out[name] = v
        else:
            qkv.setdefault(name, {})[slot] = v
    for name, parts in qkv.items():
        if sorted(parts) != [0, 1, 2]:
            raise KeyError(f"{name}: the diffusers file lacks some of its to_q / to_k / to_v (add_*_proj) parts")
        out[name] = torch.cat([parts[0], parts[1], parts[2]])
    return out


def diffusers_dit_folder(path):
    """The diffusers MochiTransformer3DModel folder at `path` (transformer/ itself, or the pipeline folder holding
    it), else None."""
    for d in (path, os.path.join(path, "transformer")):
        config = os.path.join(d, "config.json")
        if os.path.isfile(config) and glob.glob(os.path.join(d, DIFFUSERS_WEIGHTS + "*.safetensors")):
            with open(config) as f:
                if json.load(f).get("_class_name") == "MochiTransformer3DModel":
                    return d
    return None


def dit_file(path):
    path = str(path)
    if os.path.isdir(path):
        path = os.path.join(path, DIT_FILE)
    if not (path.endswith(".safetensors") and os.path.isfile(path)):
        raise FileNotFoundError(f"{path}: expected a folder with {DIT_FILE} (or diffusers' transformer/ folder) or "
                                "a .safetensors DiT file")
    return path


def dit_source(path):
    """-> ("diffusers", folder) for a diffusers transformer folder (a folder's dit.safetensors wins), else
    ("official", the .safetensors file)."""
    path = str(path)
    if os.path.isdir(path) and not os.path.isfile(os.path.join(path, DIT_FILE)):
        folder = diffusers_dit_folder(path)
        if folder:
            return "diffusers", folder
    if os.path.isfile(path) and os.path.basename(path).startswith(DIFFUSERS_WEIGHTS):
        folder = diffusers_dit_folder(os.path.dirname(os.path.abspath(path)))
        if folder:  # one file (a shard) of diffusers' transformer/ folder: the folder, all of its shards
            return "diffusers", folder
    return "official", dit_file(path)


def read_dit_config(path):
    """The MochiConfig of the DiT at `path` from its header alone (our exports carry theirs: toy/tiny text_len; a
    diffusers folder's config.json gives its max_sequence_length)."""
    kind, where = dit_source(path)
    if kind == "diffusers":
        shapes = {}
        for file in safetensors_files(where, DIFFUSERS_WEIGHTS):
            shapes.update({k: torch.empty(s, device="meta") for k, s in safetensors_header(file)[1].items()})
        with open(os.path.join(where, "config.json")) as f:
            text_len = json.load(f).get("max_sequence_length", 256)
        cfg = dit_config_from({k: tuple(v.shape) for k, v in official_from_diffusers(shapes).items()})
        return dataclasses.replace(cfg, text_len=text_len)
    meta, shapes = safetensors_header(where)
    if "mochi_config" in meta:
        return MochiConfig(**json.loads(meta["mochi_config"]))
    if any(k.startswith("transformer_blocks.") for k in shapes):
        raise KeyError("diffusers-format MochiTransformer3DModel weights without their config.json: give "
                       f"--dit_path the transformer/ folder (config.json + {DIFFUSERS_WEIGHTS}*.safetensors)")
    return dit_config_from(official_dit_keys(shapes))


def read_dit_checkpoint(path, dtype=None):
    """-> (MochiConfig, official-key state dict on CPU): every tensor read straight into `dtype` (the release is fp32
    on disk: 40 GB, 20 GB in bf16), except keep_fp32's, which stay fp32."""
    kind, file = dit_source(path)
    if kind == "diffusers":
        sd = {}
        for fn in safetensors_files(file, DIFFUSERS_WEIGHTS):
            with safe_open(fn, framework="pt", device="cpu") as f:
                for k in f.keys():
                    t = f.get_tensor(k)
                    if dtype is not None and t.is_floating_point():
                        t = t.float() if keep_fp32(official_name(k)[0]) else t.to(dtype)
                    sd[k] = t
        return read_dit_config(path), official_from_diffusers(sd)
    sd = read_safetensors([file], dtype)
    if dtype not in (None, torch.float32):
        with safe_open(file, framework="pt", device="cpu") as f:
            for k in f.keys():
                if keep_fp32(k.removeprefix("model.").removeprefix("diffusion_model.")):
                    sd[k] = f.get_tensor(k).float()
    return read_dit_config(path), official_dit_keys(sd)


def load_dit(path, dtype=torch.float32, device="cpu"):
    """An AsymmDiT (eval mode) from the folder or the file, built on the meta device and filled with the weights."""
    cfg, sd = read_dit_checkpoint(path, dtype)
    with torch.device("meta"):
        model = AsymmDiT(cfg)
    check_keys(model.state_dict().keys(), sd, path, hint=DIT_HINT)
    check_shapes(model.state_dict(), sd, path)
    model.load_state_dict(sd, assign=True)
    return model.to(device).eval()


def vae_config_from(enc, dec):
    """VAEConfig from the encoder's and/or the decoder's {key: tensor}: widths from the first/last convs, the stage
    multipliers from the (down/up)sampling convs, the ResBlock counts by counting, the time factors from the
    downsampling kernels (encoder) or the depth-to-space widths (decoder), the attention layout from the keys."""
    def res_ids(sd, prefix):  # indices of the ResBlocks directly under prefix (prefix.N.stack.0.weight)
        return sorted({int(k[len(prefix):].split(".")[0]) for k in sd
                       if k.startswith(prefix) and k[len(prefix):].split(".")[1:3] == ["stack", "0"]})

    def count(sd, prefix):
        return len(res_ids(sd, prefix))

    cfg = {}
    if enc:
        downs = sorted({int(k.split(".")[1]) for k in enc if k.startswith("layers.") and ".layers." in k})
        blocks = res_ids(enc, "layers.")
        first, last = [i for i in blocks if i < downs[0]], [i for i in blocks if i > downs[-1]]
        ch, temporal, spatial = [enc["layers.0.weight"].shape[0]], [], []
        res, att = [len(first)], [any(k.startswith(f"layers.{first[0]}.attn_block") for k in enc)]
        for d in downs:
            w = enc[f"layers.{d}.layers.0.weight"]  # (c_out, c_in, t, s, s), kernel = stride
            ch.append(w.shape[0])
            temporal.append(w.shape[2])
            spatial.append(w.shape[3])
            res.append(count(enc, f"layers.{d}.layers."))
            att.append(any(k.startswith(f"layers.{d}.layers.1.attn_block") for k in enc))
        res.append(len(last))
        att.append(any(k.startswith(f"layers.{last[0]}.attn_block") for k in enc))
        cfg = dict(enc_base=ch[0], mult=tuple(c // ch[0] for c in ch), num_res_blocks=tuple(res),
                   temporal=tuple(temporal), spatial=tuple(spatial), enc_attention=tuple(att),
                   latent_dim=enc["output_proj.weight"].shape[0] // 2)
    if dec:
        base = dec["output_proj.weight"].shape[1]
        n_up = len({k.split(".")[1] for k in dec if k.startswith("blocks.") and ".proj." in k})
        # stage widths from the bottom up: blocks.0's conv, then each up block's proj input, then the output's
        widths = [dec[f"blocks.{i + 1}.proj.weight"].shape[1] for i in range(n_up)] + [base]
        temporal = []
        for i in range(n_up):  # proj: c_in -> c_out * t * s * s, with s = 2 in every Mochi VAE
            temporal.append(dec[f"blocks.{i + 1}.proj.weight"].shape[0] // (widths[i + 1] * 4))
        res = [count(dec, f"blocks.{n_up + 1}.")] + [count(dec, f"blocks.{n_up - i}.blocks.") for i in range(n_up)]
        res.append(count(dec, "blocks.0."))
        dcfg = dict(dec_base=base, mult=tuple(w // base for w in widths[::-1]), num_res_blocks=tuple(res),
                    temporal=tuple(temporal[::-1]), spatial=(2,) * n_up, latent_dim=dec["blocks.0.0.weight"].shape[1])
        for k, v in dcfg.items():
            if k in cfg and cfg[k] != v:
                raise ValueError(f"the encoder and decoder files disagree on {k}: {cfg[k]} vs {v}")
        cfg.update(dcfg)
    return dataclasses.replace(VAE_PRESETS["official"], **cfg)


def load_vae(path, dtype=torch.float32, device="cpu", encoder=True, decoder=True) -> MochiVAE:
    """The VAE from the folder with encoder.safetensors and decoder.safetensors (either may be skipped, or absent
    when it is not asked for). Frozen, eval mode. Upstream's VAE runs in fp32 here (its decode uses bf16 autocast
    on GPU; fp32 is the exact one)."""
    path = str(path)
    sds = {}
    for part, want, name in (("encoder", encoder, ENCODER_FILE), ("decoder", decoder, DECODER_FILE)):
        file = os.path.join(path, name)
        if want:
            if not os.path.isfile(file):
                raise FileNotFoundError(f"{path}: no {name} (genmo/mochi-1-preview has it at the top level)")
            sds[part] = read_safetensors([file], dtype)
    cfg = vae_config_from(sds.get("encoder"), sds.get("decoder"))
    with torch.device("meta"):
        model = MochiVAE(cfg, encoder="encoder" in sds, decoder="decoder" in sds)
    for part, sd in sds.items():
        m = getattr(model, part)
        check_keys(m.state_dict().keys(), sd, os.path.join(path, part + ".safetensors"),
                   hint="expected the official Mochi VAE keys (layers.* / blocks.*), not diffusers' AutoencoderKLMochi")
        check_shapes(m.state_dict(), sd, path)
        m.load_state_dict(sd, assign=True)
    return model.to(device).eval().requires_grad_(False)


def t5_config_from(sd):
    vocab, dim = sd["shared.weight"].shape
    buckets, heads = sd["encoder.block.0.layer.0.SelfAttention.relative_attention_bias.weight"].shape
    return T5Config(vocab=vocab, dim=dim, d_kv=sd["encoder.block.0.layer.0.SelfAttention.q.weight"].shape[0] // heads,
                    num_heads=heads, d_ff=sd["encoder.block.0.layer.1.DenseReluDense.wi_0.weight"].shape[0],
                    num_buckets=buckets, num_layers=1 + max(int(k.split(".")[2]) for k in sd
                                                            if k.startswith("encoder.block.")))


def load_text_encoder(path, dtype=torch.float32, device="cpu", tokenizer_path=None):
    """TextEncoder (T5-v1.1-XXL + its tokenizer, 256 tokens) from the Mochi folder (text_encoder/ + tokenizer/),
    a google/t5-v1_1-xxl folder, or a weights file (then tokenizer_path is needed). fp32 by default, as upstream."""
    assert dtype in (torch.float32, torch.bfloat16), "T5 overflows fp16; use fp32 or bf16"
    path, tok = str(path), tokenizer_path
    if os.path.isdir(os.path.join(path, "text_encoder")):
        tok = tok or os.path.join(path, "tokenizer")
        path = os.path.join(path, "text_encoder")
    elif os.path.isdir(path) and any(os.path.isfile(os.path.join(path, f)) for f in (DIT_FILE, ENCODER_FILE)):
        # the folder upstream's scripts/download_weights.py makes holds the DiT and the VAE only (upstream's T5 comes
        # from google/t5-v1_1-xxl): name what is missing before anything is read (dit.safetensors is 40 GB)
        raise FileNotFoundError(f"{path}: no text_encoder/ and tokenizer/ (T5-v1.1-XXL) in this Mochi folder: "
                                "download both folders from genmo/mochi-1-preview into it")
    if os.path.isdir(path):
        tok = tok or path
        if any(os.path.isfile(os.path.join(path, "model" + e)) for e in (".safetensors", ".safetensors.index.json")):
            files = safetensors_files(path, "model")  # what from_pretrained reads; a bf16 variant beside it is not
        else:
            files = sorted(glob.glob(os.path.join(path, "*.safetensors"))) or sorted(
                glob.glob(os.path.join(path, "*.bin")))
        if not files:
            raise FileNotFoundError(f"{path}: no *.safetensors or pytorch_model*.bin T5 weights in it")
    else:
        files = [path]
    sd = {}
    for f in files:
        sd.update(read_weights(f, dtype))
    embed = sd.pop("encoder.embed_tokens.weight", None)  # tied to shared.weight; files carry either or both
    sd.setdefault("shared.weight", embed)
    sd = {k: v for k, v in sd.items() if k.startswith(("shared.", "encoder."))}  # an enc-dec file: drop decoder.*
    if sd["shared.weight"] is None or "encoder.block.0.layer.0.SelfAttention.relative_attention_bias.weight" not in sd:
        raise KeyError(f"{path}: not a T5 encoder (expected transformers' keys, e.g. shared.weight, "
                       "encoder.block.0.layer.0.SelfAttention.q.weight)")
    cfg = t5_config_from(sd)
    with torch.device("meta"):
        model = T5Encoder(cfg)
    check_keys(model.state_dict().keys(), sd, path, hint="expected transformers' T5EncoderModel keys")
    check_shapes(model.state_dict(), sd, path)
    model.load_state_dict(sd, assign=True)
    if tok is None:
        raise FileNotFoundError(f"{path}: no tokenizer: pass tokenizer_path (a folder with spiece.model)")
    return TextEncoder(model.to(device).eval().requires_grad_(False), Tokenizer(tok))


# -----------------------------------------------------------------------------------------------------
# Flags (common/args.py turns every field into --name value; the comment is its --help). The same names as in
# train_wan.py wherever the concept is the same.


@dataclass
class Args:
    mode: str = "train"  # train | cache (encode the dataset, stop) | sample (videos for --sample_prompts) | bench
    preset: str = "10B"  # toy | tiny | 10B (with --ckpt_dir or --dit_path the checkpoint's own config wins)
    ckpt_dir: str = ""  # the genmo/mochi-1-preview folder (dit, encoder, decoder, text_encoder/); empty = random init
    dit_path: str = ""  # a DiT elsewhere than ckpt_dir: ComfyUI's file, our model.safetensors, diffusers' transformer/
    encoders: str = "official"  # official (the VAE and T5 of --ckpt_dir) | toy (data/toy.py's pixel-space pair)
    data: str = ""  # a folder of videos/images + same-name .txt captions, or a .jsonl/.csv; several: clips/,stills/*3
    cache_dir: str = "cache"  # encoded latents and text embeddings (keyed by content and settings)
    out_dir: str = ""  # the run folder; default runs/mochi-<preset> (runs/mochi-<preset>-sample for --mode sample)
    # data
    height: int = 480  # the bucket area is height*width; buckets keep that area at other aspect ratios
    width: int = 848  # (sides are multiples of 16: the VAE's 8 times the patch's 2)
    frames: int = 37  # the most frames of a clip (6k+1); shorter videos get the largest 6k+1 that fits
    min_frames: int = 1  # shorter clips are skipped
    fps: int = 30  # Mochi's frame rate: videos are resampled to it
    clips_per_video: int = 1  # consecutive clips from one long video (0 = as many as fit)
    val_count: int = 0  # source files held out for the validation loss
    caption_dropout: float = 0.1  # probability that a sample trains with the empty prompt (Genmo's default 0.1)
    # LoRA (rank 0 = full fine-tune)
    lora_rank: int = 0  # LoRA rank; 0 = full fine-tune
    lora_alpha: float = 0.0  # LoRA alpha; 0 = the rank (scale 1)
    lora_targets: str = LORA_TARGETS  # the Linears (inside each block) that get an adapter
    lora_plus: float = 1.0  # LoRA+: lora_B learns at this multiple of --lr (the paper: 16; musubi's loraplus_lr_ratio)
    lora: str = ""  # --mode sample: a LoRA file to apply (ours, diffusion-pipe's, Genmo's fine-tuner's, .pt too)
    init_lora: str = ""  # train: the adapter starts from this LoRA file, with its rank, alpha and targets (as --lora)
    base_lora: str = ""  # merged into the frozen base first (train, sample): PATH[:MULT],...
    # optimisation
    global_batch: int = 8  # samples per optimizer step, over all ranks; accumulation = global / (micro * world / sp)
    micro_batch: int = 1  # samples per forward on one rank; 0 = global_batch / (world / sp) (no accumulation)
    lr: float = 2e-4  # peak learning rate (AdamW; Genmo's LoRA default)
    warmup_steps: int = 200  # linear warmup from 0
    lr_schedule: str = "constant"  # constant | cosine (after warmup, to 0 at max_steps)
    max_steps: int = 2000  # optimizer steps
    grad_clip: float = 1.0  # max gradient norm; 0 = no clipping
    weight_decay: float = 0.01  # AdamW weight decay
    ema: float = 0.0  # EMA decay of the trainable weights (e.g. 0.999); 0 = off. Samples use it; it is checkpointed
    ema_export: bool = False  # export the EMA weights (with --ema) instead of the last ones
    seed: int = 0  # one seed for init, data order, noise, sigmas and caption dropout
    timestep_sampling: str = "uniform"  # uniform (Genmo's fine-tuner) | logit_normal | shift (U(0,1) via --shift != 1)
    shift: float = 1.0  # applied to the sampled sigmas when != 1 (see sample_sigmas)
    # speed
    dtype: str = "auto"  # compute dtype of the blocks: auto (bf16 on GPU, fp32 on CPU) | bf16 | fp32
    ac: int = 0  # activation checkpointing per block: 1; 2: with its saved inputs in CPU memory (common/fsdp.py)
    ac_interval: int = 1  # with --ac: checkpoint every N-th block only (2: every other one): faster, more memory
    compile: bool = False  # torch.compile per block, in place
    sp: int = 1  # sequence parallelism (Ulysses, common/sp.py): N consecutive ranks share each sample, split its tokens
    shard: int = 0  # FSDP2 shards each weight over N ranks, replicated across world/N (HSDP; 1: as DDP); 0 = all ranks
    preflight: bool = True  # before step 1, one forward + backward of the largest bucket (common/preflight.py)
    # memory, for a LoRA on one GPU (common/float8.py, common/offload.py; README "Mochi on one GPU")
    base_dtype: str = "auto"  # frozen base of the blocks: auto (compute dtype) | float8 (e4m3 + row scales: half bf16)
    offload: bool = False  # blocks' frozen base in (pinned) CPU memory, copied to the device a block ahead (exact)
    # checkpoints, samples, validation, logging
    ckpt_every: int = 0  # write a checkpoint every N steps (0 = only when stopped by a signal)
    keep: int = 3  # keep the newest K checkpoints (0 = all)
    resume: bool = False  # continue the run in --out_dir from its newest valid checkpoint (none: start fresh)
    sample_every: int = 0  # write sample videos every N steps (0 = only at the end)
    sample_prompts: str = ""  # prompts separated by |, or a text file with one per line
    sample_negative: str = ""  # negative prompt for guidance ("" = the empty prompt: no text, as upstream)
    sample_steps: int = 64  # sampler steps (upstream's cli default)
    sample_guidance: float = 6.0  # classifier-free guidance scale (1 = none; upstream's cli default 6.0)
    sample_threshold: float = 0.025  # the linear-quadratic schedule's threshold noise (upstream: 0.025)
    sample_frames: int = 0  # frames of the samples; 0 = --frames
    sample_tiles: str = "auto"  # VAE decode in WxH spatial tiles (powers of 2, overlap 8): auto = upstream's 4x2 if big
    val_every: int = 0  # validation loss every N steps (needs --val_count)
    log_every: int = 10  # a log line (log.jsonl) every N steps
    tensorboard: bool = False  # also log to TensorBoard (<out_dir>/tb)
    wandb: str = ""  # also log to this W&B project
    # bench
    bench_steps: int = 5  # timed steps (after 2 warm-up steps)
    peak_tflops: float = 0.0  # the device's dense bf16 peak for MFU; 0 = known GPUs by name (H100: 989)


# The toy preset: a tiny DiT trained from scratch on data/toy.py's synthetic dataset, on CPU, in minutes, in pixel
# space (no VAE; 4x4-pixel patches) with the toy's fixed word embedding as the text encoder (--encoders toy).
TOY_PROMPTS = "|".join(DEMO_PROMPTS)  # data/toy.py: one per direction, the dataset's first clips
# --preset tiny is the tests' random config: its default clip is small too (flags still override), so that
# `--mode bench --preset tiny` takes seconds on a CPU, not the minutes of the released size's default shape
TINY_ARGS = dict(height=64, width=64, frames=7)

TOY_ARGS = dict(encoders="toy", data="toy_data", height=32, width=32, frames=5, fps=4, global_batch=16, micro_batch=0,
                lr=3e-3, warmup_steps=20, max_steps=600, weight_decay=0.0, timestep_sampling="logit_normal",
                log_every=50, caption_dropout=0.1, ema=0.99, ema_export=True, sample_prompts=TOY_PROMPTS,
                sample_negative="", sample_steps=30, sample_guidance=3.0, val_count=4, val_every=100)

# What a latent is per --encoders: the encoder's stride in (frames, height, width). Mochi's VAE maps 6k + 1 frames
# of H x W to k + 1 latent frames of H/8 x W/8; the toy's pixel space is the identity.
LATENT_STRIDE = {"official": (6, 8, 8), "toy": (1, 1, 1)}


def check_args(args):
    """Every mistake that the flags alone show, as one UserError line, before any work is done."""
    def need(ok, msg):
        if not ok:
            raise UserError(msg)
    choices = dict(mode=("train", "cache", "sample", "bench"), encoders=tuple(LATENT_STRIDE),
                   lr_schedule=("constant", "cosine"), dtype=("auto", "bf16", "fp32"), base_dtype=("auto", "float8"),
                   timestep_sampling=("uniform", "logit_normal", "shift"))
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
    # musubi-tuner's `shift` is sigmoid(N(0, 1)) through the shift; ours is U(0, 1) through it, so a recipe copied
    # without --shift would silently train on plain uniform sigmas
    need(not (args.timestep_sampling == "shift" and args.shift == 1), "--timestep_sampling shift with --shift 1 is "
         "plain uniform: give --shift N (musubi's `shift` is --timestep_sampling logit_normal --shift N here)")
    need(0 < args.sample_threshold < 1, "--sample_threshold must be in (0, 1)")
    tiles = args.sample_tiles.split("x")
    need(args.sample_tiles == "auto" or (len(tiles) == 2 and all(t.isdigit() and int(t) & (int(t) - 1) == 0
                                                                   and int(t) > 0 for t in tiles)),
         f"--sample_tiles {args.sample_tiles!r}: expected auto or WxH with powers of 2, e.g. 4x2")
    st, sh, sw = LATENT_STRIDE[args.encoders]
    cfg = DIT_PRESETS[args.preset]
    mh, mw = sh * cfg.patch_size, sw * cfg.patch_size
    need(args.height % mh == 0 and args.width % mw == 0 and args.height > 0 and args.width > 0,
         f"--height {args.height} --width {args.width}: both must be positive multiples of {mh} "
         f"(the encoder's stride {sh} times the patch size {cfg.patch_size})")
    for k in ("frames", "sample_frames"):
        n = getattr(args, k)
        need((n == 0 and k == "sample_frames") or (n >= 1 and (n - 1) % st == 0),
             f"--{k} {n}: must be 1 + {st}k (the VAE compresses {st} frames into one latent after the first)")
    need(not args.lora or args.mode == "sample", "--lora applies a LoRA file in --mode sample; to train one use "
         "--lora_rank")
    weights = args.dit_path or args.ckpt_dir
    need(not args.init_lora or args.mode == "train", "--init_lora starts a training run's adapter from a file; "
         "to sample with one use --lora")
    need(not args.base_lora or args.mode in ("train", "sample"), "--base_lora merges a LoRA into the base of a "
         "training or sampling run")
    for k in ("ckpt_dir", "dit_path", "lora", "init_lora"):
        need(not getattr(args, k) or os.path.exists(getattr(args, k)),
             f"--{k} {getattr(args, k)}: no such file or folder")
    if weights:  # the DiT is found, in a layout that loads (the headers only; main reads the config again)
        try:
            cfg = read_dit_config(weights)
        except FileNotFoundError as e:
            raise UserError(str(e)) from None
        except KeyError as e:  # not a Mochi DiT, or a diffusers file without its folder
            raise UserError(f"{weights}: {e.args[0]}") from None
    if args.lora and weights:  # read and fitted to the model now, not after the prompts are encoded
        lora_for(args.lora, cfg)
    need(weights or not (args.init_lora or args.base_lora), "--init_lora and --base_lora need base weights to "
         "adapt: --ckpt_dir or --dit_path")
    if args.init_lora:
        # the run's rank, alpha and targets are the file's, set here so that every later check sees a LoRA run
        lsd, r, a = lora_for(args.init_lora, cfg)
        lora_file.adopt(args, r, a, lora_file.targets_of(lsd), LORA_TARGETS)
    for _, path, _ in lora_file.parse_list(args.base_lora):
        need(os.path.isfile(path), f"--base_lora {path}: no such file")
        lora_for(path, cfg)
    if args.mode in ("train", "cache"):
        need(args.data, "--data is needed: a folder of videos/images with .txt captions, or a .jsonl / .csv")
    if args.mode in ("train", "cache", "sample") and args.encoders == "official":
        need(args.ckpt_dir, f"--mode {args.mode} needs --ckpt_dir: the genmo/mochi-1-preview folder, for its VAE "
             "and T5 (or --encoders toy)")
    if args.mode == "train":
        need(weights or args.preset in ("toy", "tiny"), f"--preset {args.preset} trains from the released weights: "
             "pass --ckpt_dir (random init is for the toy and tiny presets only)")
        need(not (args.lora_rank and not weights), "--lora_rank needs base weights to adapt: --ckpt_dir or --dit_path")
    need(args.lora_plus > 0 and (args.lora_plus == 1 or args.lora_rank), f"--lora_plus {args.lora_plus}: the "
         "multiple of --lr at which a LoRA's B matrices learn, > 0, for a LoRA run (--lora_rank or --init_lora)")
    memory.check_flags(args)  # --base_dtype float8 / --offload 1: where they do not apply
    if args.mode == "sample":
        need(weights, "--mode sample needs trained weights: --dit_path (e.g. runs/mochi-toy/model.safetensors) or "
             "--ckpt_dir")
        need(prompts_from(args.sample_prompts), "--mode sample needs --sample_prompts ('a|b', or a file)")


# -----------------------------------------------------------------------------------------------------
# The pieces main() puts together. Text in the cache and in memory is each prompt's REAL tokens only, (n, t5_dim)
# (n = 0 for the empty prompt); a batch pads them and builds the DiT's mask from the lengths.


def encoder_settings(args, cfg, device):
    """What identifies the encoding of a clip or caption, for the cache key (data/cache.py)."""
    if args.encoders == "toy":
        from data.toy import toy_encoders
        return dict(toy_encoders(cfg.t5_dim, cfg.text_len)[3], model="mochi-toy")
    return dict(model="mochi-1-preview", vae="encoder.safetensors (posterior mean, normalised)", text="t5-v1_1-xxl",
                text_len=256, ckpt=os.path.abspath(args.ckpt_dir), text_dtype="fp32")


def build_encoders(args, cfg, device, video=True, text=True, decoder=False):
    """-> (encode_video, decode_video, encode_text) as plain functions (None for the parts not asked for; the VAE's
    decoder only with decoder=True, its encoder only with video=True). Built only while caching and sampling, so
    that neither the VAE nor T5 is in memory while the DiT trains. encode_text(
    [prompt]) -> (1, n, t5_dim): the prompt's real tokens (EOS included; none for the empty prompt)."""
    if args.encoders == "toy":
        from data.toy import toy_encoders
        enc_v, dec_v, enc = toy_encoders(cfg.t5_dim, cfg.text_len)[:3]

        def enc_t(prompts):  # the toy's rows are zero past the end row: keep the real ones; "" has none at all,
            y = enc(prompts)  # as in Mochi's convention (and what caption dropout trains)
            return y[:, :0] if prompts == [""] else y[:, :int((y.abs().sum(-1) > 0).sum(1).max())]
        return enc_v, dec_v, enc_t
    enc_v = dec_v = enc_t = None
    if video or decoder:
        vae = load_vae(args.ckpt_dir, device=device, encoder=video, decoder=decoder)  # fp32
        enc_v = (lambda v: vae.encode(v.to(device)).cpu()) if video else None
        dec_v = (lambda z: vae.decode(z.float().to(device), *sample_tiles(args, z.shape))) if decoder else None
    if text:
        te = load_text_encoder(args.ckpt_dir, dtype=torch.float32, device=device)  # fp32, as upstream

        def enc_t(prompts):
            y, mask = te.encode(prompts)
            return y[:, :int(mask.sum(1).max())].cpu()
    return enc_v, dec_v, enc_t


def sample_tiles(args, shape):
    """(tiles, overlap) for decoding latents of `shape` (B, C, t, h, w): --sample_tiles WxH, or auto = upstream's
    single-GPU decode (4 x 2 tiles, overlap 8) where every tile is still wider than the overlap, else one tile."""
    if args.sample_tiles != "auto":
        w, h = (int(n) for n in args.sample_tiles.split("x"))
        return (w, h), 8
    return ((4, 2), 8) if shape[-1] >= 64 and shape[-2] >= 32 else ((1, 1), 0)


def text_batch(b, device):
    """A cached batch's text -> (y_feat (B, L, D) fp32, y_mask (B, L) bool), L the longest prompt of the batch."""
    y = b["text"].to(device, non_blocking=True).float()
    lens = b.get("text_lens", torch.full((y.shape[0],), y.shape[1]))
    return y, torch.arange(y.shape[1])[None] < lens[:, None].to(torch.long)


def read_dit_weights(args, cfg, rank, dtype):
    """The full state dict on rank 0 (None elsewhere): the checkpoint, read straight into `dtype` (keep_fp32's
    tensors stay fp32), or a fresh seeded init for the toy and tiny presets."""
    if rank != 0:
        return None
    path = args.dit_path or args.ckpt_dir
    if path:
        return read_dit_checkpoint(path, dtype)[1]
    with torch.random.fork_rng():
        torch.manual_seed(args.seed)
        m = AsymmDiT(cfg)
        m.init_weights()
    return m.state_dict()


def build_dit(args, cfg, sd, device, compute_dtype, lora_alpha=None, sp_group=None):
    """meta build -> LoRA -> FSDP2 (+AC, compile) -> storage on the device -> weights broadcast from rank 0.
    The q/k RMSNorms get their own fp32 FSDP units first, so that the blocks' bf16 mixed precision leaves their
    gains in fp32 (upstream keeps them fp32; pos_frequencies is in the root, which computes in fp32 anyway).
    sp_group: --sp's group of this rank (None: every rank holds its samples whole)."""
    rank = torch.distributed.get_rank()
    with torch.device("meta"):
        model = AsymmDiT(cfg)
    model.sp = sp_group
    norms = [getattr(blk.attn, n) for blk in model.blocks for n in ("q_norm_x", "k_norm_x", "q_norm_y", "k_norm_y")]
    if args.lora_rank:
        model.blocks.to(compute_dtype)  # the frozen base is stored in the compute dtype: half the memory in bf16
        for m in norms:
            m.float()
        add_lora(model, args.lora_rank, lora_alpha or args.lora_alpha or args.lora_rank, args.lora_targets)
        if rank == 0 and sd != "random" and not any(".lora_" in k for k in sd):
            sd.update(lora_init_state(model, args.seed))
    where = args.dit_path or args.ckpt_dir or "init"
    if rank == 0 and sd != "random":
        check_keys(model.state_dict().keys(), sd, where, hint=DIT_HINT)
        check_shapes(model.state_dict(), sd, where)
    model.text_multiple = 32 if args.compile else 1  # at most 9 text lengths per latent shape to compile for
    one_gpu = memory.wanted(args)  # --base_dtype float8 / --offload 1: the base is loaded and converted on the CPU
    if one_gpu:
        memory.prepare(model, [model.blocks], sd, device, compute_dtype, args)
    fp32 = MixedPrecisionPolicy(param_dtype=torch.float32, reduce_dtype=torch.float32, cast_forward_inputs=False)
    for m in norms:
        if next(m.parameters(), None) is not None:  # offloaded: a plain fp32 attribute, nothing for FSDP2
            fully_shard(m, mesh=fsdp_mesh(args.shard), mp_policy=fp32)
    parallelize(model, model.blocks, compute_dtype, ac=args.ac, compile=args.compile,
                ac_interval=args.ac_interval, shard=args.shard)
    if one_gpu:
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
    """(C, t, h, w) of the latents of a frames x height x width clip."""
    st, sh, sw = LATENT_STRIDE[args.encoders]
    return (cfg.in_channels, (frames - 1) // st + 1, args.height // sh, args.width // sw)


def training_draws(args, step, index, n, device):
    """sigma (n,) on `device` and caption-dropout flags (n,) bool on CPU for the samples index, index+1, ... of the
    global batch of `step`: a pure function of (seed, step, index), so 1 or N ranks and a resumed run agree."""
    sig, drop = [], []
    for j in range(n):
        g = noise.generator(args.seed, step, index + j)
        sig.append(sample_sigmas(1, args.timestep_sampling, args.shift, generator=g))
        drop.append(torch.rand(1, generator=g) < args.caption_dropout)
    return torch.cat(sig).to(device, non_blocking=True), torch.cat(drop)


def training_noise(args, step, index, shape, n, device):
    """(n, *shape) noise made on the training device, one seeded generator per sample."""
    return torch.stack([noise.randn(shape, args.seed, step, index + j, "noise", device=device) for j in range(n)])


def reduce_now(args, m, n):
    """Whether micro-batch m of n reduce-scatters its gradients: every one for a full fine-tune (no unsharded fp32
    gradient of every weight kept until the last), once per step for LoRA (small gradients, fewer collectives)."""
    return args.lora_rank == 0 or m == n - 1


def val_loss(model, val_idx, val, device):
    """Mean flow loss over the held-out clips at fixed sigmas with fixed noise (comparable across steps and runs).
    Collective."""
    sigmas = [0.1, 0.3, 0.5, 0.7, 0.9]
    total = torch.zeros(2, dtype=torch.float64, device=device)
    with torch.no_grad():
        for idx in val_idx:
            b = load_batch([val[i]["file"] for i in idx])
            x0 = b["latents"].to(device).float()
            y, mask = text_batch(b, device)
            for j, s in enumerate(sigmas):
                eps = torch.stack([noise.randn(x0.shape[1:], "val", val[i]["key"], j, device=device) for i in idx])
                loss = flow_loss(model, x0, y, mask.to(device), torch.full((len(idx),), s, device=device), eps)
                total += torch.stack([loss.double() * len(idx), torch.tensor(float(len(idx)), device=device).double()])
    torch.distributed.all_reduce(total)
    return (total[0] / total[1]).item()


def write_samples(model, args, cfg, text_ctx, negative, out_dir, step, device):
    """One video per --sample_prompts prompt, seeded by (seed, prompt index), through upstream's sampler (Euler on
    the linear-quadratic schedule, guidance against `negative`). Collective; rank 0 decodes (loading the decoder for
    the occasion) and writes samples/step_XXXXXXXX_i.mp4."""
    rank = torch.distributed.get_rank()
    decode = build_encoders(args, cfg, device, video=False, text=False, decoder=True)[1] if rank == 0 else None
    was_training = model.training
    model.eval()
    paths = []
    for i, p in enumerate(prompts_from(args.sample_prompts)):
        shape = latent_shape(cfg, args, args.sample_frames or args.frames)
        x = noise.randn(shape, args.seed, "sample", i)[None].to(device)  # CPU noise: the same on every device
        cond, uncond = ((text_ctx[t][None].to(device).float(), torch.ones(1, text_ctx[t].shape[0], dtype=torch.bool,
                                                                           device=device)) for t in (p, negative))
        z = sample_euler(model, x, cond, uncond, steps=args.sample_steps, guidance=args.sample_guidance,
                         threshold_noise=args.sample_threshold)
        if rank == 0:
            paths.append(os.path.join(out_dir, "samples", f"step_{step:08d}_{i}.mp4"))
            write_video(paths[-1], decode(z)[0].float().cpu(), args.fps)
    model.train(was_training)
    return paths


def bench(args, cfg, device, compute_dtype, world, micro, sp_group=None):
    """--mode bench: a few training steps on random latents of --height x --width x --frames and a random full-length
    prompt (256 real tokens: the worst case); prints step time, tokens/s, peak memory and MFU."""
    sd = read_dit_weights(args, cfg, torch.distributed.get_rank(), torch.float32 if not args.lora_rank else
                          compute_dtype) if (args.dit_path or args.ckpt_dir) else "random"
    torch.manual_seed(args.seed)  # the same weights and inputs every run: eager and --compile give comparable losses
    model = build_dit(args, cfg, sd, device, compute_dtype, sp_group=sp_group)
    reset_peak_memory(device)  # mem_gb: the steps' peak, not the load's
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=1e-5, fused=True)
    shape = (micro, *latent_shape(cfg, args, args.frames))
    x0 = torch.randn(shape, device=device)
    y = torch.randn(micro, cfg.text_len, cfg.t5_dim, device=device)
    mask = torch.ones(micro, cfg.text_len, dtype=torch.bool, device=device)
    T, H, W = shape[2:]
    tokens = micro * T * (H // cfg.patch_size) * (W // cfg.patch_size)
    flops = micro * 3 * count_flops(cfg, T, H, W) / args.sp  # --sp: this rank's share of the samples' work
    peak = device_peak_flops(device, args.peak_tflops)
    times = []
    for i in range(args.bench_steps + 2):  # the first two steps warm up (compile, allocator) and are not counted
        with StepTimer(device) as t:
            loss = flow_loss(model, x0, y, mask, torch.rand(micro, device=device), torch.randn_like(x0))
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
    out_dir = args.out_dir or os.path.join("runs", f"mochi-{args.preset}" + ("-sample" * (args.mode == "sample")))
    if args.mode == "train":
        run_folder.claim(out_dir, args.resume)
    rank, world, device = cdist.init()
    print0 = cdist.print0
    memory.check_world(args, world)  # --base_dtype float8 / --offload 1: one process
    weights = args.dit_path or args.ckpt_dir
    cfg = read_dit_config(weights) if weights else DIT_PRESETS[args.preset]
    # --sp N: each group of N consecutive ranks trains the same samples, each rank a share of their tokens
    # (common/sp.py). The data, the noise draws and the batch arithmetic count data-parallel ranks: dp_rank of dp_world.
    sp_group, dp_rank, dp_world, micro, accum = sp.data_parallel(args, rank, world, cfg.num_heads)
    compute_dtype = torch.float32 if args.dtype == "fp32" or (args.dtype == "auto" and device.type == "cpu") \
        else torch.bfloat16
    print0(f"mochi: {args.mode} preset={args.preset} world={world} device={device} compute={compute_dtype} "
           f"batch={args.global_batch} (micro {micro} x {dp_world} ranks x {accum} accumulation)"
           + (f", sequence parallel: {args.sp} ranks a sample" if args.sp > 1 else ""))
    if args.mode == "bench":
        bench(args, cfg, device, compute_dtype, world, micro, sp_group)
        return cdist.cleanup()

    # 1. Data -> cache. The VAE and T5 exist only inside this block, and only if something is not cached yet. The
    # texts: the sample prompts, the guidance's negative prompt, the empty prompt of caption dropout.
    prompts = prompts_from(args.sample_prompts)
    negative = args.sample_negative
    texts = list(dict.fromkeys(prompts + [negative] * bool(prompts) + [""] * (args.caption_dropout > 0)))
    settings = encoder_settings(args, cfg, device)
    key = hashlib.sha1(json.dumps([texts, settings]).encode()).hexdigest()[:16]
    text_file = os.path.join(args.cache_dir, f"texts-{key}.pt")
    records, entries, todo = [], [], 0
    if args.mode in ("train", "cache"):
        if args.encoders == "toy" and args.data == TOY_ARGS["data"]:
            make_toy_dataset(args.data)  # a no-op when it is already there
        st, sh, _ = LATENT_STRIDE[args.encoders]
        try:
            records = load_dataset(args.data, area=args.height * args.width, fps=args.fps, max_frames=args.frames,
                                   multiple=sh * cfg.patch_size, frame_step=st, min_frames=args.min_frames,
                                   clips_per_video=args.clips_per_video, log=print0, cache_dir=args.cache_dir)
        except (ValueError, FileNotFoundError) as e:  # no usable samples, no such folder: the user's to fix
            raise UserError(str(e)) from None
        entries, todo = cache_entries(records, args.cache_dir, settings, log=print0)
    need = torch.tensor(float(todo > 0 or (bool(texts) and not os.path.exists(text_file))))
    torch.distributed.all_reduce(need, op=torch.distributed.ReduceOp.MAX)  # every rank takes the same branch
    if need.item():
        encode_video, _, encode_text = build_encoders(args, cfg, device, video=todo > 0)
        if todo:
            entries = encode_dataset(records, encode_video, encode_text, args.cache_dir, settings, log=print0)
        if texts and rank == 0:
            os.makedirs(args.cache_dir, exist_ok=True)  # --mode sample may be the first run to use this cache
            torch.save({p: encode_text([p])[0].cpu() for p in texts}, text_file + ".tmp")
            os.replace(text_file + ".tmp", text_file)
        del encode_video, encode_text  # frees the VAE and T5 before the DiT is read
        torch.distributed.barrier()
    if args.mode == "cache":
        return cdist.cleanup()
    if args.mode == "train" and not entries:
        raise UserError(f"no sample of {args.data} could be encoded (see the skip lines above)")
    text_ctx = torch.load(text_file) if texts else {}

    # 2. The DiT: (LoRA), FSDP2, weights. A full fine-tune keeps fp32 master weights; a LoRA's frozen base is read
    # straight into the compute dtype (keep_fp32's tensors stay fp32).
    # --lora (sample) / --init_lora (train): the file's adapters, rank, alpha and targets
    value = args.lora if args.mode == "sample" else args.init_lora if args.mode == "train" else ""
    lora_alpha, lsd = None, None
    bases = [(f, m) for _, f, m in lora_file.parse_list(args.base_lora)]  # --base_lora: (file, multiplier)
    if value:
        lsd, args.lora_rank, lora_alpha = lora_for(value, cfg)
        args.lora_targets = lora_file.targets_of(lsd)
    sd = read_dit_weights(args, cfg, rank, torch.float32 if args.lora_rank == 0 else compute_dtype)
    if rank == 0:
        for file, mult in bases:  # --base_lora: W += mult (alpha / rank) B @ A, in fp32, then its dtype
            print0(f"--base_lora: {file} x {mult} merged into the DiT")
            blsd, brank, balpha = lora_for(file, cfg)
            lora_file.merge(sd, blsd, brank, balpha, mult=mult)
    if lsd is not None and rank == 0:
        sd.update(lsd)
        # a LoRA that skips some blocks: the adapters there start as a fresh one does (training) or as zeros (B = 0
        # and A = 0: a no-op in a sample)
        with torch.device("meta"):
            probe = add_lora(AsymmDiT(cfg), args.lora_rank, lora_alpha, args.lora_targets)
        fill = lora_init_state(probe, args.seed) if args.mode == "train" else \
            {k: torch.zeros(v.shape) for k, v in probe.state_dict().items() if ".lora_" in k}
        sd.update({k: v for k, v in fill.items() if k not in sd})
    model = build_dit(args, cfg, sd, device, compute_dtype, lora_alpha, sp_group)
    del sd
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
    if args.init_lora:  # only where set: a run folder of before still resumes
        fingerprint.update(init_lora=os.path.abspath(args.init_lora))
    if args.base_lora:
        fingerprint.update(base_lora=[[os.path.abspath(f), m] for f, m in bases])
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
            y, mask = text_batch(b, device)
            return flow_loss(model, x0, y, mask.to(device), sigma, eps)
        preflight.check(train, micro, lambda idx: load_batch([train[i]["file"] for i in idx], pin=pin), loss, model,
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
    bar = tqdm(total=args.max_steps, initial=start, disable=rank != 0, desc="train", dynamic_ncols=True)

    # 4. The training loop
    model.train()
    reset_peak_memory(device)  # the logged mem_gb: the steps' peak, not the caching's, the load's or preflight's
    step, saved, stopped = start, start, None
    while step < args.max_steps:
        t0 = time.perf_counter()
        micro_batches, state_after = next(it)
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
            y, mask = text_batch(b, device)
            first = (m * dp_world + dp_rank) * micro  # this micro-batch's first sample, as an index in the global batch
            sigma, drop = training_draws(args, step, first, len(x0), device)
            if args.caption_dropout:
                mask = mask & ~drop[:, None]  # the empty prompt: no text tokens at all (Genmo's fine-tuner zeroes
                #                               the mask and the features; features under a False mask never matter)
            eps = training_noise(args, step, first, x0.shape[1:], len(x0), device)
            model.set_requires_gradient_sync(reduce_now(args, m, len(micro_batches)))
            loss = flow_loss(model, x0, y, mask.to(device), sigma, eps)
            # --sp: each rank's gradients are the part through its own tokens and FSDP2 averages over all ranks, so
            # x sp makes the average the data-parallel mean of whole-sample gradients (common/sp.py)
            (loss * args.sp / accum).backward()
            loss_sum += loss.detach()
            T, H, W = x0.shape[2:]
            tokens += len(x0) * T * (H // cfg.patch_size) * (W // cfg.patch_size)
            flops += sum(3 * count_flops(cfg, T, H, W, int(n)) for n in mask.sum(1)) / args.sp  # this rank's share
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
            if peak:
                rec["mfu"] = flops / dt / peak
            rec["mem_gb"] = peak_memory_gb(device)
            bar.set_postfix(loss=f"{rec['loss']:.4f}")
            log.log(rec, echo=bar.write)
        if val_idx and args.val_every and step % args.val_every == 0:
            log.log(dict(step=step, val_loss=val_loss(model, val_idx, val, device)), echo=bar.write)
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
        name = "lora.safetensors" if args.lora_rank else "model.safetensors"
        export_weights(model, args, cfg, os.path.join(out_dir, name))
        print0(f"exported{' (EMA)' if ema and args.ema_export else ''} -> {os.path.join(out_dir, name)}")
        if ema and not args.ema_export:
            ema.swap()
        for path in write_samples(model, args, cfg, text_ctx, negative, out_dir, step, device) if prompts else []:
            print0(f"sample -> {path}")
    log.close()
    cdist.cleanup()


if __name__ == "__main__":
    cli(main)
