"""
Train LTX-Video 0.9.x text-to-video (2B / 13B) in one file: the DiT, the causal video VAE, the T5-v1.1-XXL text
encoder, LoRA, flow matching, loading of the official single-file checkpoints by their own key names, FSDP2, and a
flat main().

    python train_ltx.py --preset toy                                   # tiny model from scratch, CPU ok
    python train_ltx.py --preset 2B --ckpt_dir LTX-Video --data my_clips/ --lora_rank 32
    torchrun --nproc_per_node=8 train_ltx.py --preset 13B --ckpt_dir LTX-Video --data my_clips/ --lora_rank 128 --ac 1

(--ckpt_dir: the Lightricks/LTX-Video folder, with ltxv-*.safetensors, text_encoder/ and tokenizer/.)

Reading order: DiT config and presets -> DiT -> VAE -> text encoder -> loading -> LoRA -> flow matching and the
sampler -> flags -> the pieces main() uses -> main. The model-agnostic helpers live in common/ and data/, as for
train_wan.py. Module names equal the official checkpoint keys
(`transformer_blocks.3.attn1.to_q.weight` under `model.diffusion_model.`, `decoder.conv_in.conv.weight`
under `vae.`), so the released files load as they are. Upstream: Lightricks/LTX-Video
(ltx_video/models/transformers/{transformer3d,attention,embeddings}.py, ltx_video/models/autoencoders/
causal_video_autoencoder.py, ltx_video/pipelines/pipeline_ltx_video.py). Facts: ../shared/specs/ltx.md.
"""
import dataclasses
import glob
import hashlib
import json
import math
import os
import time
from dataclasses import dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F
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
from common.weights import check_keys, check_shapes, read_safetensors, safetensors_files, safetensors_header
from data.cache import cache_entries, encode_dataset, load_batch
from data.dataset import frames_available, load_dataset
from data.loader import batch_key, batches, split_val, val_batches, with_repeats
from data.toy import DEMO_PROMPTS, make_toy_dataset
from data.video import probe, read_clip, write_video

# -----------------------------------------------------------------------------------------------------
# Configs and presets. Field names are the keys of the "transformer" section of the official file's header JSON,
# so a header config fills this dataclass as it is (unknown keys are ignored).


@dataclass
class LTXConfig:
    num_layers: int = 28
    num_attention_heads: int = 32
    attention_head_dim: int = 64  # inner width D = heads * head_dim (2048 for 2B)
    cross_attention_dim: int = 2048  # = D: the text is projected to D before the cross-attention
    caption_channels: int = 4096  # T5-XXL width
    in_channels: int = 128  # VAE latent channels (patch size 1: one token per latent pixel)
    out_channels: int = 128
    positional_embedding_theta: float = 10000.0
    positional_embedding_max_pos: tuple = (20, 2048, 2048)  # (t in seconds, y, x in pixels) of the RoPE range
    # RoPE time of latent frame f: 8f (False) or max(8f - 7, 0) (True: frame 0 is one pixel frame, the causal VAE)
    causal_temporal_positioning: bool = False
    norm_eps: float = 1e-6  # norm1 / norm2 / the final norm (no weights)
    qk_norm_eps: float = 1e-5  # q_norm / k_norm (RMSNorm over the full width, with weights)

    @property
    def dim(self):
        return self.num_attention_heads * self.attention_head_dim


DIT_PRESETS = {
    # ltxv-2b-0.9.6-dev-04-25: 1,923,385,472 params. causal_temporal_positioning: the header's value wins; a
    # third-party port that read both headers reports False for 2B and True for 13B.
    "2B": LTXConfig(),
    # ltxv-13b-0.9.7-dev / 0.9.8-dev: 13,042,569,344 params
    "13B": LTXConfig(num_layers=48, attention_head_dim=128, cross_attention_dim=4096, causal_temporal_positioning=True),
    # tiny: the tests; D = 16 so that D % 6 = 4 exercises RoPE's front padding
    "tiny": LTXConfig(num_layers=2, num_attention_heads=2, attention_head_dim=8, cross_attention_dim=16,
                      caption_channels=12, in_channels=8, out_channels=8, causal_temporal_positioning=True),
    # toy: trained from scratch on the synthetic dataset (data/toy.py) on CPU; its "latents" are the RGB pixels
    # folded 4x4 into 48 channels (toy_encoders below), its text the toy's 64-wide word embedding
    "toy": LTXConfig(num_layers=4, num_attention_heads=4, attention_head_dim=32, cross_attention_dim=128,
                     caption_channels=64, in_channels=48, out_channels=48),
}

# the VAE's compression, which maps latent coordinates to the pixel coordinates RoPE is defined on
VAE_TEMPORAL, VAE_SPATIAL = 8, 32

# -----------------------------------------------------------------------------------------------------
# DiT (ltx_video/models/transformers/transformer3d.py + attention.py)


def timestep_features(t, dim=256):
    """t (T,) in [0, 1000] -> (T, dim) fp32 sinusoid, cos first (flip_sin_to_cos), frequencies 10000^(-j/(dim/2))
    in upstream's op order."""
    half = dim // 2
    freqs = torch.exp(-math.log(10000) * torch.arange(half, dtype=torch.float32, device=t.device) / half)
    arg = t.float()[:, None] * freqs[None]
    return torch.cat([torch.cos(arg), torch.sin(arg)], dim=-1)


def rope_grid(f, h, w, frame_rate, causal, device="cpu", frame_offset=0):
    """The RoPE coordinates of a latent (f, h, w) grid as the official pipeline builds them -> (3, f*h*w) fp32,
    tokens in (f, h, w) order: latent -> pixel coordinates (x8 in time, x32 in space); with the causal fix the time
    of latent frame k is max(8k + 1 - 8, 0) (frame 0 encodes pixel frame 0 alone: 0, 1, 9, 17, ...); + frame_offset
    (a keyframe's pixel frame: the pipeline's media_frame_number); then time in seconds (x 1/frame_rate, in that op
    order)."""
    grid = torch.stack(torch.meshgrid(torch.arange(f, device=device), torch.arange(h, device=device),
                                      torch.arange(w, device=device), indexing="ij")).flatten(1)  # (3, N) int64
    pix = grid * torch.tensor([VAE_TEMPORAL, VAE_SPATIAL, VAE_SPATIAL], device=device)[:, None]
    if causal:
        pix[0] = (pix[0] + 1 - VAE_TEMPORAL).clamp(min=0)
    pix[0] += frame_offset
    pix = pix.to(torch.float32)
    pix[0] = pix[0] * (1.0 / frame_rate)
    return pix


def rope_tables(grid, dim, theta, max_pos):
    """grid (3, N) or (B, 3, N) fp32 -> (cos, sin), each (..., N, dim) fp32. Per axis i and frequency k
    (k < dim // 6): angle = w_k * (2 * grid_i / max_pos_i - 1) with w_k = theta ** linspace(0, 1, dim // 6) * pi / 2,
    laid out (k, i) -> 3k + i, each angle used for one adjacent pair (repeat_interleave 2), and the dim % 6 leftover
    channels at the FRONT get angle 0 (cos 1, sin 0). Upstream's exact fp32 order: the largest angles are ~15,708 rad,
    where one fp32 step is 1e-3 rad, so any other order (or float64) moves the outputs by ~5e-4."""
    frac = torch.stack([grid[..., i, :] / max_pos[i] for i in range(3)], dim=-1)  # (..., N, 3)
    w = theta ** torch.linspace(math.log(1.0, theta), math.log(theta, theta), dim // 6, dtype=torch.float32,
                                device=grid.device)
    w = w * math.pi / 2.0
    ang = (w * (frac.unsqueeze(-1) * 2 - 1)).transpose(-1, -2).flatten(-2)  # (..., N, 3 * (dim // 6)), index 3k + i
    cos, sin = ang.cos().repeat_interleave(2, dim=-1), ang.sin().repeat_interleave(2, dim=-1)
    pad = dim % 6
    if pad:
        cos = torch.cat([torch.ones_like(cos[..., :pad]), cos], dim=-1)
        sin = torch.cat([torch.zeros_like(sin[..., :pad]), sin], dim=-1)
    return cos, sin


def rope_apply(x, cos, sin):
    """x (B, N, D) over the FULL width (before the head split); pairs (x[2j], x[2j+1]) rotated: x*cos + rot(x)*sin
    with rot(x) = (-x[2j+1], x[2j]). In fp32, returned in x's dtype."""
    x0, x1 = x.float().unflatten(-1, (-1, 2)).unbind(-1)
    rot = torch.stack([-x1, x0], dim=-1).flatten(-2)
    return (x.float() * cos + rot * sin).type_as(x)


class RMSNorm(nn.Module):
    """q_norm / k_norm: RMSNorm over the whole width (all heads together); statistics in fp32, cast back, x weight."""

    def __init__(self, dim, eps):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x):
        return F.rms_norm(x.float(), (x.shape[-1],), eps=self.eps).type_as(x) * self.weight


class Attention(nn.Module):
    """attn1 (self, RoPE) and attn2 (cross to the projected text, additive mask bias): the same layers."""

    def __init__(self, dim, heads, qk_eps):
        super().__init__()
        self.heads = heads
        self.to_q, self.to_k, self.to_v = nn.Linear(dim, dim), nn.Linear(dim, dim), nn.Linear(dim, dim)
        self.q_norm, self.k_norm = RMSNorm(dim, qk_eps), RMSNorm(dim, qk_eps)
        self.to_out = nn.ModuleList([nn.Linear(dim, dim)])  # upstream's to_out.1 is a Dropout(0): no key
        # sampling only: set by sample_euler on the skip blocks of STG (a plain attribute, not a forward argument,
        # so the training forward stays the same; upstream threads a skip_layer_mask through every block instead)
        self.stg_skip = 0

    def forward(self, x, context=None, rope=None, bias=None):
        # x (B, N, D) compute dtype; context (B, L, D) or None (self-attention); rope = (cos, sin) (.., N, D) fp32;
        # bias (B, 1, 1, L) additive (0 or -10000) for the text padding. Under --sp, rope = (cos, sin, group,
        # N_all): x and the tables hold this rank's tokens and the self-attention goes over the group's
        # (common/sp.py); the cross-attention (rope None) needs nothing: local queries, the whole text as keys
        B, N, D = x.shape
        ctx = x if context is None else context
        q, k, v = self.q_norm(self.to_q(x)), self.k_norm(self.to_k(ctx)), self.to_v(ctx)
        group = ()
        if rope is not None:
            cos, sin, *group = rope
            q, k = rope_apply(q, cos, sin), rope_apply(k, cos, sin)
        vv = v
        if group:  # (B, N/sp, heads, hd) by tokens in and out; the all-to-alls swap tokens for heads in between
            y = sp.attention(*(t.unflatten(-1, (self.heads, -1)) for t in (q, k, v)), *group).reshape(B, N, D)
        else:
            q, k, v = (t.unflatten(-1, (self.heads, -1)).transpose(1, 2) for t in (q, k, v))  # (B, heads, *, hd)
            y = F.scaled_dot_product_attention(q, k, v, attn_mask=None if bias is None else bias.to(q.dtype))
            y = y.transpose(1, 2).reshape(B, N, D)
        if self.stg_skip:  # spatio-temporal guidance ("attention_values"): the last stg_skip samples of the batch
            y = torch.cat([y[: B - self.stg_skip], vv[B - self.stg_skip:]])  # get v itself, not the attention
        return self.to_out[0](y)


class FeedForward(nn.Module):
    """net.0.proj -> tanh GELU -> net.2 (keys ff.net.0.proj.*, ff.net.2.*; net.1 is upstream's Dropout)."""

    def __init__(self, dim, inner):
        super().__init__()
        proj = nn.Module()
        proj.proj = nn.Linear(dim, inner)
        self.net = nn.ModuleList([proj, nn.Identity(), nn.Linear(inner, dim)])

    def forward(self, x):
        return self.net[2](F.gelu(self.net[0].proj(x), approximate="tanh"))


class BasicTransformerBlock(nn.Module):
    def __init__(self, cfg: LTXConfig):
        super().__init__()
        D = cfg.dim
        self.eps = cfg.norm_eps
        self.attn1 = Attention(D, cfg.num_attention_heads, cfg.qk_norm_eps)
        self.attn2 = Attention(D, cfg.num_attention_heads, cfg.qk_norm_eps)
        self.ff = FeedForward(D, 4 * D)
        self.scale_shift_table = nn.Parameter(torch.randn(6, D) / D**0.5)

    def forward(self, x, tmod, context, bias, rope):
        # x (B, N, D) fp32 residual stream; tmod (B, T', 6, D) fp32 with T' = 1 (per-sample t) or N (per-token t);
        # context (B, L, D) projected text; norm1/norm2 are RMSNorms without weights (fp32)
        # compute dtype: bf16 under FSDP mixed precision, fp32 in tests; read off the bias, as under --base_dtype
        # float8 reading .weight upcasts the whole weight (common/float8.py)
        dt = self.ff.net[2].bias.dtype
        shift_msa, scale_msa, gate_msa, shift_mlp, scale_mlp, gate_mlp = \
            (self.scale_shift_table.float()[None, None] + tmod).unbind(2)  # each (B, T', D)
        h = F.rms_norm(x, (x.shape[-1],), eps=self.eps) * (1 + scale_msa) + shift_msa
        x = x + self.attn1(h.to(dt), rope=rope).float() * gate_msa
        # cross-attention: the query is the raw residual stream (no norm, no modulation) and there is no gate
        x = x + self.attn2(x.to(dt), context=context.to(dt), bias=bias).float()
        h = F.rms_norm(x, (x.shape[-1],), eps=self.eps) * (1 + scale_mlp) + shift_mlp
        return x + self.ff(h.to(dt)).float() * gate_mlp


class TimestepEmbedder(nn.Module):
    def __init__(self, dim_in, dim):
        super().__init__()
        self.linear_1, self.linear_2 = nn.Linear(dim_in, dim), nn.Linear(dim, dim)

    def forward(self, x):
        return self.linear_2(F.silu(self.linear_1(x)))


class AdaLayerNormSingle(nn.Module):
    """adaLN-single (PixArt-alpha): one timestep MLP for the whole model -> 6 modulation vectors per token, which each
    block offsets by its own scale_shift_table. Keys adaln_single.emb.timestep_embedder.linear_{1,2}, .linear."""

    def __init__(self, dim):
        super().__init__()
        self.emb = nn.Module()
        self.emb.timestep_embedder = TimestepEmbedder(256, dim)
        self.linear = nn.Linear(dim, 6 * dim)

    def forward(self, t):  # t (T,) = 1000 sigma -> ((T, 6D), (T, D)) fp32
        e = self.emb.timestep_embedder(timestep_features(t)).float()
        return self.linear(F.silu(e)).float(), e


class CaptionProjection(nn.Module):
    def __init__(self, dim_in, dim):
        super().__init__()
        self.linear_1, self.linear_2 = nn.Linear(dim_in, dim), nn.Linear(dim, dim)

    def forward(self, x):
        return self.linear_2(F.gelu(self.linear_1(x), approximate="tanh"))


def keyframe_list(keyframe):
    """A keyframe argument as a list: None -> [], one (z, p[, t or s]) -> [it], a list as it is."""
    return [] if keyframe is None else keyframe if isinstance(keyframe, list) else [keyframe]


class Transformer3DModel(nn.Module):
    """LTX-Video DiT. forward(x (B,C,F,H,W) latents, t (B,) or per-token (B, F*H*W) timesteps = 1000 sigma,
    context (B,L,caption_channels) T5 states, context_mask (B,L) 0/1, frame_rate) -> velocity (B,C,F,H,W) fp32."""

    def __init__(self, cfg: LTXConfig):
        super().__init__()
        self.cfg = cfg
        D = cfg.dim
        self.patchify_proj = nn.Linear(cfg.in_channels, D)
        self.adaln_single = AdaLayerNormSingle(D)
        self.caption_projection = CaptionProjection(cfg.caption_channels, D)
        self.transformer_blocks = nn.ModuleList(BasicTransformerBlock(cfg) for _ in range(cfg.num_layers))
        self.scale_shift_table = nn.Parameter(torch.randn(2, D) / D**0.5)
        self.proj_out = nn.Linear(D, cfg.out_channels)
        self.rope_cache = {}  # (f, h, w, fps, device) -> (cos, sin): a plain dict, not a checkpoint key
        self.sp = None  # --sp N > 1: this rank's sequence-parallel group (common/sp.py), set by build_dit

    def rope(self, f, h, w, frame_rate, device, frame_offset=0):
        """(cos, sin), each (1 or B, N, D) fp32, for a latent grid; frame_rate a number or one per sample."""
        rates = [float(r) for r in (frame_rate.tolist() if torch.is_tensor(frame_rate) else
                                    frame_rate if isinstance(frame_rate, (list, tuple)) else [frame_rate])]
        if len(set(rates)) == 1:  # one clip rate for the whole batch (the usual case): one table, broadcast
            rates = rates[:1]
        out = []
        for r in rates:
            key = (f, h, w, r, str(device), frame_offset)
            if key not in self.rope_cache:
                c = self.cfg
                grid = rope_grid(f, h, w, r, c.causal_temporal_positioning, device, frame_offset)
                self.rope_cache[key] = rope_tables(grid, c.dim, c.positional_embedding_theta,
                                                   c.positional_embedding_max_pos)
            out.append(self.rope_cache[key])
        if len(out) == 1:
            return out[0][0][None], out[0][1][None]
        return torch.stack([c for c, _ in out]), torch.stack([s for _, s in out])

    def forward(self, x, t, context, context_mask=None, frame_rate=25.0, keyframe=None, return_keyframe=False):
        """x (B, C, f, h, w) latents; t (B,) or per token (B, f*h*w) in [0, 1000]; context (B, L, caption_channels),
        context_mask (B, L) 1/0; frame_rate (the RoPE time axis) a number or (B,). keyframe = (z, p), a list of
        them, or None: z (B, C, k, h, w) a clip encoded ON ITS OWN (k = 1: one image) that sits at pixel frame p of
        the video, as the 0.9.5+ pipeline conditions on a keyframe away from frame 0 (prepare_conditioning): its
        tokens go in front of the video's (several: in list order), with the RoPE time of their own grid + p and
        timestep 0 (strength 1; (z, p, t): timestep t, a conditioning strength below 1), every token attends to every
        token, and they are dropped from the output
        (return_keyframe: also returned, (B, M, C_out) in token order, for the sampler's guidance statistics).
        -> (B, C_out, f, h, w) velocity."""
        cfg = self.cfg
        B, C, f, h, w = x.shape
        wdt = self.patchify_proj.weight.dtype
        x = self.patchify_proj(x.flatten(2).transpose(1, 2).to(wdt)).float()  # (B, N, D), tokens in (f, h, w) order
        rope = self.rope(f, h, w, frame_rate, x.device)
        keys = keyframe_list(keyframe)
        M = 0  # keyframe tokens in front
        if keys:
            ks = [self.patchify_proj(e[0].flatten(2).transpose(1, 2).to(wdt)).float() for e in keys]  # (B, M_i, D)
            M = sum(k.shape[1] for k in ks)
            kropes = [self.rope(*e[0].shape[2:], frame_rate, x.device, frame_offset=e[1]) for e in keys]
            x = torch.cat([*ks, x], dim=1)
            rope = tuple(torch.cat([*parts], dim=1) for parts in zip(*kropes, rope))  # one frame_rate: one batch dim
            t = t.float().reshape(B, -1).expand(B, f * h * w)  # (B,) or (B, N) -> per token; the keyframes': 0, or
            t = torch.cat([*(t.new_full((B, k.shape[1]), float(e[2]) if len(e) > 2 else 0.0)  # their own (z, p, t)
                             for k, e in zip(ks, keys)), t], dim=1)
        N = x.shape[1]
        if self.sp is not None:  # --sp N: from here to proj_out each rank holds ceil(N/sp) of the tokens
            x = sp.shard(x, self.sp)
            rope = (*(sp.shard(r, self.sp, dim=1) for r in rope), self.sp, N)  # tables (1 or B, N, D): by token
            if t.numel() > B:  # per-token t (B, N) (first-frame conditioning: 0 on frame 0): this rank's tokens'
                t = sp.shard(t.reshape(B, N), self.sp)
        # time: t (B,) -> one modulation per sample, (B, N) -> one per token
        tmod, e = self.adaln_single(t.reshape(-1).float())
        tmod, e = tmod.view(B, -1, 6, cfg.dim), e.view(B, -1, cfg.dim)  # (B, T', 6, D), (B, T', D); --sp: T' local
        # text: projected to D; padding keys get -10000 added to their logits (upstream's constant)
        context = self.caption_projection(context.to(wdt))
        bias = None
        if context_mask is not None:
            bias = ((1 - context_mask.float()) * -10000.0)[:, None, None, :]  # (B, 1, 1, L)
        for block in self.transformer_blocks:
            x = block(x, tmod, context, bias, rope)
        shift, scale = (self.scale_shift_table.float()[None, None] + e[:, :, None]).unbind(2)  # (B, T', D)
        x = F.layer_norm(x, (cfg.dim,), eps=1e-6) * (1 + scale) + shift
        x = self.proj_out(x.to(self.proj_out.weight.dtype)).float()  # (B, N, C)
        if self.sp is not None:
            x = sp.gather(x, self.sp, N)  # every rank of the group gets the whole output (the loss is computed whole)
        out = x[:, M:].transpose(1, 2).reshape(B, cfg.out_channels, f, h, w).contiguous()  # not a view (FSDP2)
        if return_keyframe:  # the keyframe's tokens: conditioning only, but the pipeline's guidance counts them
            return out, x[:, :M]
        return out

    @torch.no_grad()
    def init_weights(self):
        """A from-scratch init (toy/tiny runs only; real runs load the released weights): xavier Linears, zero biases,
        unit q/k norms, a zero output layer."""
        for m in self.modules():
            if isinstance(m, nn.Linear):
                nn.init.xavier_uniform_(m.weight)
                nn.init.zeros_(m.bias)
            elif isinstance(m, RMSNorm):
                nn.init.ones_(m.weight)
        D = self.cfg.dim
        for blk in self.transformer_blocks:
            blk.scale_shift_table.copy_(torch.randn(6, D) / D**0.5)
        self.scale_shift_table.copy_(torch.randn(2, D) / D**0.5)
        nn.init.normal_(self.adaln_single.emb.timestep_embedder.linear_1.weight, std=0.02)
        nn.init.normal_(self.adaln_single.emb.timestep_embedder.linear_2.weight, std=0.02)
        nn.init.zeros_(self.proj_out.weight)


# -----------------------------------------------------------------------------------------------------
# VAE: the 0.9.5+ causal video VAE (ltx_video/models/autoencoders/causal_video_autoencoder.py), inference only.
#
# video (B, 3, 1 + 8k, 32m, 32n) in [-1, 1] <-> latents (B, 128, 1 + k, m, n). The whole clip goes through at once
# (no chunking): every temporal conv pads at the front with copies of the first frame (causal) in the encoder, and
# with one copy of the first and one of the last frame in the decoder (causal_decoder False). Every norm is a
# parameter-free PixelNorm. The layout is read from the header's "vae" config, a list of (block kind, params):
#   encoder: res_x (a group of residual blocks), compress_{space,time,all}_res (space-to-depth, x multiplier channels)
#   decoder: res_x (timestep-conditioned), compress_all (depth-to-space, residual, / multiplier channels)
# Module indices equal the list positions, so the keys are upstream's (`decoder.up_blocks.3.conv.conv.weight`).

VAE_095_ENCODER = [["res_x", {"num_layers": 4}], ["compress_space_res", {"multiplier": 2}],
                   ["res_x", {"num_layers": 6}], ["compress_time_res", {"multiplier": 2}],
                   ["res_x", {"num_layers": 6}], ["compress_all_res", {"multiplier": 2}],
                   ["res_x", {"num_layers": 2}], ["compress_all_res", {"multiplier": 2}], ["res_x", {"num_layers": 2}]]
VAE_095_DECODER = [["res_x", {"num_layers": 5, "inject_noise": False}],
                   ["compress_all", {"residual": True, "multiplier": 2}],
                   ["res_x", {"num_layers": 5, "inject_noise": False}],
                   ["compress_all", {"residual": True, "multiplier": 2}],
                   ["res_x", {"num_layers": 5, "inject_noise": False}],
                   ["compress_all", {"residual": True, "multiplier": 2}],
                   ["res_x", {"num_layers": 5, "inject_noise": False}]]


@dataclass
class VAEConfig:
    # field names are the header's "vae" keys
    encoder_blocks: list = dataclasses.field(default_factory=lambda: json.loads(json.dumps(VAE_095_ENCODER)))
    decoder_blocks: list = dataclasses.field(default_factory=lambda: json.loads(json.dumps(VAE_095_DECODER)))
    latent_channels: int = 128
    patch_size: int = 4  # pixels -> channels before the first conv (4x4 -> 48 channels)
    encoder_base_channels: int = 128
    decoder_base_channels: int = 128
    spatial_padding_mode: str = "zeros"  # the H/W padding of every conv (upstream's default; see README)
    causal_decoder: bool = False
    timestep_conditioning: bool = True  # 0.9.5+: the decoder is conditioned on a (small) denoising timestep
    in_channels: int = 3
    out_channels: int = 3


STRIDES = {"compress_space_res": (1, 2, 2), "compress_time_res": (2, 1, 1), "compress_all_res": (2, 2, 2),
           "compress_space": (1, 2, 2), "compress_time": (2, 1, 1), "compress_all": (2, 2, 2)}


def _params(p):
    return p if isinstance(p, dict) else {"num_layers": p}


def pixel_norm(x, eps=1e-8):  # over channels, no weights
    return x / torch.sqrt(torch.mean(x**2, dim=1, keepdim=True) + eps)


def space_to_depth(x, s):  # (B, C, F*s0, H*s1, W*s2) -> (B, C*s0*s1*s2, F, H, W), sub-positions fastest
    B, C, Fr, H, W = x.shape
    x = x.view(B, C, Fr // s[0], s[0], H // s[1], s[1], W // s[2], s[2])
    return x.permute(0, 1, 3, 5, 7, 2, 4, 6).reshape(B, C * math.prod(s), Fr // s[0], H // s[1], W // s[2])


def depth_to_space(x, s):  # the inverse of space_to_depth
    B, C, Fr, H, W = x.shape
    c = C // math.prod(s)
    x = x.view(B, c, s[0], s[1], s[2], Fr, H, W).permute(0, 1, 5, 2, 6, 3, 7, 4)
    return x.reshape(B, c, Fr * s[0], H * s[1], W * s[2])


def patchify(x, p):  # (B, C, F, H, W) -> (B, C*p*p, F, H/p, W/p); channel = c*p*p + w_sub*p + h_sub (w is the slower)
    B, C, Fr, H, W = x.shape
    x = x.view(B, C, Fr, H // p, p, W // p, p).permute(0, 1, 6, 4, 2, 3, 5)
    return x.reshape(B, C * p * p, Fr, H // p, W // p)


def unpatchify(x, p):
    B, C, Fr, H, W = x.shape
    x = x.view(B, C // (p * p), p, p, Fr, H, W).permute(0, 1, 4, 5, 3, 6, 2)
    return x.reshape(B, C // (p * p), Fr, H * p, W * p)


class CausalConv3d(nn.Module):
    """3x3x3 conv; time padded with copies of the first frame (causal: 2 in front) or of the first and last
    (1 + 1); height/width padded by the conv itself with spatial_padding_mode. Key: <name>.conv.weight."""

    def __init__(self, c_in, c_out, padding_mode="zeros"):
        super().__init__()
        self.conv = nn.Conv3d(c_in, c_out, 3, padding=(0, 1, 1), padding_mode=padding_mode)

    def forward(self, x, causal=True):
        if causal:
            x = torch.cat([x[:, :, :1].expand(-1, -1, 2, -1, -1), x], dim=2)
        else:
            x = torch.cat([x[:, :, :1], x, x[:, :, -1:]], dim=2)
        return self.conv(x)


class ResnetBlock3D(nn.Module):
    def __init__(self, C, timestep_conditioning, padding_mode):
        super().__init__()
        self.conv1 = CausalConv3d(C, C, padding_mode)
        self.conv2 = CausalConv3d(C, C, padding_mode)
        if timestep_conditioning:
            self.scale_shift_table = nn.Parameter(torch.randn(4, C) / C**0.5)

    def forward(self, x, causal, temb=None):
        # temb (B, 4, C, 1, 1, 1): the group's time embedding; + this block's table -> shift1, scale1, shift2, scale2
        h = pixel_norm(x)
        if temb is not None:
            shift1, scale1, shift2, scale2 = (self.scale_shift_table[None, ..., None, None, None] + temb).unbind(1)
            h = h * (1 + scale1) + shift1
        h = self.conv1(F.silu(h), causal)
        h = pixel_norm(h)
        if temb is not None:
            h = h * (1 + scale2) + shift2
        return x + self.conv2(F.silu(h), causal)


class UNetMidBlock3D(nn.Module):
    """res_x: num_layers residual blocks at constant width; in the decoder, one time embedding for the group."""

    def __init__(self, C, num_layers, timestep_conditioning, padding_mode):
        super().__init__()
        if timestep_conditioning:
            self.time_embedder = nn.Module()
            self.time_embedder.timestep_embedder = TimestepEmbedder(256, 4 * C)
        self.res_blocks = nn.ModuleList(ResnetBlock3D(C, timestep_conditioning, padding_mode)
                                        for _ in range(num_layers))

    def forward(self, x, causal=True, t=None):
        temb = None
        if t is not None:  # t (B,) already times timestep_scale_multiplier
            temb = self.time_embedder.timestep_embedder(timestep_features(t).to(x.dtype))
            temb = temb.view(x.shape[0], 4, -1, 1, 1, 1)
        for blk in self.res_blocks:
            x = blk(x, causal, temb)
        return x


class SpaceToDepthDownsample(nn.Module):
    """x -> conv(x) (C_in -> C_out / prod(s)) rearranged space-to-depth, plus the input itself rearranged and
    averaged over groups of consecutive channels (a parameter-free skip). A time stride first repeats frame 0, so
    1 + 2k frames become 1 + k."""

    def __init__(self, c_in, c_out, stride, padding_mode):
        super().__init__()
        self.stride = stride
        self.group = c_in * math.prod(stride) // c_out
        self.conv = CausalConv3d(c_in, c_out // math.prod(stride), padding_mode)

    def forward(self, x, causal=True):
        if self.stride[0] == 2:
            x = torch.cat([x[:, :, :1], x], dim=2)
        skip = space_to_depth(x, self.stride)
        skip = skip.view(skip.shape[0], -1, self.group, *skip.shape[2:]).mean(2)
        return space_to_depth(self.conv(x, causal), self.stride) + skip


class DepthToSpaceUpsample(nn.Module):
    """conv (C -> prod(s) * C / r) then depth-to-space; with residual, the input depth-to-spaced and repeated to the
    same width is added. A time stride drops the first output frame (1 + k -> 1 + 2k)."""

    def __init__(self, C, stride, residual, reduction, padding_mode):
        super().__init__()
        self.stride, self.residual, self.reduction = stride, residual, reduction
        self.conv = CausalConv3d(C, math.prod(stride) * C // reduction, padding_mode)

    def forward(self, x, causal=True):
        drop = 1 if self.stride[0] == 2 else 0
        y = depth_to_space(self.conv(x, causal), self.stride)[:, :, drop:]
        if self.residual:
            n = math.prod(self.stride) // self.reduction
            y = y + depth_to_space(x, self.stride).repeat(1, n, 1, 1, 1)[:, :, drop:]
        return y


class Encoder(nn.Module):
    def __init__(self, cfg: VAEConfig):
        super().__init__()
        self.cfg = cfg
        pm = cfg.spatial_padding_mode
        C = cfg.encoder_base_channels
        self.conv_in = CausalConv3d(cfg.in_channels * cfg.patch_size**2, C, pm)
        blocks = []
        for kind, p in cfg.encoder_blocks:
            p = _params(p)
            if kind == "res_x":
                blocks.append(UNetMidBlock3D(C, p["num_layers"], False, pm))
            elif kind in ("compress_space_res", "compress_time_res", "compress_all_res"):
                blocks.append(SpaceToDepthDownsample(C, C * p.get("multiplier", 2), STRIDES[kind], pm))
                C *= p.get("multiplier", 2)
            else:
                raise ValueError(f"VAE encoder block {kind!r}: train_ltx.py implements the 0.9.5+ VAE "
                                 "(res_x, compress_{space,time,all}_res)")
        self.down_blocks = nn.ModuleList(blocks)
        # "uniform" log-variance: latent_channels means + 1 log-variance channel shared by all of them
        self.conv_out = CausalConv3d(C, cfg.latent_channels + 1, pm)

    def forward(self, x):  # (B, 3, F, H, W) -> posterior mean (B, latent_channels, f, h, w)
        x = self.conv_in(patchify(x, self.cfg.patch_size))
        for blk in self.down_blocks:
            x = blk(x)
        return self.conv_out(F.silu(pixel_norm(x)))[:, : self.cfg.latent_channels]


class Decoder(nn.Module):
    def __init__(self, cfg: VAEConfig):
        super().__init__()
        self.cfg = cfg
        pm = cfg.spatial_padding_mode
        C = cfg.decoder_base_channels
        for kind, p in cfg.decoder_blocks:  # the widest width: base times every multiplier
            if kind.startswith("compress"):
                C *= _params(p).get("multiplier", 1)
        self.conv_in = CausalConv3d(cfg.latent_channels, C, pm)
        blocks = []
        for kind, p in reversed(cfg.decoder_blocks):
            p = _params(p)
            if kind == "res_x":
                if p.get("inject_noise"):
                    raise ValueError("VAE decoder with inject_noise: that is the 0.9.1 VAE; train_ltx.py loads 0.9.5+")
                blocks.append(UNetMidBlock3D(C, p["num_layers"], cfg.timestep_conditioning, pm))
            elif kind in ("compress_all", "compress_space", "compress_time"):
                # upstream: only compress_all takes residual / multiplier; the other two are plain
                r = p.get("multiplier", 1) if kind == "compress_all" else 1
                res = p.get("residual", False) and kind == "compress_all"
                blocks.append(DepthToSpaceUpsample(C, STRIDES[kind], res, r, pm))
                C //= r
            else:
                raise ValueError(f"VAE decoder block {kind!r}: train_ltx.py implements the 0.9.5+ VAE")
        self.up_blocks = nn.ModuleList(blocks)
        self.conv_out = CausalConv3d(C, cfg.out_channels * cfg.patch_size**2, pm)
        if cfg.timestep_conditioning:
            self.timestep_scale_multiplier = nn.Parameter(torch.tensor(1000.0))  # learned; the file's value is used
            self.last_time_embedder = nn.Module()
            self.last_time_embedder.timestep_embedder = TimestepEmbedder(256, 2 * C)
            self.last_scale_shift_table = nn.Parameter(torch.randn(2, C) / C**0.5)

    def forward(self, z, timestep=None):  # (B, latent_channels, f, h, w), timestep (B,) -> (B, 3, F, H, W)
        causal = self.cfg.causal_decoder
        x = self.conv_in(z, causal)
        t = None
        if self.cfg.timestep_conditioning:
            t = timestep * self.timestep_scale_multiplier  # (B,)
        for blk in self.up_blocks:
            x = blk(x, causal, t) if isinstance(blk, UNetMidBlock3D) else blk(x, causal)
        x = pixel_norm(x)
        if t is not None:
            e = self.last_time_embedder.timestep_embedder(timestep_features(t).to(x.dtype))  # (B, 2C)
            shift, scale = (self.last_scale_shift_table[None, ..., None, None, None]
                            + e.view(x.shape[0], 2, -1, 1, 1, 1)).unbind(1)
            x = x * (1 + scale) + shift
        return unpatchify(self.conv_out(F.silu(x), causal), self.cfg.patch_size)


class CausalVideoAutoencoder(nn.Module):
    """encode(video) -> normalised latents (the posterior mean); decode(latents, timestep) -> video."""

    def __init__(self, cfg=None):
        super().__init__()
        self.cfg = cfg = cfg or VAEConfig()
        self.encoder = Encoder(cfg)
        self.decoder = Decoder(cfg)
        # the per-channel statistics of the latents over the training data: the DiT sees (mu - mean) / std.
        # Checkpoint keys per_channel_statistics.mean-of-means / .std-of-means (buffers; other statistics in the
        # file, e.g. mean-of-stds, are not used and are ignored on load)
        self.per_channel_statistics = nn.Module()
        self.per_channel_statistics.register_buffer("mean-of-means", torch.zeros(cfg.latent_channels))
        self.per_channel_statistics.register_buffer("std-of-means", torch.ones(cfg.latent_channels))

    def _stats(self):
        s = self.per_channel_statistics
        return (getattr(s, "mean-of-means").float().view(1, -1, 1, 1, 1),
                getattr(s, "std-of-means").float().view(1, -1, 1, 1, 1))

    @torch.no_grad()
    def encode(self, video):
        """(B, 3, 1 + 8k, 32m, 32n) in [-1, 1] -> (B, 128, 1 + k, m, n) fp32, normalised per channel."""
        B, C, Fr, H, W = video.shape
        s = VAE_SPATIAL
        assert C == 3 and Fr % 8 == 1 and H % s == 0 and W % s == 0, \
            f"video must be (B, 3, 1+8k, 32m, 32n), got {tuple(video.shape)}"
        mu = self.encoder(video.to(self.encoder.conv_in.conv.weight.dtype)).float()
        mean, std = self._stats()
        return (mu - mean) / std

    @torch.no_grad()
    def decode(self, latents, timestep=0.05, noise_scale=0.0, generator=None, clamp=True, tone_map=0.0):
        """normalised latents (B, 128, f, h, w) -> video (B, 3, 1 + 8(f-1), 32h, 32w) fp32, clamped to [-1, 1].
        timestep: the decoder's conditioning (the official configs decode at 0.05). noise_scale: the pipeline's
        decode noise, z <- (1 - s) z + s eps on the NORMALISED latents, before the statistics are undone (its configs
        use 0.025); 0 = none. (diffusers' LTXPipeline adds it after denormalising: noise x std-of-means.) tone_map:
        the pipeline's tone_map_compression_ratio (the 13B distilled config's second pass: 0.6), after the noise."""
        z = latents.float()  # (B, 128, f, h, w), the DiT's space
        if noise_scale:
            eps = torch.randn(z.shape, generator=generator, device="cpu").to(z.device)
            z = (1 - noise_scale) * z + noise_scale * eps
        if tone_map:
            z = tone_map_latents(z, tone_map)
        mean, std = self._stats()
        z = z * std + mean
        dt = self.decoder.conv_in.conv.weight.dtype
        t = torch.full((z.shape[0],), float(timestep), device=z.device, dtype=dt)
        x = self.decoder(z.to(dt), t).float()
        return x.clamp(-1, 1) if clamp else x


def tone_map_latents(z, compression):
    """The pipeline's tone mapping (LTXVideoPipeline.tone_map_latents): each value scaled by
    1 - 0.8 a sigmoid(4 a (|z| - 1)), a = 0.75 compression: large values are pulled in, small ones kept."""
    if not 0 <= compression <= 1:
        raise ValueError(f"tone map compression {compression}: expected a value in [0, 1]")
    a = 0.75 * compression
    return z * (1 - 0.8 * a * torch.sigmoid(4 * a * (z.abs() - 1)))


# -----------------------------------------------------------------------------------------------------
# Latent upsampler (ltxv-spatial-upscaler-0.9.7 / -0.9.8.safetensors; ltx_video/models/autoencoders/
# latent_upsampler.py), inference only: the second model of the multi-scale pipeline. It doubles the latent grid
# (h, w -> 2h, 2w; a temporal variant doubles f - 1) in the VAE's RAW latent space (the per-channel statistics
# undone), so that a second DiT pass can refine a first pass made at a smaller size:
#   initial_conv -> GroupNorm(32) -> SiLU -> res_blocks -> upsampler.0 (a conv to 4x (2x, 8x) the channels) and a
#   pixel shuffle -> post_upsample_res_blocks -> final_conv. Keys as the file stores them; its config is a JSON string
#   in the safetensors metadata ("config"), as upstream reads it.


@dataclass
class UpsamplerConfig:
    in_channels: int = 128  # the VAE's latent channels
    mid_channels: int = 512
    num_blocks_per_stage: int = 4
    dims: int = 3  # 3: Conv3d blocks (upstream's and diffusers' default); 2: every conv per frame (Conv2d)
    spatial_upsample: bool = True
    temporal_upsample: bool = False


class UpsamplerResBlock(nn.Module):
    def __init__(self, c, dims):
        super().__init__()
        conv = nn.Conv3d if dims == 3 else nn.Conv2d
        self.conv1, self.norm1 = conv(c, c, 3, padding=1), nn.GroupNorm(32, c)
        self.conv2, self.norm2 = conv(c, c, 3, padding=1), nn.GroupNorm(32, c)

    def forward(self, x):
        h = F.silu(self.norm1(self.conv1(x)))
        return F.silu(self.norm2(self.conv2(h)) + x)  # the activation after the residual sum, as upstream


def shuffle_up(x, pt, ps):
    """(B, C pt ps ps, f, h, w) -> (B, C, f pt, h ps, w ps): the channel index is c pt ps ps + i ps ps + j ps + k for
    the sub-position (i, j, k) in (time, height, width), upstream's PixelShuffleND."""
    B, C, f, h, w = x.shape
    x = x.view(B, C // (pt * ps * ps), pt, ps, ps, f, h, w).permute(0, 1, 5, 2, 6, 3, 7, 4)
    return x.reshape(B, -1, f * pt, h * ps, w * ps)


class LatentUpsampler(nn.Module):
    def __init__(self, cfg=None):
        super().__init__()
        self.cfg = cfg = cfg or UpsamplerConfig()
        if not (cfg.spatial_upsample or cfg.temporal_upsample) or (cfg.dims == 2 and cfg.temporal_upsample):
            raise ValueError(f"latent upsampler {cfg}: expected a spatial and/or temporal upsample (temporal: dims 3)")
        conv = nn.Conv3d if cfg.dims == 3 else nn.Conv2d
        c, m = cfg.in_channels, cfg.mid_channels
        self.initial_conv, self.initial_norm = conv(c, m, 3, padding=1), nn.GroupNorm(32, m)
        self.res_blocks = nn.ModuleList(UpsamplerResBlock(m, cfg.dims) for _ in range(cfg.num_blocks_per_stage))
        # spatial only: a per-frame Conv2d (also in a dims-3 model); with time: a Conv3d
        pt, ps = (2 if cfg.temporal_upsample else 1), (2 if cfg.spatial_upsample else 1)
        up = nn.Conv3d if cfg.temporal_upsample else nn.Conv2d
        self.upsampler = nn.Sequential(up(m, pt * ps * ps * m, 3, padding=1))  # key upsampler.0 (.1: the shuffle)
        self.post_upsample_res_blocks = nn.ModuleList(UpsamplerResBlock(m, cfg.dims)
                                                      for _ in range(cfg.num_blocks_per_stage))
        self.final_conv = conv(m, c, 3, padding=1)

    def forward(self, z):
        """RAW latents (B, C, f, h, w) -> (B, C, f, 2h, 2w) (temporal: 1 + 2(f - 1) frames, the first dropped as
        upstream), in the weights' dtype."""
        B = z.shape[0]
        frames = lambda x: x.transpose(1, 2).flatten(0, 1)  # noqa: E731  (B, C, f, h, w) -> (B f, C, h, w)
        video = lambda x: x.unflatten(0, (B, -1)).transpose(1, 2)  # noqa: E731  and back
        x = z.to(self.initial_conv.weight.dtype)
        x = frames(x) if self.cfg.dims == 2 else x
        x = F.silu(self.initial_norm(self.initial_conv(x)))
        for blk in self.res_blocks:
            x = blk(x)
        if self.cfg.temporal_upsample:
            x = shuffle_up(self.upsampler[0](x), 2, 2 if self.cfg.spatial_upsample else 1)[:, :, 1:]
        elif self.cfg.dims == 3:
            x = video(F.pixel_shuffle(self.upsampler[0](frames(x)), 2))
        else:
            x = F.pixel_shuffle(self.upsampler[0](x), 2)
        for blk in self.post_upsample_res_blocks:
            x = blk(x)
        x = self.final_conv(x)
        return video(x) if self.cfg.dims == 2 else x


def adain_latents(z, ref):
    """Each (sample, channel) of z given ref's mean and std over (f, h, w) (the pipeline's adain_filter_latent at
    factor 1; torch.std_mean, the unbiased std). The multi-scale pipeline applies it to the upsampled latents with
    the first pass's as ref."""
    dims = (2, 3, 4)
    r_std, r_mean = torch.std_mean(ref.float(), dim=dims, keepdim=True)
    z_std, z_mean = torch.std_mean(z.float(), dim=dims, keepdim=True)
    return (z.float() - z_mean) / z_std * r_std + r_mean


# -----------------------------------------------------------------------------------------------------
# Text encoder: the T5-v1.1-XXL encoder (the PixArt-alpha / Lightricks text_encoder/ folder), inference only.
# Module names equal the Hugging Face keys that folder stores (`encoder.block.3.layer.0.SelfAttention.q.weight`).
# T5 v1.1: gated tanh-GELU FFN, no biases, no 1/sqrt(d) attention scale, and ONE relative-position table (block 0's)
# shared by all 24 layers.


@dataclass
class T5Config:
    vocab_size: int = 32128  # 32,000 sentencepiece pieces + 100 <extra_id_*>, rounded up
    d_model: int = 4096
    d_kv: int = 64
    d_ff: int = 10240
    num_heads: int = 64
    num_layers: int = 24
    relative_attention_num_buckets: int = 32
    relative_attention_max_distance: int = 128
    layer_norm_epsilon: float = 1e-6


T5_PRESETS = {"t5-v1_1-xxl": T5Config(),  # 4,762,310,656 params
              "tiny": T5Config(vocab_size=200, d_model=32, d_kv=8, d_ff=48, num_heads=4, num_layers=2)}
TEXT_LEN = 256  # the official pipeline's text_encoder_max_tokens (LTX-Video-Trainer's preprocessing uses 256 too)


class T5LayerNorm(nn.Module):
    """RMS (no mean, no bias); statistics in fp32, rounded to the weight dtype before the scale (as HF)."""

    def __init__(self, dim, eps):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x):
        x = x * torch.rsqrt(x.float().pow(2).mean(-1, keepdim=True) + self.eps)
        return self.weight * x.to(self.weight.dtype)


def relative_position_bucket(rel, num_buckets, max_distance):
    # rel = key - query. Bidirectional: half the buckets per direction; within one, distances below a quarter of the
    # buckets get one each, the rest up to max_distance are log-spaced, farther ones share the last
    n = num_buckets // 2
    exact = n // 2
    bucket = (rel > 0).long() * n
    rel = rel.abs()
    far = exact + (torch.log(rel.float() / exact) / math.log(max_distance / exact) * (n - exact)).long()
    return bucket + torch.where(rel < exact, rel, far.clamp(max=n - 1))


class T5SelfAttention(nn.Module):
    def __init__(self, cfg: T5Config, has_bias):
        super().__init__()
        inner = cfg.num_heads * cfg.d_kv
        self.cfg = cfg
        self.q, self.k, self.v = (nn.Linear(cfg.d_model, inner, bias=False) for _ in range(3))
        self.o = nn.Linear(inner, cfg.d_model, bias=False)
        if has_bias:
            self.relative_attention_bias = nn.Embedding(cfg.relative_attention_num_buckets, cfg.num_heads)

    def position_bias(self, L):  # (1, heads, L, L)
        pos = torch.arange(L, device=self.relative_attention_bias.weight.device)
        b = relative_position_bucket(pos[None, :] - pos[:, None], self.cfg.relative_attention_num_buckets,
                                     self.cfg.relative_attention_max_distance)
        return self.relative_attention_bias(b).permute(2, 0, 1)[None]

    def forward(self, x, bias):  # x (B, L, d); bias (B, heads, L, L): relative positions + padding mask
        B, L, _ = x.shape
        q, k, v = (f(x).view(B, L, self.cfg.num_heads, -1).transpose(1, 2) for f in (self.q, self.k, self.v))
        y = F.scaled_dot_product_attention(q, k, v, attn_mask=bias.to(q.dtype), scale=1.0)
        return self.o(y.transpose(1, 2).reshape(B, L, -1))


class T5Block(nn.Module):
    def __init__(self, cfg: T5Config, has_bias):
        super().__init__()
        attn, ff = nn.Module(), nn.Module()  # layer.0 = self-attention, layer.1 = FFN (HF's key layout)
        attn.SelfAttention = T5SelfAttention(cfg, has_bias)
        attn.layer_norm = T5LayerNorm(cfg.d_model, cfg.layer_norm_epsilon)
        ff.DenseReluDense = nn.Module()
        ff.DenseReluDense.wi_0 = nn.Linear(cfg.d_model, cfg.d_ff, bias=False)
        ff.DenseReluDense.wi_1 = nn.Linear(cfg.d_model, cfg.d_ff, bias=False)
        ff.DenseReluDense.wo = nn.Linear(cfg.d_ff, cfg.d_model, bias=False)
        ff.layer_norm = T5LayerNorm(cfg.d_model, cfg.layer_norm_epsilon)
        self.layer = nn.ModuleList([attn, ff])

    def forward(self, x, bias):
        attn, ff = self.layer
        x = x + attn.SelfAttention(attn.layer_norm(x), bias)
        d = ff.DenseReluDense
        h = ff.layer_norm(x)
        return x + d.wo(F.gelu(d.wi_0(h), approximate="tanh") * d.wi_1(h))


class T5EncoderModel(nn.Module):
    """ids (B, L), mask (B, L) 1 = token -> last_hidden_state (B, L, d_model), after the final norm. No fp16 (T5's
    activations overflow it): bf16 or fp32."""

    def __init__(self, cfg: T5Config):
        super().__init__()
        self.cfg = cfg
        self.shared = nn.Embedding(cfg.vocab_size, cfg.d_model)
        self.encoder = nn.Module()
        self.encoder.block = nn.ModuleList(T5Block(cfg, i == 0) for i in range(cfg.num_layers))
        self.encoder.final_layer_norm = T5LayerNorm(cfg.d_model, cfg.layer_norm_epsilon)

    def forward(self, ids, mask=None):
        x = self.shared(ids)  # not scaled by sqrt(d)
        blocks = self.encoder.block
        bias = blocks[0].layer[0].SelfAttention.position_bias(ids.shape[1]).to(x.dtype)  # (1, H, L, L), shared
        if mask is not None:  # padded keys: the dtype's most negative value (HF), never -inf
            bias = bias + torch.zeros(mask.shape, dtype=x.dtype, device=x.device).masked_fill(
                mask == 0, torch.finfo(x.dtype).min)[:, None, None, :]
        for blk in blocks:
            x = blk(x, bias)
        return self.encoder.final_layer_norm(x)


class Tokenizer:
    # The T5 sentencepiece tokenizer (spiece.model): pieces + EOS (1), no BOS, right-padded with <pad> (0) to max_len;
    # truncation keeps max_len - 1 pieces so the EOS always fits. What HF's T5Tokenizer returns for
    # padding="max_length", truncation=True (the official pipeline's call). `path`: the tokenizer/ folder or the file.
    pad_id, eos_id = 0, 1

    def __init__(self, path):
        import sentencepiece
        path = os.fspath(path)
        if os.path.isdir(path):
            path = os.path.join(path, "spiece.model")
        self.sp = sentencepiece.SentencePieceProcessor(model_file=path)
        assert self.sp.piece_to_id("</s>") == self.eos_id and self.sp.pad_id() in (self.pad_id, -1), \
            "not a T5 sentencepiece vocabulary"

    def __call__(self, prompts, max_len=TEXT_LEN):  # -> ids, mask: (B, max_len) int64
        ids = torch.full((len(prompts), max_len), self.pad_id, dtype=torch.long)
        mask = torch.zeros(len(prompts), max_len, dtype=torch.long)
        for i, p in enumerate(self.sp.encode(list(prompts))):
            p = p[: max_len - 1] + [self.eos_id]
            ids[i, : len(p)] = torch.tensor(p)
            mask[i, : len(p)] = 1
        return ids, mask


class TextEncoder:
    """prompts -> (context (B, 256, 4096), mask (B, 256)) as the official pipeline (pipeline_ltx_video.py) builds
    them: strip, tokenize to 256, run T5 WITH the mask, keep all 256 rows (the DiT masks the padding with -10000;
    LTX-Video-Trainer runs T5 without the mask, which changes the real tokens' states too)."""

    def __init__(self, model, tokenizer, max_len=TEXT_LEN):
        self.model, self.tokenizer, self.max_len = model, tokenizer, max_len

    @torch.no_grad()
    def encode(self, prompts):
        ids, mask = self.tokenizer([p.strip() for p in prompts], self.max_len)
        device = self.model.shared.weight.device
        ids, mask = ids.to(device), mask.to(device)
        return self.model(ids, mask), mask


# -----------------------------------------------------------------------------------------------------
# Loading the released weights. The official single file (ltxv-2b-0.9.6-dev-04-25.safetensors,
# ltxv-13b-0.9.7-dev.safetensors, ltxv-13b-0.9.8-dev.safetensors, ...) holds the DiT under `model.diffusion_model.`
# and the VAE under `vae.`; its header's metadata "config" is a JSON string {"transformer": {...}, "vae": {...},
# "scheduler": {...}} from which the official code builds the models, and so do we: the architecture is read from
# there, never guessed from tensor widths. Also accepted for the DiT: a diffusers folder (transformer/ with
# config.json; four renames) and our own exports (the official layout). The T5 comes from its Hugging Face folder.

DIT_PREFIX, VAE_PREFIX = "model.diffusion_model.", "vae."
DIFFUSERS_DIT_RENAMES = [("proj_in.", "patchify_proj."), ("time_embed.", "adaln_single."), (".norm_q.", ".q_norm."),
                         (".norm_k.", ".k_norm.")]


def read_prefixed(files, prefix, dtype=None):
    """{key without prefix: tensor} for the keys under `prefix` (all when prefix is ""), each floating tensor cast to
    `dtype` as it is read (bf16-stored files come up in fp32 when asked), on CPU.
    The fp8 releases (ltxv-*-fp8.safetensors) need nothing more: upstream loads them strictly into the plain model
    (transformer3d.py load_state_dict / from_pretrained: the same keys, no scale tensors), and its Q8 kernels use
    the stored float8_e4m3fn weights as they are, unscaled and unrotated (they Hadamard-rotate weights and
    activations alike at load / run time, which cancels). So the upcast gives those exact weights (e4m3 fits in
    bf16 and fp32); it is not bitwise upstream's fp8 inference, which also rounds the activations to fp8."""
    from safetensors import safe_open
    sd = {}
    for fn in files:
        with safe_open(fn, framework="pt", device="cpu") as f:
            for k in f.keys():
                if k.startswith(prefix):
                    t = f.get_tensor(k)
                    sd[k[len(prefix):]] = t.to(dtype) if dtype is not None and t.is_floating_point() else t
    return sd


def header_config(file):
    """The official header's {"transformer": ..., "vae": ..., "scheduler": ...} (empty dict if there is none)."""
    meta, _ = safetensors_header(file)
    return json.loads(meta["config"]) if "config" in meta else {}


def dit_config_from(c):
    """LTXConfig from a header "transformer" section (or a diffusers config.json); unknown keys ignored, and the
    few that would change the architecture checked."""
    for k, want in (("positional_embedding_type", "rope"), ("adaptive_norm", "single_scale_shift"),
                    ("standardization_norm", "rms_norm"), ("activation_fn", "gelu-approximate")):
        if k in c and c[k] != want:
            raise ValueError(f"transformer config {k}={c[k]!r}: train_ltx.py implements {k}={want!r} (LTX-Video 0.9.x)")
    if c.get("qk_norm", "rms_norm") not in ("rms_norm", "rms_norm_across_heads"):
        raise ValueError(f"transformer config qk_norm={c['qk_norm']!r}: expected rms_norm")
    if c.get("timestep_scale_multiplier", 1000) != 1000:  # forward() takes t = 1000 sigma, already multiplied
        raise ValueError(f"timestep_scale_multiplier={c['timestep_scale_multiplier']}: LTX-Video 0.9.x has 1000")
    if c.get("patch_size", 1) != 1 or c.get("patch_size_t", 1) != 1:
        raise ValueError("transformer config patch_size != 1: LTX-Video 0.9.x DiTs have one token per latent pixel")
    fields = {f.name for f in dataclasses.fields(LTXConfig)}
    kw = {k: v for k, v in c.items() if k in fields}
    if "causal_temporal_positioning" not in kw:  # absent (diffusers configs never carry it): the README's choice
        kw["causal_temporal_positioning"] = kw.get("num_layers") == 48  # 13B causal, 2B not (a port read both headers)
    if "positional_embedding_max_pos" in kw:
        kw["positional_embedding_max_pos"] = tuple(kw["positional_embedding_max_pos"])
    return LTXConfig(**kw)


def vae_config_from(c):
    """VAEConfig from a header "vae" section; only the 0.9.5+ layout (checked block by block when it is built)."""
    if c.get("_class_name", "CausalVideoAutoencoder") != "CausalVideoAutoencoder" or c.get("dims", 3) != 3:
        raise ValueError(f"vae config {c.get('_class_name')} dims={c.get('dims')}: expected a 3-D "
                         "CausalVideoAutoencoder")
    for k, want in (("norm_layer", "pixel_norm"), ("latent_log_var", "uniform"), ("use_quant_conv", False),
                    ("normalize_latent_channels", False)):
        if c.get(k, want) != want:
            raise ValueError(f"vae config {k}={c[k]!r}: the 0.9.5+ VAE has {k}={want!r}")
    if "encoder_blocks" not in c:
        raise ValueError("vae config without encoder_blocks: that is the 0.9.0 VAE; train_ltx.py loads 0.9.5+")
    fields = {f.name for f in dataclasses.fields(VAEConfig)}
    return VAEConfig(**{k: v for k, v in c.items() if k in fields})


def vae_from_diffusers(c):
    """-> (VAEConfig, renames) of a diffusers AutoencoderKLLTXVideo config.json (the 0.9.5+ layout). diffusers groups
    the encoder as down_blocks.i = (resnets, downsamplers.0) + mid_block and the decoder as mid_block + up_blocks.i =
    (upsamplers.0, resnets); ours is the flat block list of the official config, so the same walk over the config
    gives our block list and the key renames (diffusers prefix -> official prefix) of every group."""
    if c.get("_class_name", "AutoencoderKLLTXVideo") != "AutoencoderKLLTXVideo":
        raise ValueError(f"vae/config.json is a {c['_class_name']}: expected AutoencoderKLLTXVideo")
    if any(t != "LTXVideo095DownBlock3D" for t in c["down_block_types"]) or any(c.get("decoder_inject_noise", ())) \
            or not c.get("timestep_conditioning") or c.get("patch_size_t", 1) != 1 or not c.get("encoder_causal", 1):
        raise ValueError("diffusers VAE config: not the 0.9.5+ VAE (LTXVideo095DownBlock3D, timestep-conditioned "
                         "decoder, no noise injection); train_ltx.py loads 0.9.5+")
    boc, lpb = c["block_out_channels"], c["layers_per_block"]
    kinds = {"spatial": "compress_space_res", "temporal": "compress_time_res", "spatiotemporal": "compress_all_res"}
    enc, ren = [], [("latents_mean", "per_channel_statistics.mean-of-means"),
                    ("latents_std", "per_channel_statistics.std-of-means"),
                    ("decoder.time_embedder.", "decoder.last_time_embedder."),
                    ("decoder.scale_shift_table", "decoder.last_scale_shift_table")]
    for i, (n, down, kind) in enumerate(zip(lpb, c["spatio_temporal_scaling"], c["downsample_type"])):
        ren.append((f"encoder.down_blocks.{i}.resnets.", f"encoder.down_blocks.{len(enc)}.res_blocks."))
        enc.append(["res_x", {"num_layers": n}])
        if down:
            ren.append((f"encoder.down_blocks.{i}.downsamplers.0.", f"encoder.down_blocks.{len(enc)}."))
            enc.append([kinds[kind], {"multiplier": boc[i + 1] // boc[i]}])
    ren.append(("encoder.mid_block.resnets.", f"encoder.down_blocks.{len(enc)}.res_blocks."))
    enc.append(["res_x", {"num_layers": lpb[-1]}])
    # the decoder in the order it runs: our up_blocks indices; the config lists it widest last
    dboc, dlpb = c["decoder_block_out_channels"][::-1], c["decoder_layers_per_block"][::-1]
    up, res = c["upsample_factor"][::-1], c["upsample_residual"][::-1]
    dec = [["res_x", {"num_layers": dlpb[0], "inject_noise": False}]]
    ren += [("decoder.mid_block.resnets.", "decoder.up_blocks.0.res_blocks."),
            ("decoder.mid_block.time_embedder.", "decoder.up_blocks.0.time_embedder.")]
    C = dboc[0]
    for i, scale in enumerate(c["decoder_spatio_temporal_scaling"][::-1]):
        if C != dboc[i] or not scale:  # diffusers would add a conv_in resnet or skip the upsampler: not in 0.9.5+
            raise ValueError("diffusers VAE config: decoder widths or upsamplers that the 0.9.5+ layout does not have")
        ren.append((f"decoder.up_blocks.{i}.upsamplers.0.", f"decoder.up_blocks.{len(dec)}."))
        dec.append(["compress_all", {"residual": bool(res[i]), "multiplier": up[i]}])
        C //= up[i]
        ren += [(f"decoder.up_blocks.{i}.resnets.", f"decoder.up_blocks.{len(dec)}.res_blocks."),
                (f"decoder.up_blocks.{i}.time_embedder.", f"decoder.up_blocks.{len(dec)}.time_embedder.")]
        dec.append(["res_x", {"num_layers": dlpb[i + 1], "inject_noise": False}])
    cfg = VAEConfig(encoder_blocks=enc, decoder_blocks=dec[::-1], latent_channels=c["latent_channels"],
                    patch_size=c["patch_size"], encoder_base_channels=boc[0], decoder_base_channels=C,
                    causal_decoder=bool(c.get("decoder_causal", False)), in_channels=c.get("in_channels", 3),
                    out_channels=c.get("out_channels", 3))  # diffusers pads with zeros: our default
    return cfg, ren


def rename_prefixes(sd, renames):
    """Each key whose start is one of the diffusers prefixes gets the official one instead (the first that matches)."""
    out = {}
    for k, v in sd.items():
        a, b = next(((a, b) for a, b in renames if k.startswith(a)), ("", ""))
        out[b + k[len(a):]] = v
    return out


def dit_source(path):
    """-> (files, key prefix, LTXConfig, renames) of the DiT at `path`: an official single file, our export (same
    layout, maybe without the VAE), or a diffusers folder / its transformer/ subfolder."""
    path = str(path)
    if os.path.isdir(path):
        if os.path.isdir(os.path.join(path, "transformer")):
            path = os.path.join(path, "transformer")
        with open(os.path.join(path, "config.json")) as f:
            return safetensors_files(path, "diffusion_pytorch_model"), "", dit_config_from(json.load(f)), True
    if not (path.endswith(".safetensors") and os.path.isfile(path)):
        raise FileNotFoundError(f"{path}: expected an LTX-Video .safetensors file or a diffusers folder")
    cfg = header_config(path)
    if "transformer" not in cfg:
        raise ValueError(f"{path}: no 'config' with a 'transformer' section in the safetensors header. The official "
                         "ltxv-*.safetensors files carry one; which file is this?")
    return [path], DIT_PREFIX, dit_config_from(cfg["transformer"]), False


def read_dit_checkpoint(path, dtype=None):
    """-> (LTXConfig, state dict with the official keys on CPU in `dtype`)."""
    files, prefix, cfg, diffusers = dit_source(path)
    sd = read_prefixed(files, prefix, dtype)
    if diffusers:
        out = {}
        for k, v in sd.items():
            for a, b in DIFFUSERS_DIT_RENAMES:
                k = k.replace(a, b)
            out[k] = v
        sd = out
    return cfg, sd


DIT_HINT = "train_ltx.py loads the LTX-Video 0.9.x DiT from an official ltxv-*.safetensors file or a diffusers folder."


def load_dit(path, dtype=torch.float32, device="cpu"):
    """The DiT (eval mode) of an official single file, a diffusers folder or our export; its config from the file."""
    cfg, sd = read_dit_checkpoint(path, dtype)
    with torch.device("meta"):
        model = Transformer3DModel(cfg)
    check_keys(model.state_dict().keys(), sd, path, hint=DIT_HINT)
    check_shapes(model.state_dict(), sd, path)
    model.load_state_dict(sd, assign=True)
    return model.to(device).eval()


def diffusers_vae(path):
    """-> (the VAE folder, (VAEConfig, renames)) of a diffusers folder: its vae/ or the folder itself."""
    folder = os.path.join(path, "vae") if os.path.isdir(os.path.join(path, "vae")) else path
    with open(os.path.join(folder, "config.json")) as f:
        return folder, vae_from_diffusers(json.load(f))


def read_vae_checkpoint(path, dtype=None):
    """-> (VAEConfig, state dict with the official keys) of an official single file (keys `vae.*`, config from the
    header's "vae" section) or a diffusers folder (vae/ or the folder itself: config.json +
    diffusion_pytorch_model*.safetensors, keys renamed by rename_prefixes)."""
    path = str(path)
    if os.path.isdir(path):
        folder, (vcfg, renames) = diffusers_vae(path)
        return vcfg, rename_prefixes(read_prefixed(safetensors_files(folder, "diffusion_pytorch_model"), "", dtype),
                                     renames)
    cfg = header_config(path)
    if "vae" not in cfg:
        raise ValueError(f"{path}: no 'vae' section in the header config; pass the official ltxv-*.safetensors "
                         "file or a diffusers folder")
    return vae_config_from(cfg["vae"]), read_prefixed([path], VAE_PREFIX, dtype)


def load_vae(path, dtype=torch.float32, device="cpu"):
    """The VAE (eval, frozen) of an official single file or a diffusers folder (see read_vae_checkpoint)."""
    vcfg, sd = read_vae_checkpoint(path, dtype)
    with torch.device("meta"):
        model = CausalVideoAutoencoder(vcfg)
    expected = model.state_dict()
    # the file may carry more per-channel statistics (mean-of-stds, channel, ...) than the two that are used
    sd = {k: v for k, v in sd.items() if k in expected or not k.startswith("per_channel_statistics.")}
    check_keys(expected.keys(), sd, path, hint="Expected the 0.9.5+ VAE (LTX-Video 0.9.5 / 0.9.6 / 0.9.7 / 0.9.8).")
    check_shapes(expected, sd, path)
    model.load_state_dict(sd, assign=True)
    return model.to(device).eval().requires_grad_(False)


def upsampler_config_from(sd, path, meta=None):
    """The upsampler's config: the JSON the file carries (upstream's from_pretrained reads metadata["config"]; a
    diffusers folder's config.json has the same fields), else read off the tensor shapes."""
    if meta:
        fields = {f.name for f in dataclasses.fields(UpsamplerConfig)}
        return UpsamplerConfig(**{k: v for k, v in meta.items() if k in fields})
    w = sd.get("initial_conv.weight")
    up = sd.get("upsampler.0.weight")
    if w is None or up is None:
        raise ValueError(f"{path}: no initial_conv.weight / upsampler.0.weight: not an LTX-Video latent upsampler")
    m = w.shape[0]
    mult = up.shape[0] // m  # 4: spatial, 2: temporal, 8: both
    return UpsamplerConfig(in_channels=w.shape[1], mid_channels=m, dims=w.ndim - 2,
                           num_blocks_per_stage=len({k.split(".")[1] for k in sd if k.startswith("res_blocks.")}),
                           spatial_upsample=mult in (4, 8), temporal_upsample=mult in (2, 8))


def load_upsampler(path, dtype=torch.float32, device="cpu"):
    """The latent upsampler (eval, frozen) of ltxv-spatial-upscaler-*.safetensors, or of a diffusers folder
    (config.json + diffusion_pytorch_model.safetensors, the same keys)."""
    path = str(path)
    if os.path.isdir(path):
        with open(os.path.join(path, "config.json")) as f:
            meta = json.load(f)
        sd = read_safetensors(safetensors_files(path, "diffusion_pytorch_model"), dtype)
    else:
        meta = json.loads(safetensors_header(path)[0].get("config", "null"))
        sd = read_safetensors([path], dtype)
    cfg = upsampler_config_from(sd, path, meta)
    with torch.device("meta"):
        model = LatentUpsampler(cfg)
    expected = model.state_dict()
    check_keys(expected.keys(), sd, path, hint="Expected an LTX-Video latent upsampler (ltxv-spatial-upscaler-*).")
    check_shapes(expected, sd, path)
    model.load_state_dict(sd, assign=True)
    return model.to(device).eval().requires_grad_(False)


def load_text_encoder(path, dtype=torch.bfloat16, device="cpu"):
    """T5-v1.1-XXL from a Hugging Face folder: the model root (text_encoder/ + tokenizer/, as PixArt-alpha's and
    Lightricks/LTX-Video's) or text_encoder/ itself (config.json + model*.safetensors, one file or shards) with the
    tokenizer's spiece.model beside it or in ../tokenizer. -> TextEncoder (encode(prompts) -> (context, mask))."""
    assert dtype in (torch.bfloat16, torch.float32), "T5 overflows fp16; use bf16 or fp32"
    path = str(path)
    folder = os.path.join(path, "text_encoder") if os.path.isdir(os.path.join(path, "text_encoder")) else path
    with open(os.path.join(folder, "config.json")) as f:
        c = json.load(f)
    if c.get("feed_forward_proj", "gated-gelu") != "gated-gelu":
        raise ValueError(f"{folder}: feed_forward_proj={c['feed_forward_proj']!r}; expected T5 v1.1 (gated-gelu)")
    cfg = T5Config(**{k: v for k, v in c.items() if k in {f.name for f in dataclasses.fields(T5Config)}})
    stem = "model" if os.path.exists(os.path.join(folder, "model.safetensors")) or \
        os.path.exists(os.path.join(folder, "model.safetensors.index.json")) else "diffusion_pytorch_model"
    sd = read_prefixed(safetensors_files(folder, stem), "", dtype)
    tied = sd.pop("encoder.embed_tokens.weight", None)  # HF ties it to shared.weight; files carry either or both
    sd.setdefault("shared.weight", tied)
    sd = {k: v for k, v in sd.items() if not k.startswith("decoder.") and k != "lm_head.weight"}
    with torch.device("meta"):
        model = T5EncoderModel(cfg)
    check_keys(model.state_dict().keys(), sd, folder, hint="Expected the T5 encoder (T5EncoderModel keys).")
    check_shapes(model.state_dict(), sd, folder)
    model.load_state_dict(sd, assign=True)
    model = model.to(device).eval().requires_grad_(False)
    tok = next((p for p in (os.path.join(folder, "spiece.model"), os.path.join(path, "tokenizer", "spiece.model"),
                            os.path.join(os.path.dirname(folder.rstrip("/")), "tokenizer", "spiece.model"))
                if os.path.exists(p)), None)
    if tok is None:
        raise FileNotFoundError(f"{path}: no tokenizer (spiece.model in the folder, or in tokenizer/ beside it)")
    return TextEncoder(model, Tokenizer(tok))


# -----------------------------------------------------------------------------------------------------
# LoRA. The adapter lives INSIDE the Linear it adapts, so the base keeps its official key
# (`transformer_blocks.0.attn1.to_q.weight`) and the adapter gets `...to_q.lora_A.weight` (rank, in) and
# `.lora_B.weight` (out, rank): the PEFT / ComfyUI naming. LTX-Video-Trainer's default targets are to_q, to_k, to_v
# and to_out.0 of both attentions; its IC-LoRA configs add the FFN (ff.net.0.proj, ff.net.2).


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


LORA_TARGETS = ",".join(f"{a}.{m}" for a in ("attn1", "attn2") for m in ("to_q", "to_k", "to_v", "to_out.0"))
LORA_TARGETS_FFN = LORA_TARGETS + ",ff.net.0.proj,ff.net.2"


def add_lora(model, rank, alpha, targets=LORA_TARGETS):
    """Swap the target Linears of every block for LoRALinear; freeze everything but the adapters."""
    for blk in model.transformer_blocks:
        for name in targets.split(","):
            parent_name, _, child = name.rpartition(".")
            parent = blk.get_submodule(parent_name)
            setattr(parent, child, LoRALinear(getattr(parent, child), rank, alpha))
    for n, p in model.named_parameters():
        p.requires_grad_(".lora_" in n)
    return model


def lora_init_state(model, seed):
    """Fresh adapter weights as a CPU state dict: A ~ kaiming-uniform (PEFT's init), B = 0, so training starts from
    exactly the base model. Made on one rank and broadcast like any checkpoint, so 1 or N ranks start equal."""
    g = torch.Generator().manual_seed(seed)
    sd = {}
    for name, m in model.named_modules():
        if isinstance(m, LoRALinear):
            r, n_in = m.lora_A.weight.shape
            sd[name + ".lora_A.weight"] = (torch.rand(r, n_in, generator=g) * 2 - 1) / math.sqrt(n_in)
            sd[name + ".lora_B.weight"] = torch.zeros(m.lora_B.weight.shape)
    return sd


def lora_for_export(sd, rank, alpha):
    """The adapters as they are written (ComfyUI format, via common/lora_file.py): with alpha != rank the scale
    alpha / rank is folded into every lora_B and the file says alpha = rank. diffusers' LTX loader ignores `.alpha`
    keys (it always scales by 1), ComfyUI applies alpha / rank: folded, both compute the same model."""
    if alpha == rank:
        return sd, float(rank)
    return {k: v * (alpha / rank) if k.endswith(".lora_B.weight") else v for k, v in sd.items()}, float(rank)


def read_lora(path, diffs=None):
    """A LoRA file -> (state dict under our module names, rank, alpha): ComfyUI's format (ours, diffusion-pipe's:
    diffusion_model.<module>) or diffusers' (transformer.<module>: LTX-Video-Trainer's save_lora_weights,
    finetrainers). Inside the blocks diffusers' LTX transformer names every Linear as the official code does
    (attn1/attn2.to_q/to_k/to_v/to_out.0, ff.net.0.proj, ff.net.2; only the weight-only q/k norms differ), so
    stripping the prefix is the whole conversion. diffs: common/lora_file.py's (a dict for the file's full-weight
    deltas; None refuses them)."""
    return lora_file.read_lora(path, prefixes=("diffusion_model.", "transformer."), diffs=diffs)


def lora_for(path, cfg, diffs=None):
    """A LoRA file (--lora, --init_lora, --base_lora) read and checked against the model of `cfg` -> (state dict,
    rank, alpha): a LoRA of another model (more blocks, another width) is one UserError line naming the keys, before
    any weight is read. diffs None: adapters of the blocks' Linears only (add_lora adapts those), no full-weight
    deltas; a dict (--base_lora, merged into the weights): it receives the deltas, and adapters may be anywhere."""
    try:
        lsd, rank, alpha = read_lora(path, diffs)
    except ValueError as e:  # common/lora_file.py's: the file and what is wrong with it, in one line
        raise UserError(str(e)) from None
    outside = [k for k in lsd if not k.startswith("transformer_blocks.")]
    if outside and diffs is None:
        raise UserError(f"{path}: LoRA on modules outside the blocks is not supported: {outside[:4]}")
    with torch.device("meta"):
        fit = Transformer3DModel(cfg)
    try:
        lora_file.check_fits(path, lsd, rank, fit, diffs)
    except ValueError as e:
        raise UserError(str(e)) from None
    return lsd, rank, alpha


# -----------------------------------------------------------------------------------------------------
# Flow matching, the LTX convention (LTX-Video-Trainer training_strategies.py): sigma in [0, 1], sigma = 1 is noise,
#   x_t = (1 - sigma) * x0 + sigma * noise,   target velocity v = noise - x0,   model timestep t = 1000 * sigma.


def token_shift(n_tokens, min_tokens=1024, max_tokens=4096, min_shift=0.95, max_shift=2.05):
    """The resolution-dependent mu of the shifted logit-normal sampler and of the SD3-shifted sampling schedule:
    linear in the token count through (1024, 0.95) and (4096, 2.05), not clamped (768x512x49: 2688 tokens -> 1.546)."""
    m = (max_shift - min_shift) / (max_tokens - min_tokens)
    return m * n_tokens + (min_shift - m * min_tokens)


def sample_sigmas(n, method, n_tokens, shift=1.0, generator=None, device="cpu"):
    """Training sigmas (n,). shifted_logit_normal (LTX-Video-Trainer's default): sigmoid(N(mu(tokens), 1)).
    logit_normal: sigmoid(N(0, 1)). uniform: U(0, 1). shift != 1 additionally applies s*sigma / (1 + (s-1)*sigma)."""
    if method == "shifted_logit_normal":
        s = torch.sigmoid(torch.randn(n, generator=generator, device=device) + token_shift(n_tokens))
    elif method == "logit_normal":
        s = torch.sigmoid(torch.randn(n, generator=generator, device=device))
    elif method == "uniform":
        s = torch.rand(n, generator=generator, device=device)
    else:
        raise ValueError(f"--timestep_sampling must be shifted_logit_normal, logit_normal or uniform, got {method!r}")
    return shift * s / (1 + (shift - 1) * s) if shift != 1.0 else s


def flow_loss(model, x0, context, mask, sigma, noise, frame_rate=25.0, cond=None, keyframe=None):
    """MSE between the predicted and the true velocity over the tokens that are not conditioning. x0, noise
    (B,C,F,H,W); sigma (B,); cond (B,) or None: per sample, how many leading latent frames are conditioning (bool:
    1, image-to-video's first frame, as LTX-Video-Trainer; k > 1: video extension from a k-frame prefix); they are
    given clean (x_t = x0 there), get timestep 0 and are left out of the loss. (The causal VAE encodes a clip's
    prefix alone to the clip's own first latents, so the cached latents are what a prefix video encodes to.)
    keyframe (z, p) or None: the model's keyframe conditioning (Transformer3DModel.forward), e.g. the clip's last
    frame encoded alone at its pixel frame; its tokens are not the model's output, so never in the loss."""
    B, C, f, h, w = x0.shape
    s = sigma.view(B, 1, 1, 1, 1)
    xt = (1 - s) * x0 + s * noise
    t = (sigma * 1000).view(B, 1).expand(B, f * h * w)
    keep = torch.ones(B, 1, f, 1, 1, device=x0.device)
    if cond is not None and f > 1 and bool(cond.any()):
        k = cond.to(x0.device).long().clamp(max=f - 1).view(B, 1, 1, 1, 1)
        clean = torch.arange(f, device=x0.device).view(1, 1, f, 1, 1) < k  # (B, 1, f, 1, 1)
        xt = torch.where(clean, x0, xt)
        t = torch.where(clean.expand(B, 1, f, h, w).reshape(B, -1), 0.0, t)
        keep = (~clean).float()
    else:
        t = sigma * 1000  # one timestep per sample: the cheaper (B, 6D) modulation
    v = model(xt, t, context, mask, frame_rate, keyframe=keyframe)
    err = (v.float() - (noise - x0).float()).pow(2) * keep
    return err.sum() / (keep.expand_as(err).sum())


# The official negative prompt (ltx_video/inference.py)
NEGATIVE_PROMPT = "worst quality, inconsistent motion, blurry, jittery, distorted"


def linear_quadratic_schedule(steps, threshold=0.025, linear_steps=None):
    """LTX-Video's LinearQuadratic sigmas (rf.py): 1 - (a linear ramp to `threshold` over the first half, then a
    quadratic to 1) -> (steps,) fp32 from 1.0 down, the final 0 not included."""
    if steps == 1:
        return torch.tensor([1.0])
    linear_steps = steps // 2 if linear_steps is None else linear_steps
    lin = [i * threshold / linear_steps for i in range(linear_steps)]
    diff = linear_steps - threshold * steps
    q_steps = steps - linear_steps
    qa = diff / (linear_steps * q_steps**2)
    qb = threshold / linear_steps - 2 * diff / q_steps**2
    qc = qa * linear_steps**2
    quad = [qa * i**2 + qb * i + qc for i in range(linear_steps, steps)]
    return torch.tensor([1.0 - x for x in lin + quad])


# The distilled checkpoints (ltxv-13b-0.9.8-distilled, ltxv-2b-0.9.8-distilled) sample with a fixed list of timesteps,
# no guidance and no STG (LTX-Video's 0.9.8-distilled configs, first pass; the final step goes to 0). Those configs
# run it as the first pass of a multi-scale pipeline (a latent upsampler, then a second pass from 0.9094):
# --sample_config ltxv-13b-0.9.8-distilled runs both; --sample_schedule distilled the first pass alone, at full size.
DISTILLED_TIMESTEPS = (1.0, 0.9937, 0.9875, 0.9812, 0.9750, 0.9094, 0.7250)


def sampling_sigmas(steps, sampler, n_tokens, shifting="", terminal=None):
    """The official schedule (RectifiedFlowScheduler.set_timesteps): Uniform = linspace(1, 1/steps) or LinearQuadratic;
    with shifting "SD3" each t -> e^mu / (e^mu + 1/t - 1), mu = token_shift(tokens), stretched so the last equals
    `terminal` when given. -> (steps,) fp32; the sampler steps from each to the next and from the last to 0."""
    if sampler == "distilled":  # fixed: `steps`, the shift and the terminal do not apply
        return torch.tensor(DISTILLED_TIMESTEPS)
    if sampler == "LinearQuadratic":
        t = linear_quadratic_schedule(steps)
    elif sampler == "Uniform":
        t = torch.linspace(1, 1 / steps, steps)
    else:
        raise ValueError(f"sampler {sampler!r}: expected Uniform, LinearQuadratic or distilled")
    if shifting == "SD3":
        mu = token_shift(n_tokens)
        t = math.exp(mu) / (math.exp(mu) + (1 / t - 1))
        if terminal:
            one_minus = 1 - t
            t = 1 - one_minus / (one_minus[-1] / (1 - terminal))
    return t


def velocity(model, x, sigma, context, neg, guidance, stg, frame_rate, cond_latent=None, keyframe=None,
             cfg_star=False, soft=None, return_keyframes=False, cond_start=0):
    """One guided velocity, as the official pipeline combines them. context = (ctx (B,L,D), mask (B,L)); neg likewise
    or None. CFG (only when g > 1): u + g (c - u); with cfg_star (the 13B configs' cfg_star_rescale) u is first
    replaced by its scaled copy closest to c, u <- (<c, u> / (|u|^2 + 1e-8)) u per sample. stg = (scale, skip
    blocks, rescale) or None: spatio-temporal guidance adds scale * (c - p), p the conditional prediction with those
    blocks' self-attention replaced by its values, and then matches the result's std to the conditional's by a
    factor r std(c)/std(v) + (1 - r) per sample.
    cond_latent (B,C,k,H,W): the first k latent frames given (an image: k = 1; a video prefix), or the k from latent
    frame cond_start on (a clip placed later in the video); its tokens are the clean latent with timestep 0. soft =
    (k, s) or None: instead, x's latent frames cond_start .. + k are conditioning at strength s < 1, their timestep
    min(sigma, 1 - s) (the pipeline's min(t, 1 - conditioning_mask)). keyframe (z, p),
    (z, p, s) at strength s, or a list of them: the model's keyframe conditioning (e.g. the last frame), the same in
    every branch of the batch. -> the velocity (B, C, f, h, w); with return_keyframes also the keyframes', a list of
    (B, C, k, h, w) (the sampler moves the ones below strength 1)."""
    B, C, f, h, w = x.shape
    t = torch.full((B, f * h * w), float(sigma) * 1000, device=x.device)
    a = cond_start
    if cond_latent is not None:
        k = cond_latent.shape[2]
        x = torch.cat([x[:, :, :a], cond_latent.to(x), x[:, :, a + k:]], dim=2)
        t[:, a * h * w: (a + k) * h * w] = 0.0
    if soft is not None:
        t[:, a * h * w: (a + soft[0]) * h * w] = min(float(sigma), 1 - soft[1]) * 1000
    ctx, cmask = context
    # CFG only above 1, as the official pipeline (guidance_scale > 1): a scale <= 1 means no negative pass at all,
    # not an extrapolation towards the negative prompt
    cfg = guidance > 1.0 and neg is not None
    # one batch: [uncond] + cond + [cond with the STG blocks perturbed]
    xs, ts, cs, ms = [x], [t], [ctx], [cmask]
    if cfg:
        xs, ts, cs, ms = [x] + xs, [t] + ts, [neg[0]] + cs, [neg[1]] + ms
    if stg:
        xs, ts, cs, ms = xs + [x], ts + [t], cs + [ctx], ms + [cmask]
        for i in stg[1]:
            model.transformer_blocks[i].attn1.stg_skip = B
    # the pipeline's guidance statistics (CFG-star's projection, the rescale's stds) run over every token of a
    # sample, the keyframe's too: then the model gives its keyframe tokens' predictions as well
    whole = keyframe is not None and (return_keyframes or (cfg and cfg_star) or (stg and stg[0] > 0 and stg[2] != 1))
    keys = keyframe_list(keyframe)
    try:  # strength 1: (z, p), timestep 0; below: (z, p, its timestep)
        kf = [(e[0].to(x).repeat(len(xs), 1, 1, 1, 1), e[1],
               *([min(float(sigma), 1 - e[2]) * 1000] if len(e) > 2 and e[2] < 1 else [])) for e in keys] or None
        v = model(torch.cat(xs), torch.cat(ts), torch.cat(cs), torch.cat(ms), frame_rate, keyframe=kf,
                  **({"return_keyframe": True} if whole else {}))
    finally:
        for i in stg[1] if stg else ():
            model.transformer_blocks[i].attn1.stg_skip = 0
    # (B, n) per branch: the video's predictions, after the keyframe's when `whole`
    v = torch.cat([v[1].float().flatten(1), v[0].float().flatten(1)], 1) if whole else v.float().flatten(1)
    v = v.chunk(len(xs))
    cond = v[1] if cfg else v[0]
    uncond = v[0]
    if cfg and cfg_star:
        uncond = uncond * ((cond * uncond).sum(1, keepdim=True) / ((uncond * uncond).sum(1, keepdim=True) + 1e-8))
    out = uncond + guidance * (cond - uncond) if cfg else cond
    if stg:
        scale, _, r = stg
        out = out + scale * (cond - v[-1])
        if r != 1.0 and scale > 0:
            out = out * (r * cond.std(dim=1, keepdim=True) / out.std(dim=1, keepdim=True) + (1 - r))
    video = out[:, -C * f * h * w:].reshape(B, C, f, h, w)
    if not return_keyframes:
        return video
    sizes = [math.prod(e[0].shape[2:]) for e in keys]  # the keyframes' tokens, in front, (B, M, C) in token order
    kv = out[:, :-C * f * h * w].reshape(B, sum(sizes), C).split(sizes, dim=1)
    return video, [v.transpose(1, 2).reshape(B, C, *e[0].shape[2:]) for v, e in zip(kv, keys)]


@torch.no_grad()
def sample_euler(model, noise, context, neg=None, steps=40, guidance=3.0, stg=(1.0, (19,), 0.7),
                 sampler="LinearQuadratic", shifting="", terminal=None, frame_rate=25.0, cond_latent=None,
                 renoise=None, keyframe=None, cond_noise=None, timesteps=None, cfg_star=False, init=None,
                 cond_strength=1.0, keyframe_noise=None, cond_start=0):
    """The official first-order sampler (RectifiedFlowScheduler.step): x <- x - (t - t_next) v, from t = 1 (noise)
    through the schedule to 0. Defaults: the ltxv-2b-0.9.6-dev config (40 steps, CFG 3, STG 1 on block 19, rescale
    0.7). timesteps: the schedule itself (then steps / sampler / shifting / terminal are unused); guidance and stg
    may be lists, one entry a step (the configs' per-timestep values, pass_plan). init: latents to start from, noised
    to the first timestep, t0 noise + (1 - t0) init (the multi-scale pipeline's second pass). With cond_latent (B, C,
    k, h, w) the first k latent frames are the conditioning image's or video prefix's latents throughout (timestep
    0), or the k from latent frame cond_start on (a clip in the middle or at the end: the pipeline's
    _handle_non_first_conditioning_sequence, whose first two latent frames the caller gives as a keyframe); with
    keyframe (z, p) (or a list of them) the model attends to the keyframes' tokens at every step (first + last
    frame: both).
    Strengths below 1 (cond_strength; a keyframe (z, p, s)), as the pipeline's conditioning_strengths: the tokens
    start as (1 - s) noise + s z (the video's own noise for cond_latent, keyframe_noise[j] for keyframe j), have
    timestep min(t, 1 - s), stay as they are while t > 1 - s and then move with the video; keyframes stay out of the
    result, the first frames are what they became.
    renoise: a CPU torch.Generator for the stochastic variant (the configs' stochastic_sampling): each step goes to
    x0 = x - t v and re-noises it to the next t with fresh noise, (1 - t') x0 + t' eps; the last step (to 0) is x0.
    cond_noise = (scale, CPU generator) or None: the pipeline's image_cond_noise_scale (inference.py's default 0.15;
    add_noise_to_image_conditioning_latents): at each step the model sees the strength-1 conditioning latents
    (cond_latent, the keyframes) as clean + scale * eps * t^2, fresh eps each step, their timestep still 0; the
    result keeps the clean first frame (upstream's keeps the last step's, off by scale * t_last^2: 1e-4 at 40
    steps)."""
    B, C, f, h, w = noise.shape
    if timesteps is None:
        timesteps = sampling_sigmas(steps, sampler, f * h * w, shifting, terminal).tolist()
    ts = list(timesteps) + [0.0]
    n = len(timesteps)
    guidance = guidance if isinstance(guidance, (list, tuple)) else [guidance] * n
    stg = stg if isinstance(stg, list) else [stg] * n
    x = noise.float() if init is None else ts[0] * noise.float() + (1 - ts[0]) * init.float()
    hard = cond_latent if cond_latent is not None and cond_strength >= 1 else None
    soft = (cond_latent.shape[2], cond_strength) if cond_latent is not None and cond_strength < 1 else None
    a = cond_start
    span = slice(a, a + cond_latent.shape[2]) if cond_latent is not None else None  # the conditioned latent frames
    if soft:  # the pipeline's lerp(latents, media, strength) on those frames, then they are part of the state
        x[:, :, span] = (1 - cond_strength) * x[:, :, span] + cond_strength * cond_latent.to(x)
    keys = [(e[0], e[1], e[2] if len(e) > 2 else 1.0) for e in keyframe_list(keyframe)]
    moving = any(s < 1 for _, _, s in keys)  # keyframes that are part of the state
    if moving and keyframe_noise is None:
        raise ValueError("a keyframe below strength 1 starts from noise: pass keyframe_noise")
    state = [z if s >= 1 else (1 - s) * keyframe_noise[j].to(z) + s * z for j, (z, _, s) in enumerate(keys)]

    def step(z, v, t, t_next):  # Euler, or (renoise) the stochastic step
        if renoise is not None and t_next > 0:
            return (1 - t_next) * (z - t * v) + t_next * torch.randn(z.shape, generator=renoise).to(z.device)
        return z - (t - t_next) * v
    for i, (t, t_next) in enumerate(zip(ts[:-1], ts[1:])):
        c, ks = hard, [(z, p, s) for z, (_, p, s) in zip(state, keys)]
        if cond_noise is not None and cond_noise[0] > 0:  # the strength-1 ones, in order
            scale, gen = cond_noise
            if c is not None:
                c = c + scale * t**2 * torch.randn(c.shape, generator=gen).to(c)
            ks = [(z + scale * t**2 * torch.randn(z.shape, generator=gen).to(z) if s >= 1 else z, p, s)
                  for z, p, s in ks]
        v = velocity(model, x, t, context, neg, guidance[i], stg[i], frame_rate, c, ks or None, cfg_star, soft,
                     moving, a)
        v, kv = v if moving else (v, None)
        x_next = step(x, v, t, t_next)
        if soft and not t - 1e-6 < 1 - soft[1]:  # not yet at its noise level: held (the pipeline's denoise mask)
            x_next[:, :, span] = x[:, :, span]
        x = x_next
        for j, (_, _, s) in enumerate(keys):
            if s < 1 and t - 1e-6 < 1 - s:
                state[j] = step(state[j], kv[j], t, t_next)
    if hard is not None:
        x = torch.cat([x[:, :, :a], hard.to(x), x[:, :, a + hard.shape[2]:]], dim=2)
    return x


# The official sampling configs (LTX-Video configs/*.yaml: the fields sampling reads), for --sample_config NAME (or a
# .json file of the same fields). "base": one pass. "multi-scale": first_pass at downscale_factor of the size (each
# side floored to the VAE's stride), the latents doubled by the spatial upsampler (--sample_upscaler), matched to
# the first pass's statistics (adain), then second_pass at twice the first pass's size from its first timestep, and
# the decoded video resized (bilinear) to the asked size. A pass gives its schedule as `timesteps`, or as
# num_inference_steps of the checkpoint's schedule (--sample_schedule, default the header's) less
# skip_initial / skip_final_inference_steps; guidance_scale, stg_scale and rescaling_scale are numbers or lists
# picked per step by guidance_timesteps (pass_plan), skip_block_list one list or a list of lists.
_LTX_DECODE = dict(decode_timestep=0.05, decode_noise_scale=0.025, stg_mode="attention_values")
_DISTILLED_098 = dict(pipeline_type="multi-scale", downscale_factor=0.6666666, **_LTX_DECODE,
                      first_pass=dict(timesteps=[1.0, 0.9937, 0.9875, 0.9812, 0.975, 0.9094, 0.725],
                                      guidance_scale=1, stg_scale=0, rescaling_scale=1, skip_block_list=[42]),
                      second_pass=dict(timesteps=[0.9094, 0.725, 0.4219], guidance_scale=1, stg_scale=0,
                                       rescaling_scale=1, skip_block_list=[42]))
SAMPLE_CONFIGS = {
    "ltxv-2b-0.9.6-dev": dict(pipeline_type="base", guidance_scale=3, stg_scale=1, rescaling_scale=0.7,
                              skip_block_list=[19], num_inference_steps=40, **_LTX_DECODE),
    "ltxv-2b-0.9.6-distilled": dict(pipeline_type="base", guidance_scale=1, stg_scale=0, rescaling_scale=1,
                                    num_inference_steps=8, stochastic_sampling=True, **_LTX_DECODE),
    "ltxv-13b-0.9.8-dev": dict(
        pipeline_type="multi-scale", downscale_factor=0.6666666, **_LTX_DECODE,
        first_pass=dict(guidance_scale=[1, 1, 6, 8, 6, 1, 1], stg_scale=[0, 0, 4, 4, 4, 2, 1],
                        rescaling_scale=[1, 1, 0.5, 0.5, 1, 1, 1],
                        guidance_timesteps=[1.0, 0.996, 0.9933, 0.9850, 0.9767, 0.9008, 0.6180],
                        skip_block_list=[[], [11, 25, 35, 39], [22, 35, 39], [28], [28], [28], [28]],
                        num_inference_steps=30, skip_final_inference_steps=3, cfg_star_rescale=True),
        second_pass=dict(guidance_scale=[1], stg_scale=[1], rescaling_scale=[1], guidance_timesteps=[1.0],
                         skip_block_list=[27], num_inference_steps=30, skip_initial_inference_steps=17,
                         cfg_star_rescale=True)),
    "ltxv-13b-0.9.8-distilled": {**_DISTILLED_098, "second_pass": {**_DISTILLED_098["second_pass"],
                                                                   "tone_map_compression_ratio": 0.6}},
    "ltxv-2b-0.9.8-distilled": _DISTILLED_098,
}
UPSCALER_FILE = "ltxv-spatial-upscaler-0.9.8.safetensors"  # the configs' spatial_upscaler_model_path


def pass_timesteps(p, schedule, n_tokens):
    """One pass's timesteps (python floats, fp32 values): its `timesteps`, or num_inference_steps of
    sampling_sigmas(schedule = (sampler, shifting, terminal), n_tokens of this pass) with the first
    skip_initial_inference_steps and the last skip_final_inference_steps left out (retrieve_timesteps); the
    sampler steps from the last of them to 0."""
    if "timesteps" in p:
        return torch.tensor(p["timesteps"], dtype=torch.float32).tolist()
    n = p["num_inference_steps"]
    a, b = p.get("skip_initial_inference_steps", 0), p.get("skip_final_inference_steps", 0)
    if a < 0 or b < 0 or a + b >= n:
        raise ValueError(f"skip_initial_inference_steps {a} + skip_final_inference_steps {b}: must be >= 0 and "
                         f"together fewer than num_inference_steps {n}")
    return sampling_sigmas(n, *schedule, n_tokens)[a: n - b].tolist()


def pass_plan(p, ts):
    """-> (guidance, stg), one entry per timestep of ts, as the pipeline spreads a pass's values: a number applies
    at every step; a list is indexed per step by guidance_timesteps, the first entry <= t (else the last one).
    skip_block_list: one list of blocks for every step, or a list of lists indexed the same way. stg entries:
    (stg_scale, blocks, rescaling_scale), None where stg_scale is 0."""
    gt = torch.tensor(p["guidance_timesteps"], dtype=torch.float32).tolist() if p.get("guidance_timesteps") else None
    idx = [next((j for j, g in enumerate(gt) if g <= t), len(gt) - 1) for t in ts] if gt else None

    def per_step(v, nested=False):
        if not isinstance(v, list) or (nested and not (v and isinstance(v[0], list))):
            return [v] * len(ts)
        if idx is None:
            raise ValueError(f"a per-timestep list {v} needs guidance_timesteps")
        return [v[j] for j in idx]
    g = [float(x) for x in per_step(p.get("guidance_scale", 1.0))]
    scale, rescale = per_step(p.get("stg_scale", 0.0)), per_step(p.get("rescaling_scale", 1.0))
    blocks = per_step(p.get("skip_block_list", []), nested=True)
    return g, [(float(s), tuple(b), float(r)) if s > 0 else None for s, b, r in zip(scale, blocks, rescale)]


# -----------------------------------------------------------------------------------------------------
# Flags (common/args.py turns every field into --name value; the comment is its --help). The same names as
# train_wan.py wherever the concept is the same.

CKPT_FILES = {"2B": "ltxv-2b-0.9.6-dev-04-25.safetensors", "13B": "ltxv-13b-0.9.8-dev.safetensors"}


@dataclass
class Args:
    mode: str = "train"  # train | cache (encode the dataset, stop) | sample (videos for --sample_prompts) | bench
    preset: str = "2B"  # toy | tiny | 2B | 13B (with --ckpt_dir or --dit_path the checkpoint's own config wins)
    ckpt_dir: str = ""  # an official ltxv-*.safetensors (DiT + VAE), or the Lightricks/LTX-Video folder holding it
    ckpt_file: str = ""  # the ltxv-*.safetensors inside --ckpt_dir when it is a folder; default per --preset
    text_encoder: str = ""  # the T5 folder (text_encoder/ + tokenizer/); default: --ckpt_dir when it is a folder
    dit_path: str = ""  # a DiT elsewhere than ckpt_dir: our model.safetensors, a diffusers folder
    encoders: str = "official"  # official (the VAE of --ckpt_dir and T5) | toy (pixels folded 4x4, toy words)
    data: str = ""  # a folder of videos/images + same-name .txt captions, or a .jsonl/.csv; several: clips/,stills/*3
    cache_dir: str = "cache"  # encoded latents and text embeddings (keyed by content and settings)
    out_dir: str = ""  # the run folder; default runs/ltx-<preset> (runs/ltx-<preset>-sample for --mode sample)
    # data
    height: int = 512  # the bucket area is height*width; buckets keep that area at other aspect ratios
    width: int = 768  # (sides are multiples of 32, the VAE's stride)
    frames: int = 49  # the most frames of a clip (8k+1); shorter videos get the largest 8k+1 that fits
    min_frames: int = 1  # shorter clips are skipped
    fps: int = 24  # videos are resampled to this rate, which is also the frame rate in the RoPE grid
    clips_per_video: int = 1  # consecutive clips from one long video (0 = as many as fit)
    val_count: int = 0  # source files held out for the validation loss
    caption_dropout: float = 0.0  # probability that a sample trains with the empty prompt (what guidance contrasts)
    first_frame_p: float = 0.1  # image-to-video: probability that a sample's first latent frame is given clean
    prefix_p: float = 0.0  # video extension: probability that a sample's first k latent frames (k random) are clean
    last_frame_p: float = 0.0  # keyframe: probability that a step's samples see their last frame as a keyframe
    keyframe_p: float = 0.0  # keyframe: probability that a step's samples see frame 8j (j random, 1..f-1) as one
    reference: bool = False  # IC-LoRA: every sample trains with its reference clip (or image) clean in front, at its
    #   own positions (LTX-Video-Trainer's reference_video); samples without one are skipped (README, LTX-Video)
    reference_dir: str = ""  # the references of folder sources, by the same relative names (a jsonl/csv: its field)
    # LoRA (rank 0 = full fine-tune)
    lora_rank: int = 0  # LoRA rank; 0 = full fine-tune
    lora_alpha: float = 0.0  # LoRA alpha; 0 = the rank (scale 1)
    lora_targets: str = LORA_TARGETS  # the Linears (inside each block) that get an adapter; + ff.net.0.proj,ff.net.2
    lora_plus: float = 1.0  # LoRA+: lora_B learns at this multiple of --lr (the paper: 16; musubi's loraplus_lr_ratio)
    lora: str = ""  # --mode sample: a LoRA file to apply (ours, ComfyUI's)
    init_lora: str = ""  # train: the adapter starts from this LoRA file, with its rank, alpha and targets (as --lora)
    base_lora: str = ""  # merged into the frozen base first (train, sample): PATH[:MULT],...
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
    seed: int = 0  # one seed for init, data order, noise, sigmas, caption dropout and first-frame conditioning
    timestep_sampling: str = "shifted_logit_normal"  # shifted_logit_normal (mean by tokens) | logit_normal | uniform
    shift: float = 1.0  # applied to the sampled sigmas when != 1 (see sample_sigmas)
    # speed
    dtype: str = "auto"  # compute dtype of the blocks: auto (bf16 on GPU, fp32 on CPU) | bf16 | fp32
    ac: int = 0  # activation checkpointing per block: 1; 2: with its saved inputs in CPU memory (common/fsdp.py)
    ac_interval: int = 1  # with --ac: checkpoint every N-th block only (2: every other one): faster, more memory
    compile: bool = False  # torch.compile per block, in place
    sp: int = 1  # sequence parallelism (Ulysses, common/sp.py): N consecutive ranks share each sample, split its tokens
    shard: int = 0  # FSDP2 shards each weight over N ranks, replicated across world/N (HSDP; 1: as DDP); 0 = all ranks
    preflight: bool = True  # before step 1, one forward + backward of the largest bucket (common/preflight.py)
    # memory, for a LoRA on one GPU (common/float8.py, common/offload.py; README, LTX-Video: "memory options")
    base_dtype: str = "auto"  # frozen base of the blocks: auto (compute dtype) | float8 (e4m3 + row scales: half bf16)
    offload: bool = False  # blocks' frozen base in (pinned) CPU memory, copied to the device a block ahead (exact)
    # checkpoints, samples, validation, logging
    ckpt_every: int = 0  # write a checkpoint every N steps (0 = only when stopped by a signal)
    keep: int = 3  # keep the newest K checkpoints (0 = all)
    resume: bool = False  # continue the run in --out_dir from its newest valid checkpoint (none: start fresh)
    sample_every: int = 0  # write sample videos every N steps (0 = only at the end)
    sample_prompts: str = ""  # prompts separated by |, or a text file with one per line
    sample_negative: str = "official"  # negative prompt for guidance: official (LTX-Video's own) or any text
    sample_image: str = ""  # image-to-video samples: an image (or video: its first frame) as the first frame
    sample_video: str = ""  # video-extension samples: the first --sample_video_frames frames of this video, given
    sample_video_frames: int = 9  # how many frames of --sample_video the samples continue (1 + 8k)
    sample_video_start: int = 0  # the pixel frame (8m) where those frames go: 0 continues them, later extends back
    sample_last_image: str = ""  # samples with this image (or a video's first frame) as a keyframe at the last frame
    sample_keyframe_frame: int = -1  # the pixel frame of --sample_last_image's keyframe (-1: the last frame)
    sample_keyframes: str = ""  # more keyframes for the samples: image@frame[:strength],... (frame -1: the last)
    sample_image_strength: float = 1.0  # the conditioning strength of --sample_image / --sample_video (1: exact)
    sample_image_crf: int = 29  # the conditioning images / frames blurred and H.264-compressed at this CRF, as the
    #   official inference does (condition_pixels); 0 = the pixels as read (--sample_reference: always, as trained)
    sample_reference: str = ""  # IC-LoRA samples: this reference video (its first frames) or image, at their size
    sample_steps: int = 40  # sampler steps
    sample_guidance: float = 3.0  # classifier-free guidance scale (<= 1: none, as the official pipeline)
    sample_stg: float = 1.0  # spatio-temporal guidance scale (0 = none)
    sample_stg_blocks: str = "19"  # the blocks STG perturbs (comma-separated)
    sample_rescale: float = 0.7  # the guidance rescaling of the official configs (with STG)
    sample_schedule: str = "checkpoint"  # checkpoint (header) | LinearQuadratic | Uniform | distilled (no CFG/STG)
    sample_stochastic: bool = False  # re-noise between steps (the 0.9.6-distilled config's stochastic sampling)
    sample_config: str = ""  # an official config (ltxv-13b-0.9.8-dev, ...) or its .json: replaces --sample_*/--decode_*
    sample_upscaler: str = ""  # the multi-scale configs' latent upsampler (default: ltxv-spatial-upscaler-0.9.8 there)
    sample_cond_noise: float = 0.15  # noise on the image / keyframe latents, x t^2 each step (inference.py's default)
    sample_frames: int = 0  # frames of the samples; 0 = --frames
    decode_timestep: float = 0.05  # the VAE decoder's timestep (the official configs)
    decode_noise: float = 0.025  # the decode noise of every official config (decode_noise_scale); 0 = none
    val_every: int = 0  # validation loss every N steps (needs --val_count)
    log_every: int = 10  # a log line (log.jsonl) every N steps
    tensorboard: bool = False  # also log to TensorBoard (<out_dir>/tb)
    wandb: str = ""  # also log to this W&B project
    # bench
    bench_steps: int = 5  # timed steps (after 2 warm-up steps)
    peak_tflops: float = 0.0  # the device's dense bf16 peak for MFU; 0 = known GPUs by name (H100: 989)


# The toy preset: a tiny DiT trained from scratch on the synthetic dataset that data/toy.py writes, on CPU, in
# minutes (--encoders toy: no VAE, no T5). These are the defaults of --preset toy; flags on the command line win.
TOY_PROMPTS = "|".join(DEMO_PROMPTS)  # data/toy.py: one per direction, the dataset's first clips
# --preset tiny is the tests' random config: its default clip is small too (flags still override), so that
# `--mode bench --preset tiny` takes seconds on a CPU, not the minutes of the released size's default shape
TINY_ARGS = dict(height=64, width=64, frames=9)

TOY_ARGS = dict(encoders="toy", data="toy_data", height=32, width=32, frames=5, fps=4, global_batch=16, micro_batch=0,
                lr=3e-3, warmup_steps=20, max_steps=600, weight_decay=0.0, timestep_sampling="logit_normal",
                log_every=50, caption_dropout=0.1, ema=0.99, ema_export=True, sample_prompts=TOY_PROMPTS,
                sample_negative="", sample_steps=30, sample_guidance=3.0, sample_stg=0.0, first_frame_p=0.0,
                sample_schedule="Uniform", val_count=4, val_every=100, decode_timestep=0.0)

# What a latent is per --encoders: the stride of the encoder in (frames, height, width). The VAE maps 1 + 8k frames
# of H x W to 1 + k latent frames of H/32 x W/32; the toy folds 4x4 pixels into channels and keeps every frame.
LATENT_STRIDE = {"official": (8, 32, 32), "toy": (1, 4, 4)}


def check_args(args):
    """Every mistake that the flags alone show, as one UserError line, before any work is done."""
    def need(ok, msg):
        if not ok:
            raise UserError(msg)
    choices = dict(mode=("train", "cache", "sample", "bench"), encoders=tuple(LATENT_STRIDE),
                   lr_schedule=("constant", "cosine"), dtype=("auto", "bf16", "fp32"), base_dtype=("auto", "float8"),
                   timestep_sampling=("shifted_logit_normal", "logit_normal", "uniform"),
                   sample_schedule=("checkpoint", "LinearQuadratic", "Uniform", "distilled"))
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
    need(0 <= args.sample_image_crf <= 51, f"--sample_image_crf {args.sample_image_crf}: expected 0 (off) to 51 "
         "(libx264's CRF range)")
    for k in ("caption_dropout", "ema", "first_frame_p", "prefix_p", "last_frame_p", "keyframe_p", "decode_noise",
              "sample_cond_noise"):
        need(0 <= getattr(args, k) < 1, f"--{k} {getattr(args, k)} must be in [0, 1)")
    need(args.last_frame_p + args.keyframe_p <= 1, f"--last_frame_p {args.last_frame_p} + --keyframe_p "
         f"{args.keyframe_p}: one step draws one of them, so together at most 1")
    st, sh, sw = LATENT_STRIDE[args.encoders]
    need(args.height % sh == 0 and args.width % sw == 0 and args.height > 0 and args.width > 0,
         f"--height {args.height} --width {args.width}: both must be positive multiples of {sh} (the encoder's stride)")
    for k in ("frames", "sample_frames"):
        n = getattr(args, k)
        need((n == 0 and k == "sample_frames") or (n >= 1 and (n - 1) % st == 0),
             f"--{k} {n}: must be 1 + {st}k (the VAE compresses {st} frames into one latent after the first)")
    try:
        stg_blocks = [int(b) for b in args.sample_stg_blocks.split(",") if b.strip()]
    except ValueError:
        stg_blocks = None
    need(stg_blocks is not None, f"--sample_stg_blocks {args.sample_stg_blocks!r}: expected block numbers like 19,20")
    need(not args.sample_config or args.sample_config in SAMPLE_CONFIGS or os.path.isfile(args.sample_config),
         f"--sample_config {args.sample_config!r}: expected one of {', '.join(SAMPLE_CONFIGS)} or a .json file")
    need(not (args.sample_config and args.sample_schedule == "distilled"), "--sample_schedule distilled is the "
         "distilled configs' first pass; with --sample_config the config's own timesteps apply: pass one of them")
    need(not args.lora or args.mode == "sample", "--lora applies a LoRA file in --mode sample; to train one use "
         "--lora_rank")
    need(not args.init_lora or args.mode == "train", "--init_lora starts a training run's adapter from a file; "
         "to sample with one use --lora")
    need(not args.base_lora or args.mode in ("train", "sample"), "--base_lora merges a LoRA into the base of a "
         "training or sampling run")
    for k in ("ckpt_dir", "dit_path", "lora", "text_encoder", "sample_image", "sample_video", "sample_last_image",
              "sample_reference", "reference_dir"):
        need(not getattr(args, k) or os.path.exists(getattr(args, k)),
             f"--{k} {getattr(args, k)}: no such file or folder")
    frames = args.sample_frames or args.frames
    need(not (args.sample_image and args.sample_video), "--sample_image and --sample_video both give the first "
         "frames: pass one" if not args.sample_video_start else "--sample_image with a --sample_video_start clip: "
         "not implemented (one in-place conditioning per sample)")
    n, at = args.sample_video_frames, args.sample_video_start
    need(not args.sample_video or (0 < n < frames and (n - 1) % st == 0), f"--sample_video_frames {n}: expected "
         f"1 + {st}k frames, fewer than the samples' {frames}")
    need(at == 0 or (args.sample_video and at > 0 and at % st == 0 and at + n <= frames), f"--sample_video_start "
         f"{at}: expected a pixel frame 8m (a multiple of {st}) where --sample_video's {n} frames fit in the "
         f"{frames}-frame samples (at most {frames - n})")
    need(args.sample_keyframe_frame == -1 or 0 < args.sample_keyframe_frame < frames, f"--sample_keyframe_frame "
         f"{args.sample_keyframe_frame}: expected -1 (the last frame) or a frame 1..{frames - 1} of the "
         f"{frames}-frame samples (frame 0 is --sample_image's)")
    try:
        keys = sample_keyframes(args)
    except ValueError:
        keys = None
    need(keys is not None, f"--sample_keyframes {args.sample_keyframes!r}: expected image@frame[:strength],...")
    for path, n, strength in keys[1 if args.sample_last_image else 0:]:
        need(os.path.exists(path), f"--sample_keyframes: {path}: no such file")
        need(n == -1 or 0 < n < frames, f"--sample_keyframes: {path}@{n}: expected -1 (the last frame) or a frame "
             f"1..{frames - 1} of the {frames}-frame samples")
        need(0 < strength <= 1, f"--sample_keyframes: {path}@{n}:{strength}: a strength in (0, 1]")
    need(0 < args.sample_image_strength <= 1, f"--sample_image_strength {args.sample_image_strength}: expected a "
         "strength in (0, 1]")
    need(not args.reference_dir or args.reference, "--reference_dir names the references of --reference 1 (IC-LoRA)")
    if args.sample_video and os.path.exists(args.sample_video):  # its first n frames at --fps must be there
        try:
            vid = probe(args.sample_video)
        except Exception as e:
            raise UserError(f"--sample_video {args.sample_video}: not a readable video ({e})") from None
        need(frames_available(vid["duration"], 0.0, args.fps) >= n, f"--sample_video {args.sample_video}: "
             f"{vid['duration']:.3f}s holds fewer than --sample_video_frames {n} frames at --fps {args.fps}")
    if args.sample_reference:
        try:
            ref = probe(args.sample_reference)
        except Exception as e:
            raise UserError(f"--sample_reference {args.sample_reference}: not a readable video or image ({e})") \
                from None
        need(ref["is_image"] or frames_available(ref["duration"], 0.0, args.fps) >= frames, f"--sample_reference "
             f"{args.sample_reference}: {ref['duration']:.3f}s holds fewer than the samples' {frames} frames at "
             f"--fps {args.fps}")
    cfg = dit_config(args) if args.lora or args.init_lora or args.base_lora else None
    if args.lora:  # read and fitted to the model now, not after the prompts are encoded
        lora_for(args.lora, cfg)
    if args.init_lora:
        # the run's rank, alpha and targets are the file's, set here so that every later check sees a LoRA run
        need(os.path.isfile(args.init_lora), f"--init_lora {args.init_lora}: no such file")
        diffs = {}
        lsd, r, a = lora_for(args.init_lora, cfg, diffs)
        need(not diffs and all(k.startswith("transformer_blocks.") for k in lsd), f"--init_lora {args.init_lora}: "
             "its full-weight deltas (.diff / .diff_b) or adapters outside the blocks cannot train as LoRA adapters: "
             "merge it into the base with --base_lora")
        lora_file.adopt(args, r, a, lora_file.targets_of(lsd), LORA_TARGETS)
    for _, path, _ in lora_file.parse_list(args.base_lora):
        need(os.path.isfile(path), f"--base_lora {path}: no such file")
        lora_for(path, cfg, {})
    weights = args.dit_path or args.ckpt_dir
    if args.mode in ("train", "cache"):
        need(args.data, "--data is needed: a folder of videos/images with .txt captions, or a .jsonl / .csv")
    if args.mode in ("train", "cache", "sample") and args.encoders == "official":
        need(args.ckpt_dir, f"--mode {args.mode} needs --ckpt_dir: the official ltxv-*.safetensors (for its VAE), "
             "or --encoders toy")
        need(args.text_encoder or os.path.isdir(args.ckpt_dir), f"--mode {args.mode} needs --text_encoder: the T5 "
             "folder (PixArt-alpha/PixArt-XL-2-1024-MS or Lightricks/LTX-Video, with text_encoder/ and tokenizer/)")
    if args.mode == "train":
        need(weights or args.preset in ("toy", "tiny"), f"--preset {args.preset} trains from the released weights: "
             "pass --ckpt_dir (random init is for the toy and tiny presets only)")
        need(not (args.lora_rank and not weights), "--lora_rank needs base weights to adapt: --ckpt_dir or --dit_path")
    need(args.lora_plus > 0 and (args.lora_plus == 1 or args.lora_rank), f"--lora_plus {args.lora_plus}: the "
         "multiple of --lr at which a LoRA's B matrices learn, > 0, for a LoRA run (--lora_rank or --init_lora)")
    memory.check_flags(args)  # --base_dtype float8 / --offload 1: where they do not apply
    if args.mode == "sample":
        need(weights, "--mode sample needs trained weights: --dit_path (e.g. runs/ltx-toy/model.safetensors) or "
             "--ckpt_dir")
        need(prompts_from(args.sample_prompts), "--mode sample needs --sample_prompts ('a|b', or a file)")


# -----------------------------------------------------------------------------------------------------
# The pieces main() puts together


def ckpt_file(args):
    """The official single file: --ckpt_dir itself, or --ckpt_file (default: the preset's release) inside it; or
    --ckpt_dir itself when it is a diffusers folder (transformer/ + vae/, text_encoder/, tokenizer/) and holds no
    such file. The Hugging Face repo Lightricks/LTX-Video has both: the ltxv-*.safetensors releases next to the
    0.9.0 model as diffusers folders, so the preset's file comes first."""
    if not args.ckpt_dir or os.path.isfile(args.ckpt_dir):
        return args.ckpt_dir
    name = args.ckpt_file or CKPT_FILES.get(args.preset, "")
    path = os.path.join(args.ckpt_dir, name)
    if not args.ckpt_file and not (name and os.path.isfile(path)) and \
            all(os.path.isfile(os.path.join(args.ckpt_dir, d, "config.json")) for d in ("transformer", "vae")):
        return args.ckpt_dir
    if not name or not os.path.isfile(path):
        found = sorted(os.path.basename(f) for f in glob.glob(os.path.join(args.ckpt_dir, "ltxv-*.safetensors")))
        raise UserError(f"--ckpt_dir {args.ckpt_dir}: no {name or 'checkpoint'} in it; pass --ckpt_file (there: "
                        f"{', '.join(found) or 'no ltxv-*.safetensors'})")
    return path


def toy_encoders(cfg):
    """The toy's (encode_video, decode_video, encode_text, settings): data/toy.py's pixel video and word embedding,
    the pixels folded 4x4 into 48 channels (the VAE's own patchify), the text trimmed to its true length."""
    from data.toy import toy_encoders as pixel_encoders
    _, _, words, settings = pixel_encoders(cfg.caption_channels, 32)

    def enc_t(prompts):
        x = words(prompts)  # (B, 32, D) zero-padded after the <end> row
        n = int((x.abs().sum(-1) > 0).sum(1).max())
        return x[:, :n]
    def dec_v(z, tone_map=0.0):
        return unpatchify(tone_map_latents(z.float(), tone_map) if tone_map else z.float(), 4).clamp(-1, 1)
    return (lambda v: patchify(v, 4)), dec_v, enc_t, \
        {**settings, "model": "ltx-toy", "vae": "pixels-4x4"}


def encoder_settings(args, cfg, device):
    """What identifies the encoding of a clip or caption, for the cache key (data/cache.py). With --last_frame_p the
    entries also hold the last frame encoded alone ("latents.last"), with --keyframe_p every frame 8j alone
    ("latents.frames"): other keys, so an older cache is not mixed in."""
    if args.encoders == "toy":
        s = toy_encoders(cfg)[3]
    else:
        s = dict(model="ltx-video-0.9.5+", vae=os.path.abspath(ckpt_file(args)), text="t5-v1_1-xxl", text_len=TEXT_LEN,
                 text_encoder=os.path.abspath(args.text_encoder or args.ckpt_dir),
                 text_dtype="bf16" if device.type == "cuda" else "fp32")
    kinds = "+".join(k for k, p in (("last", args.last_frame_p), ("frames", args.keyframe_p)) if p)
    return {**s, "keyframe": kinds} if kinds else s


def last_frame_index(f):
    """The pixel frame of the last frame of a clip of f latent frames (8(f - 1) + 1 frames): where its keyframe sits
    (the pipeline's media_frame_number of an image conditioning the last frame). In the RoPE grid's units for the
    toy encoders too (rope_grid counts 8 pixel frames a latent frame whatever the encoder)."""
    return (f - 1) * VAE_TEMPORAL


def with_keyframes(enc_v, last=True, frames=False, stride=VAE_TEMPORAL):
    """encode_video -> one that also encodes single frames of the clip ALONE: its last frame, {"last": (1, C, 1, h,
    w)} (--last_frame_p), and/or the frame at each latent-frame boundary, pixel frame stride * j for j = 1..f-1,
    {"frames": (1, C, f - 1, h, w)}, frame j - 1 of it being pixel frame stride * j (--keyframe_p; its last is the
    clip's last frame); with {None: the clip's latents}. Stored as "latents", "latents.last", "latents.frames"
    (data/cache.py). A causal VAE encodes a lone frame as an image, which is what a keyframe is at sampling time
    (prepare_conditioning encodes the image alone), and not what the clip's own latent frame holds (8 frames, after
    the ones before them). A one-frame clip has no keyframe: its entries are the clip itself."""
    def enc(v):  # (1, 3, F, H, W)
        z = enc_v(v)
        out = {None: z}
        if last:
            out["last"] = z if v.shape[2] == 1 else enc_v(v[:, :, -1:])
        if frames:
            out["frames"] = z if z.shape[2] == 1 else torch.cat([enc_v(v[:, :, stride * j: stride * j + 1])
                                                                 for j in range(1, z.shape[2])], dim=2)
        return out
    return enc


def build_encoders(args, cfg, device, video=True, text=True):
    """-> (encode_video, decode_video, encode_text) as plain functions (None for the parts not asked for). Built only
    while caching and sampling, so that neither the VAE nor T5 is in memory while the DiT trains."""
    if args.encoders == "toy":
        return toy_encoders(cfg)[:3]
    enc_v = dec_v = enc_t = None
    if video:
        vae = load_vae(ckpt_file(args), dtype=torch.float32, device=device)  # fp32, as the tests check it
        enc_v = lambda v: vae.encode(v.to(device)).cpu()  # noqa: E731
        dec_v = lambda z, tone_map=0.0: vae.decode(z.float().to(device), args.decode_timestep,  # noqa: E731
                                                   args.decode_noise, torch.Generator().manual_seed(args.seed),
                                                   tone_map=tone_map)
    if text:
        te = load_text_encoder(args.text_encoder or args.ckpt_dir, device=device,
                               dtype=torch.bfloat16 if device.type == "cuda" else torch.float32)

        def enc_t(prompts):  # trimmed to the longest true length: the padding is masked in the DiT, so this is exact
            ctx, mask = te.encode(prompts)
            return ctx[:, : int(mask.sum(1).max())].float()
    return enc_v, dec_v, enc_t


def dit_config(args):
    if args.dit_path or args.ckpt_dir:
        return dit_source(args.dit_path or ckpt_file(args))[2]
    return DIT_PRESETS[args.preset]


def read_dit_weights(args, cfg, rank, dtype):
    """The full state dict on rank 0 (None elsewhere): the checkpoint, read straight into `dtype`, or a fresh init
    (seeded) for the toy and tiny presets."""
    if rank != 0:
        return None
    if args.dit_path or args.ckpt_dir:
        return read_dit_checkpoint(args.dit_path or ckpt_file(args), dtype)[1]
    with torch.random.fork_rng():
        torch.manual_seed(args.seed)
        m = Transformer3DModel(cfg)
        m.init_weights()
    return m.state_dict()


def build_dit(args, cfg, sd, device, compute_dtype, lora_alpha=None, sp_group=None):
    """meta build -> LoRA -> FSDP2 (+AC, compile) -> storage on the device -> weights broadcast from rank 0.
    `sd`: the full state dict on rank 0 (None on the others), or "random" for --mode bench without weights.
    sp_group: --sp's group of this rank (None: every rank holds its samples whole)."""
    rank = torch.distributed.get_rank()
    with torch.device("meta"):
        model = Transformer3DModel(cfg)
    model.sp = sp_group
    if args.lora_rank:
        model.transformer_blocks.to(compute_dtype)  # the frozen base in the compute dtype: half the memory in bf16
        add_lora(model, args.lora_rank, lora_alpha or args.lora_alpha or args.lora_rank, args.lora_targets)
        if rank == 0 and sd != "random" and not any(".lora_" in k for k in sd):
            sd.update(lora_init_state(model, args.seed))
    where = args.dit_path or args.ckpt_dir or "init"
    if rank == 0 and sd != "random":
        check_keys(model.state_dict().keys(), sd, where, hint=DIT_HINT)
        check_shapes(model.state_dict(), sd, where)
    one_gpu = memory.wanted(args)  # --base_dtype float8 / --offload 1: the base is loaded and converted on the CPU
    if one_gpu:
        memory.prepare(model, [model.transformer_blocks], sd, device, compute_dtype, args)
    parallelize(model, model.transformer_blocks, compute_dtype, ac=args.ac, compile=args.compile,
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
    """(C, f, h, w) of the latents of a frames x height x width clip."""
    st, sh, sw = LATENT_STRIDE[args.encoders]
    return (cfg.in_channels, (frames - 1) // st + 1, args.height // sh, args.width // sw)


def count_flops(cfg: LTXConfig, n, text_len=TEXT_LEN):
    """Forward FLOPs of one sample of n tokens: 2 per multiply-add of every Linear, plus attention (4 N N' D).
    Training is reported against 3x this (as train_wan.py)."""
    d, L = cfg.dim, text_len
    per_block = 2 * n * 4 * d * d + 4 * n * n * d  # self-attention
    per_block += 2 * (n * 2 * d * d + L * 2 * d * d) + 4 * n * L * d  # cross-attention
    per_block += 2 * n * 8 * d * d  # FFN (4x)
    rest = 2 * n * (cfg.in_channels + cfg.out_channels) * d + 2 * L * (cfg.caption_channels * d + d * d)
    return cfg.num_layers * per_block + rest


def training_draws(args, step, index, n, n_tokens, device, frames=1):
    """sigma (n,) on `device`, caption-dropout flags (n,) bool and conditioning frames (n,) long on CPU for the samples
    index, index+1, ... of the global batch of `step`: a pure function of (seed, step, index), so 1 or N ranks and a
    resumed run agree. n_tokens: the token count of the batch's bucket (the shifted sampler's mean depends on it);
    frames: its latent frames. Conditioning frames: k in 1..frames-1 with --prefix_p (video extension), else 1 with
    --first_frame_p (image-to-video), else 0 (the first-frame draw is the same with or without --prefix_p)."""
    sig, drop, cond = [], [], []
    for j in range(n):
        g = noise.generator(args.seed, step, index + j)
        sig.append(sample_sigmas(1, args.timestep_sampling, n_tokens, args.shift, generator=g))
        drop.append(torch.rand(1, generator=g) < args.caption_dropout)
        first = torch.rand(1, generator=g) < args.first_frame_p
        prefix, u = torch.rand(2, generator=g).tolist()
        cond.append(torch.tensor([1 + int(u * (frames - 1)) if prefix < args.prefix_p and frames > 1 else int(first)]))
    return torch.cat(sig).to(device, non_blocking=True), torch.cat(drop), torch.cat(cond)


def keyframe_draw(args, step):
    """The keyframe step `step` trains with: None, "last" (--last_frame_p) or a number u in [0, 1) that picks the
    frame (--keyframe_p; batch_keyframe). One draw per step, not per sample, because the keyframe's tokens lengthen
    the sequence and one batch has one length; a pure function of (seed, step), so every rank, micro-batch and
    resumed run agrees."""
    if not (args.last_frame_p or args.keyframe_p):
        return None
    u = torch.rand(2, generator=noise.generator(args.seed, step, "keyframe")).tolist()
    if u[0] < args.last_frame_p:
        return "last"
    return u[1] if u[0] < args.last_frame_p + args.keyframe_p else None


def batch_keyframe(b, x0, device, draw="last"):
    """The keyframe of a cached batch for the step's draw (keyframe_draw): "last", its clips' last frames
    (B, C, 1, h, w), each encoded alone, at the last frame's pixel index; u, the frame at boundary j = 1 + floor(u
    (f - 1)), pixel frame 8j, from "latents.frames". None for no draw and for one-frame clips."""
    f = x0.shape[2]
    if draw is None or f == 1:
        return None
    if draw == "last":
        return b["latents.last"].to(device, non_blocking=True).float(), last_frame_index(f)
    j = 1 + int(draw * (f - 1))
    return b["latents.frames"][:, :, j - 1: j].to(device, non_blocking=True).float(), VAE_TEMPORAL * j


def batch_keyframes(b, x0, device, draw, reference=False):
    """The model's keyframe argument for a cached batch: with --reference (IC-LoRA) its reference clip's latents at
    pixel frame 0, so at the target's own RoPE positions frame by frame (LTX-Video-Trainer's reference_video: the
    same coordinates, timestep 0, out of the loss), then the step's keyframe (batch_keyframe); None for neither."""
    keys = [(b["reference"].to(device, non_blocking=True).float(), 0)] if reference else []
    return keys + keyframe_list(batch_keyframe(b, x0, device, draw)) or None


def training_noise(args, step, index, shape, n, device):
    """(n, *shape) noise made on the training device, one seeded generator per sample (no host-to-device copy)."""
    return torch.stack([noise.randn(shape, args.seed, step, index + j, "noise", device=device) for j in range(n)])


def reduce_now(args, m, n):
    """Whether micro-batch m of n reduce-scatters its gradients: a full fine-tune every micro-batch (an unsharded fp32
    gradient of every weight would otherwise be kept), a LoRA once per step."""
    return args.lora_rank == 0 or m == n - 1


def text_batch(b, device):
    """The batch's context (B, L, D) fp32 and its mask (B, L): the cache stores each caption at its true length and
    load_batch zero-pads to the longest, with text_lens when they differ."""
    ctx = b["text"].to(device, non_blocking=True).float()
    B, L = ctx.shape[:2]
    lens = b.get("text_lens")
    mask = torch.ones(B, L, device=device) if lens is None else \
        (torch.arange(L)[None] < lens[:, None]).float().to(device)
    return ctx, mask


def drop_captions(ctx, mask, drop, empty):
    """The rows where drop (B,) is True get the empty prompt's context `empty` (n, D) and its mask."""
    if not drop.any():  # a CPU tensor: no device sync
        return ctx, mask
    L = max(ctx.shape[1], empty.shape[0])
    ctx, mask = F.pad(ctx, (0, 0, 0, L - ctx.shape[1])), F.pad(mask, (0, L - mask.shape[1]))
    e = F.pad(empty.to(ctx), (0, 0, 0, L - empty.shape[0]))
    em = (torch.arange(L, device=ctx.device) < empty.shape[0]).float()
    d = drop.to(ctx.device)
    return torch.where(d.view(-1, 1, 1), e[None], ctx), torch.where(d.view(-1, 1), em[None], mask)


def val_loss(model, val_idx, val, device, fps, reference=False):
    """Mean flow loss over the held-out clips at fixed sigmas with fixed noise (no conditioning but, with
    --reference, the reference an IC-LoRA is trained to follow). Collective."""
    sigmas = [0.1, 0.3, 0.5, 0.7, 0.9]
    total = torch.zeros(2, dtype=torch.float64, device=device)
    with torch.no_grad():
        for idx in val_idx:
            b = load_batch([val[i]["file"] for i in idx])
            x0 = b["latents"].to(device).float()
            ctx, mask = text_batch(b, device)
            for j, s in enumerate(sigmas):
                eps = torch.stack([noise.randn(x0.shape[1:], "val", val[i]["key"], j, device=device) for i in idx])
                loss = flow_loss(model, x0, ctx, mask, torch.full((len(idx),), s, device=device), eps, fps,
                                 keyframe=batch_keyframes(b, x0, device, None, reference))
                total += torch.stack([loss.double() * len(idx), torch.tensor(float(len(idx)), device=device).double()])
    torch.distributed.all_reduce(total)
    return (total[0] / total[1]).item()


def sample_schedule(args):
    """(sampler, shifting, terminal) of --sample_schedule; 'checkpoint' reads the header's scheduler section (the
    official configs' sampler: from_checkpoint) with the official scheduler's defaults for what it leaves out
    (RectifiedFlowScheduler: sampler "Uniform", no shifting); LinearQuadratic when the file has no section."""
    if args.sample_schedule != "checkpoint":  # LinearQuadratic, Uniform, distilled: no shift
        return args.sample_schedule, "", None
    base = ckpt_file(args) if args.ckpt_dir else ""
    cfg = header_config(base) if os.path.isfile(base) else {}  # a diffusers folder: none
    if "scheduler" not in cfg:
        return "LinearQuadratic", "", None
    sch = cfg["scheduler"]
    shifting = sch.get("shifting") or ""
    if shifting not in ("", "SD3"):  # upstream also has "SimpleDiffusion", not implemented here
        raise ValueError(f"{base}: scheduler shifting={shifting!r}; train_ltx.py implements SD3 only: pass "
                         "--sample_schedule LinearQuadratic, Uniform or distilled")
    return sch.get("sampler", "Uniform"), shifting, sch.get("target_shift_terminal")


def sample_config(args):
    """The sampling recipe: --sample_config (an official config by name, SAMPLE_CONFIGS, or a .json file of the same
    fields), or one pass made of the --sample_* and --decode_* flags."""
    if args.sample_config in SAMPLE_CONFIGS:
        return SAMPLE_CONFIGS[args.sample_config]
    if args.sample_config:
        with open(args.sample_config) as f:
            return json.load(f)
    c = dict(pipeline_type="base", num_inference_steps=args.sample_steps, guidance_scale=args.sample_guidance,
             stg_scale=args.sample_stg, rescaling_scale=args.sample_rescale,
             skip_block_list=[int(b) for b in args.sample_stg_blocks.split(",") if b.strip()],
             stochastic_sampling=args.sample_stochastic, decode_timestep=args.decode_timestep,
             decode_noise_scale=args.decode_noise)
    if args.sample_schedule == "distilled":  # the distilled configs' first pass: no CFG, no STG, their timesteps
        c.update(timesteps=list(DISTILLED_TIMESTEPS), guidance_scale=1.0, stg_scale=0.0)
    return c


def sample_passes(conf, height, width, stride=32):
    """[(pass, (height, width))]: one pass at the asked size, or a multi-scale config's two (the first at
    downscale_factor of each side, floored to the encoder's stride; the second at twice that)."""
    if conf.get("pipeline_type", "base") != "multi-scale":
        return [(conf, (height, width))]
    h, w = (int(n * conf["downscale_factor"]) // stride * stride for n in (height, width))
    if not (h and w):
        raise UserError(f"--height {height} --width {width}: too small for the multi-scale pipeline (its first "
                        f"pass is {conf['downscale_factor']:.3f} of each side, a multiple of {stride})")
    return [(conf["first_pass"], (h, w)), (conf["second_pass"], (2 * h, 2 * w))]


def sample_multiscale(model, plans, noises, context, neg, upsample=None, frame_rate=25.0, conds=None,
                      keyframes=None, renoise=None, cond_noise=None, cond_strength=1.0, keyframe_noise=None,
                      cond_start=0):
    """The passes of a sampling recipe, one after the other (LTXMultiScalePipeline; one pass: sample_euler alone).
    plans: per pass (timesteps, guidance, stg, cfg_star) (pass_timesteps, pass_plan); noises: per pass, the
    noise (B, C, f, h, w) at that pass's size; upsample: normalised latents -> the next pass's start
    (upsample_latents). conds, keyframes, renoise, cond_noise, keyframe_noise: per pass, as sample_euler takes
    them, or None; cond_start: where the conds sit (latent frames, the same in every pass). -> the last pass's
    latents."""
    n = len(plans)
    conds, keyframes, renoise, cond_noise, keyframe_noise = (
        [None] * n if v is None else v for v in (conds, keyframes, renoise, cond_noise, keyframe_noise))
    z = None
    for k, (ts, g, stg, cfg_star) in enumerate(plans):
        z = sample_euler(model, noises[k], context, neg, timesteps=ts, guidance=g, stg=stg, cfg_star=cfg_star,
                         frame_rate=frame_rate, cond_latent=conds[k], init=upsample(z) if k else None,
                         keyframe=keyframes[k], renoise=renoise[k], cond_noise=cond_noise[k],
                         cond_strength=cond_strength, keyframe_noise=keyframe_noise[k], cond_start=cond_start)
    return z


def upscaler_file(args):
    """--sample_upscaler, or the release's file beside the --ckpt_dir file (or in the folder)."""
    if args.sample_upscaler:
        return args.sample_upscaler
    base = args.ckpt_dir if os.path.isdir(args.ckpt_dir) else os.path.dirname(args.ckpt_dir)
    return os.path.join(base, UPSCALER_FILE)


def latent_stats(args):
    """(mean, std), each (1, C, 1, 1, 1), of the VAE's per-channel latent statistics: the upsampler works on raw
    latents. The toy encoders have none: (0, 1)."""
    if args.encoders == "toy":
        return 0.0, 1.0
    path, pre = ckpt_file(args), "per_channel_statistics."
    sd = (read_vae_checkpoint(path)[1] if os.path.isdir(path) else
          {pre + k: v for k, v in read_prefixed([path], VAE_PREFIX + pre).items()})
    return tuple(sd[pre + k].float().view(1, -1, 1, 1, 1) for k in ("mean-of-means", "std-of-means"))


def upsample_latents(up, z, stats):
    """The multi-scale pipeline between its passes: normalised latents -> raw -> the upsampler -> normalised ->
    each (sample, channel) given the statistics of z (adain, factor 1)."""
    mean, std = stats
    x = up(z.float() * std + mean).float()
    return adain_latents((x - mean) / std, z)


def allowed_timesteps(args):
    """The DiT file's header `allowed_inference_steps` (the distilled releases list the timesteps they were
    distilled for), or None: --dit_path when it is a file, else the --ckpt_dir checkpoint."""
    file = args.dit_path if os.path.isfile(args.dit_path) else ckpt_file(args) if args.ckpt_dir else ""
    return header_config(file).get("allowed_inference_steps") if file.endswith(".safetensors") and \
        os.path.isfile(file) else None


def check_sample_config(args, cfg):
    """The sampling recipe's mistakes as one UserError, before any work (only when there are prompts to sample):
    a config that does not parse, STG on blocks the DiT lacks, a multi-scale config without its upsampler file, a
    timestep that a distilled checkpoint does not allow (upstream's pipeline asserts it, rounded to 4 places)."""
    if not prompts_from(args.sample_prompts):
        return
    src = f"--sample_config {args.sample_config}" if args.sample_config else "--sample_stg_blocks " + \
        args.sample_stg_blocks
    try:
        conf = sample_config(args)
        if conf.get("stg_mode", "attention_values").lower() not in ("attention_values", "stg_av"):
            raise UserError(f"{src}: stg_mode {conf['stg_mode']!r}; train_ltx.py implements attention_values (the "
                            "official configs' STG) only")
        if conf.get("pipeline_type", "base") not in ("base", "multi-scale"):
            raise UserError(f"{src}: pipeline_type {conf['pipeline_type']!r}: expected base or multi-scale")
        passes = sample_passes(conf, args.height, args.width, LATENT_STRIDE[args.encoders][1])
        bad, schedule, allowed, wrong = set(), sample_schedule(args), allowed_timesteps(args), []
        for p, (h, w) in passes:
            shape = latent_shape(cfg, dataclasses.replace(args, height=h, width=w), args.sample_frames or args.frames)
            ts = pass_timesteps(p, schedule, shape[1] * shape[2] * shape[3])
            _, stg = pass_plan(p, ts)
            bad |= {b for st in stg if st for b in st[1] if not 0 <= b < cfg.num_layers}
            wrong += [round(t, 4) for t in ts if allowed is not None and round(t, 4) not in allowed]
        if bad:
            raise UserError(f"{src}: STG on block(s) {sorted(bad)}: the DiT has {cfg.num_layers} blocks")
        if wrong:
            raise UserError(f"the DiT's header allows only the timesteps {allowed} (a distilled checkpoint), the "
                            f"samples would take {wrong}: pass --sample_config ltxv-2b-0.9.8-distilled (or the 13B "
                            "one), or --sample_schedule distilled")
    except (ValueError, KeyError, TypeError) as e:  # a .json with a field missing or of the wrong kind
        raise UserError(f"{src}: {type(e).__name__} {e}") from None
    if len(passes) > 1 and not os.path.isfile(upscaler_file(args)):
        raise UserError(f"{src} is multi-scale: its latent upsampler {upscaler_file(args)} is not there (pass "
                        "--sample_upscaler, the ltxv-spatial-upscaler-0.9.8.safetensors file)")


def gaussian_blur3(x, sigma=1.0):
    """(..., H, W) -> the same blurred as torchvision's gaussian_blur(kernel_size=3, sigma) does it: the kernel
    exp(-d^2 / 2 sigma^2) at d = -1, 0, 1, normalised, its outer product as one 3x3 conv, reflect padding."""
    k = torch.exp(-0.5 * (torch.arange(-1.0, 2.0, dtype=x.dtype) / sigma) ** 2)
    k = k / k.sum()
    y = F.pad(x.reshape(-1, 1, *x.shape[-2:]), (1, 1, 1, 1), mode="reflect")
    return F.conv2d(y, (k[:, None] * k[None, :])[None, None]).reshape(x.shape)


def crf_round_trip(img, crf):
    """(H, W, 3) in [0, 1] -> (H, W, 3) uint8: the image as a one-frame H.264 video at this CRF shows it, made as
    upstream's crf_compressor.compress makes it (truncated to uint8, rgb24 -> yuv420p, libx264 "veryfast", decoded
    back to rgb24). H and W even (yuv420p). One x264 thread: its output depends on the thread count (upstream's
    default is the machine's cores), so this way a conditioning image gives the same pixels on every machine."""
    import io

    import av
    arr = (img * 255.0).to(torch.uint8).numpy()  # truncation, as upstream's .byte()
    buf = io.BytesIO()
    with av.open(buf, "w", format="mp4") as c:
        s = c.add_stream("libx264", rate=1, options={"crf": str(crf), "preset": "veryfast"})
        s.height, s.width = arr.shape[:2]
        s.codec_context.thread_count, s.codec_context.thread_type = 1, "NONE"
        c.mux(s.encode(av.VideoFrame.from_ndarray(arr, format="rgb24").reformat(format="yuv420p")))
        c.mux(s.encode())
    with av.open(io.BytesIO(buf.getvalue())) as c:
        return torch.from_numpy(next(c.decode(video=0)).to_ndarray(format="rgb24"))


def condition_pixels(video, crf=29):
    """The official inference's preprocessing of a conditioning image, and of each frame of a conditioning video
    (inference.py load_image_to_tensor_with_resize_and_crop), after the resize to the sample's size: the [0, 1]
    pixels blurred (3x3, sigma 1), then each frame alone through an H.264 encode / decode at `crf`, so that the
    model is conditioned on what a compressed video looks like. (3, F, H, W) in [-1, 1] -> the same; crf 0: the
    pixels as they are (neither step, as diffusers' pipelines)."""
    if not crf:
        return video
    x = gaussian_blur3(((video + 1) * 127.5).round() / 255)  # the uint8 pixels as to_tensor gives them, blurred
    frames = [crf_round_trip(x[:, i].permute(1, 2, 0), crf).float() / 255.0 for i in range(x.shape[1])]
    return torch.stack(frames).permute(3, 0, 1, 2) * 255.0 / 127.5 - 1.0  # upstream's ops, in its order


def sample_keyframes(args):
    """[(image, pixel frame or -1 for the last, strength)]: --sample_last_image at --sample_keyframe_frame (strength
    1), then each image@frame[:strength] of --sample_keyframes, in that order (the order of the tokens, as the
    pipeline's conditioning items)."""
    keys = [(args.sample_last_image, args.sample_keyframe_frame, 1.0)] if args.sample_last_image else []
    for item in filter(None, (x.strip() for x in args.sample_keyframes.split(","))):
        path, _, at = item.rpartition("@")
        n, _, strength = at.partition(":")
        if not path:
            raise ValueError(item)
        keys.append((path, int(n), float(strength or 1.0)))
    return keys


def write_samples(model, args, cfg, text_ctx, negative, out_dir, step, device):
    """One video per --sample_prompts prompt, seeded by (seed, prompt index), through the official sampler with
    guidance against `negative` (--sample_image as the first frame or --sample_video's first frames in place,
    --sample_last_image as a keyframe at the last frame or --sample_keyframe_frame, --sample_keyframes), in one pass
    or the two of a multi-scale --sample_config. Collective; rank 0 decodes and writes
    samples/step_XXXXXXXX_i.mp4."""
    rank = torch.distributed.get_rank()
    conf = sample_config(args)
    passes = sample_passes(conf, args.height, args.width, LATENT_STRIDE[args.encoders][1])
    dargs = dataclasses.replace(args, decode_timestep=conf.get("decode_timestep", args.decode_timestep),
                                decode_noise=conf.get("decode_noise_scale", args.decode_noise))
    enc_v, decode, _ = build_encoders(dargs, cfg, device, video=True, text=False) if rank == 0 else (None, None, None)
    up = stats = None
    if len(passes) > 1 and rank == 0:
        up = load_upsampler(upscaler_file(args), device=device)
        if up.cfg.temporal_upsample or not up.cfg.spatial_upsample:
            raise UserError(f"{upscaler_file(args)}: a temporal latent upsampler; the multi-scale configs take the "
                            "spatial one (ltxv-spatial-upscaler-*)", this_rank=True)
        stats = tuple(s.to(device) if torch.is_tensor(s) else s for s in latent_stats(args))
    was_training = model.training
    model.eval()
    schedule = sample_schedule(args)
    frames = args.sample_frames or args.frames
    stochastic = conf.get("stochastic_sampling", False)
    shapes, plans = [], []  # per pass: the latent shape; (timesteps, guidance, stg, cfg_star)
    for k, (p, (h, w)) in enumerate(passes):
        shapes.append(latent_shape(cfg, dataclasses.replace(args, height=h, width=w), frames))
        ts = pass_timesteps(p, schedule, shapes[-1][1] * shapes[-1][2] * shapes[-1][3])
        plans.append((ts, *pass_plan(p, ts), bool(p.get("cfg_star_rescale", False))))
        cdist.print0("sample schedule: " + json.dumps({
            "pass": k + 1, "size": [h, w], "timesteps": [round(t, 6) for t in ts], "guidance": plans[-1][1],
            "stg": [st and st[0] for st in plans[-1][2]],
            "stg_blocks": sorted({b for st in plans[-1][2] if st for b in st[1]}), "cfg_star": plans[-1][3],
            "stochastic": stochastic}))

    def encode_image(path, size, n=1, crf=args.sample_image_crf):  # its first n frames, resized and centre-cropped
        # to the asked size, preprocessed there as the official inference does (crf 0: not), then resized to the
        # pass's size (as the pipeline), encoded alone by rank 0, broadcast
        shape = latent_shape(cfg, dataclasses.replace(args, height=size[0], width=size[1]), n)
        z = torch.zeros(1, *shape)
        if rank == 0:
            img = read_clip(path, 0.0, n, args.fps, (args.height, args.width))  # (3, n, H, W)
            img = condition_pixels(img, crf)  # blur + CRF round trip (0: off)
            if tuple(size) != (args.height, args.width):
                img = F.interpolate(img.transpose(0, 1).float(), size=size, mode="bilinear", align_corners=False)
                img = img.transpose(0, 1)
            z = enc_v(img[None].float()).float()
        z = z.to(device)
        torch.distributed.broadcast(z, 0)
        return z

    def upsample(z):  # between the passes: made by rank 0, broadcast
        x = upsample_latents(up, z, stats) if rank == 0 else torch.zeros(z.shape[0], z.shape[1], z.shape[2],
                                                                          2 * z.shape[3], 2 * z.shape[4])
        x = x.to(device)
        torch.distributed.broadcast(x, 0)
        return x
    first = (args.sample_image, 1) if args.sample_image else (args.sample_video, args.sample_video_frames)
    conds = [encode_image(first[0], size, first[1]) if first[0] else None for _, size in passes]
    # a keyframe's RoPE frame: pixel frames, the toy encoders' latent frames counted as 8 (rope_grid's units)
    at = lambda n, f: last_frame_index(f) if n < 0 else n * VAE_TEMPORAL // LATENT_STRIDE[args.encoders][0]  # noqa
    specs = sample_keyframes(args)
    keyframes = [[(encode_image(path, size), at(n, shape[1]), strength) for path, n, strength in specs] or None
                 for (_, size), shape in zip(passes, shapes)]
    cond_start = 0
    if args.sample_video and args.sample_video_start:  # the clip later in the video, as the pipeline places a
        # conditioning video whose media_frame_number is not 0 (_handle_non_first_conditioning_sequence, "concat"):
        # its first two latent frames (their pixel frames encode alone, not as the video's latents there) become
        # keyframe tokens at its start frame, first of the keyframes; the rest goes in place two latent frames on
        m = args.sample_video_start // LATENT_STRIDE[args.encoders][0]
        keyframes = [[(z[:, :, :2], at(args.sample_video_start, 0), args.sample_image_strength), *(kfs or [])]
                     for z, kfs in zip(conds, keyframes)]
        conds = [z[:, :, 2:] if z.shape[2] > 2 else None for z in conds]
        cond_start = m + 2
    if args.sample_reference:  # IC-LoRA: the reference at frame 0 (the video's own positions), first, as trained
        n_ref = 1 if probe(args.sample_reference)["is_image"] else frames
        # its pixels as read (crf 0): training caches the references that way, and what the adapter learned from
        # is what it must be given
        keyframes = [[(encode_image(args.sample_reference, size, n_ref, crf=0), 0, 1.0), *(kfs or [])]
                     for (_, size), kfs in zip(passes, keyframes)]
    paths = []
    for i, prompt in enumerate(prompts_from(args.sample_prompts)):
        ctx, neg = text_ctx[prompt][None].to(device).float(), text_ctx[negative][None].to(device).float()
        context = (ctx, torch.ones(1, ctx.shape[1], device=device))
        neg_context = (neg, torch.ones(1, neg.shape[1], device=device))
        L = max(ctx.shape[1], neg.shape[1])  # one batch for cond and uncond: pad the shorter, mask its padding
        context, neg_context = ((F.pad(c, (0, 0, 0, L - c.shape[1])), F.pad(m, (0, L - m.shape[1])))
                                for c, m in (context, neg_context))
        keys = [(i,) if k == 0 else (i, "pass", k + 1) for k in range(len(passes))]  # the first: as one pass
        z = sample_multiscale(  # CPU noise and generators: the same on every device
            model, plans, [noise.randn(shape, args.seed, "sample", *key)[None].to(device)
                           for shape, key in zip(shapes, keys)],
            context, neg_context, upsample, float(args.fps), conds, keyframes,
            [noise.generator(args.seed, "renoise", *key) if stochastic else None for key in keys],
            [(args.sample_cond_noise, noise.generator(args.seed, "cond_noise", *key)) for key in keys],
            args.sample_image_strength,  # a keyframe below strength 1 starts from noise of its own, seeded
            [[noise.randn(z.shape[1:], args.seed, "keyframe_noise", j, *key)[None].to(device) if s < 1 else None
              for j, (z, _, s) in enumerate(kfs)] if kfs else None for kfs, key in zip(keyframes, keys)], cond_start)
        if rank == 0:
            paths.append(os.path.join(out_dir, "samples", f"step_{step:08d}_{i}.mp4"))
            video = decode(z, tone_map=passes[-1][0].get("tone_map_compression_ratio", 0.0))[0].float().cpu()
            if video.shape[-2:] != (args.height, args.width):  # the multi-scale pipeline's last resize
                video = F.interpolate(video.transpose(0, 1), size=(args.height, args.width), mode="bilinear",
                                      align_corners=False).transpose(0, 1)
            write_video(paths[-1], video, args.fps)
    model.train(was_training)
    return paths


# What upstream's from_config (transformer3d.py Transformer3DModel, causal_video_autoencoder.py
# CausalVideoAutoencoder) needs spelled out, because its defaults are another architecture (geglu, layer norm, no
# q/k norm; group norm, a quant conv, and `dims` has none): the keys of the official headers, with the values every
# 0.9.x release has (diffusers_config_mapping.py OURS_TRANSFORMER_CONFIG / the VAE's `config` property).
HEADER_TRANSFORMER = dict(
    _class_name="Transformer3DModel", activation_fn="gelu-approximate", attention_bias=True, attention_type="default",
    adaptive_norm="single_scale_shift", standardization_norm="rms_norm", norm_elementwise_affine=False,
    qk_norm="rms_norm", positional_embedding_type="rope", timestep_scale_multiplier=1000, num_embeds_ada_norm=1000,
    dropout=0.0, norm_num_groups=32, num_vector_embeds=None, only_cross_attention=False, double_self_attention=False,
    upcast_attention=False, use_linear_projection=False, project_to_2d_pos=True)
HEADER_VAE = dict(_class_name="CausalVideoAutoencoder", dims=3, scaling_factor=1.0, norm_layer="pixel_norm",
                  latent_log_var="uniform", use_quant_conv=False, normalize_latent_channels=False)


def header_transformer(cfg, base=None):
    """The header "transformer" section of `cfg`: the base file's own section (`base`, when the DiT was fine-tuned
    from an official file) or upstream's fixed keys, with our fields on top (the architecture that was trained;
    causal_temporal_positioning always written, so no reader has to guess it)."""
    ours = dataclasses.asdict(cfg)
    ours["positional_embedding_max_pos"] = list(ours["positional_embedding_max_pos"])
    if ours["qk_norm_eps"] == 1e-5:  # upstream's fixed q/k RMSNorm eps (attention.py): not one of its keys
        del ours["qk_norm_eps"]
    return {**HEADER_TRANSFORMER, **(base or {}), **ours, "_class_name": "Transformer3DModel"}


def header_vae(vcfg):
    """The header "vae" section of a VAEConfig (a diffusers folder's VAE, exported in the official layout)."""
    return {**HEADER_VAE, **dataclasses.asdict(vcfg)}


def export_config(args, cfg):
    """The header config of a full fine-tune's export: the base file's own sections, the transformer's updated to
    `cfg`, both completed with upstream's keys where the base leaves some out; from a diffusers folder the complete
    upstream-style sections of its VAE and the LinearQuadratic schedule our sampler uses for it (upstream's
    inference reads "scheduler" from every single file)."""
    base = ckpt_file(args) if args.ckpt_dir else ""
    if not base:
        return {"transformer": header_transformer(cfg)}
    if os.path.isfile(base):  # its VAE section completed by what our loader took for what it leaves out
        header = header_config(base)
        return {**header, "transformer": header_transformer(cfg, header.get("transformer")),
                "vae": {**header_vae(vae_config_from(header["vae"])), **header["vae"]}}
    return {"transformer": header_transformer(cfg), "vae": header_vae(diffusers_vae(base)[1][0]),
            "scheduler": {"_class_name": "RectifiedFlowScheduler", "num_train_timesteps": 1000,
                          "sampler": "LinearQuadratic", "shifting": None, "target_shift_terminal": None}}


def export_weights(model, args, cfg, path):
    """The LoRA in ComfyUI's key format (diffusion_model.<official module>.lora_A/.lora_B.weight + .alpha), which
    ComfyUI and diffusers load as they are; a full fine-tune as the official single file (the DiT in bf16 under
    model.diffusion_model., the unchanged VAE under vae., the header config). Collective; rank 0 writes."""
    lora = args.lora_rank > 0
    sd = gather_params(model, only=(lambda k: ".lora_" in k) if lora else None)
    if torch.distributed.get_rank() != 0:
        return
    meta = {"format": "pt", "base_model": "ltxv-" + (args.preset if args.preset in CKPT_FILES else "custom"),
            "args": json.dumps(dataclasses.asdict(args))}
    if lora:
        sd, alpha = lora_for_export(sd, args.lora_rank, args.lora_alpha or args.lora_rank)
        meta.update(lora_rank=args.lora_rank, lora_alpha=alpha, lora_targets=args.lora_targets)
        lora_file.write_lora(path, sd, alpha, metadata=meta)
        return
    from safetensors.torch import save_file
    out = {DIT_PREFIX + k: v.to(torch.bfloat16).contiguous() for k, v in sd.items()}
    if args.ckpt_dir:  # the VAE of the base, unchanged (a diffusers folder's is written with the official keys)
        out.update({VAE_PREFIX + k: v for k, v in read_vae_checkpoint(ckpt_file(args))[1].items()})
    meta["config"] = json.dumps(export_config(args, cfg))
    save_file(out, path + ".tmp", metadata=meta)
    os.replace(path + ".tmp", path)


def bench(args, cfg, device, compute_dtype, world, micro, sp_group=None):
    """--mode bench: a few training steps on random latents of --height x --width x --frames and a random 256-token
    context (--reference 1: with a random reference clip of the same size in front, IC-LoRA's sequence of twice the
    tokens); prints step time, tokens/s (the target's), peak memory and MFU (all the tokens' work)."""
    sd = read_dit_weights(args, cfg, torch.distributed.get_rank(), torch.float32 if not args.lora_rank else
                          compute_dtype) if (args.dit_path or args.ckpt_dir) else "random"
    torch.manual_seed(args.seed)  # the same weights and inputs every run: eager and --compile give comparable losses
    model = build_dit(args, cfg, sd, device, compute_dtype, sp_group=sp_group)
    reset_peak_memory(device)  # mem_gb: the steps' peak, not the load's
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=1e-5, fused=True)
    shape = (micro, *latent_shape(cfg, args, args.frames))
    x0 = torch.randn(shape, device=device)
    ctx = torch.randn(micro, TEXT_LEN, cfg.caption_channels, device=device)
    mask = torch.ones(micro, TEXT_LEN, device=device)
    ref = [(torch.randn(shape, device=device), 0)] if args.reference else None
    tokens = micro * math.prod(shape[2:])
    n_seq = math.prod(shape[2:]) * (2 if ref else 1)
    flops = micro * 3 * count_flops(cfg, n_seq) / args.sp  # --sp: this rank's share of the samples' work
    peak = device_peak_flops(device, args.peak_tflops)
    times = []
    for i in range(args.bench_steps + 2):  # the first two steps warm up (compile, allocator) and are not counted
        with StepTimer(device) as t:
            loss = flow_loss(model, x0, ctx, mask, torch.rand(micro, device=device), torch.randn_like(x0), args.fps,
                             keyframe=ref)
            (loss * args.sp).backward()
            opt.step()
            opt.zero_grad(set_to_none=True)
        if i >= 2:
            times.append(t.seconds)
    dt = sorted(times)[len(times) // 2]  # median
    res = dict(preset=args.preset, lora_rank=args.lora_rank, ac=args.ac, reference=args.reference,
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
    out_dir = args.out_dir or os.path.join("runs", f"ltx-{args.preset}" + ("-sample" if args.mode == "sample" else ""))
    if args.ckpt_dir:
        ckpt_file(args)  # a folder without the file is the user's to fix, before any work
    if args.mode == "train":
        run_folder.claim(out_dir, args.resume)
    rank, world, device = cdist.init()
    print0 = cdist.print0
    memory.check_world(args, world)  # --base_dtype float8 / --offload 1: one process
    cfg = dit_config(args)
    # --sp N: each group of N consecutive ranks trains the same samples, each rank a share of their tokens
    # (common/sp.py). The data, the noise draws and the batch arithmetic count data-parallel ranks: dp_rank of dp_world.
    sp_group, dp_rank, dp_world, micro, accum = sp.data_parallel(args, rank, world, cfg.num_attention_heads)
    compute_dtype = torch.float32 if args.dtype == "fp32" or (args.dtype == "auto" and device.type == "cpu") \
        else torch.bfloat16
    check_sample_config(args, cfg)
    print0(f"ltx: {args.mode} preset={args.preset} world={world} device={device} compute={compute_dtype} "
           f"batch={args.global_batch} (micro {micro} x {dp_world} ranks x {accum} accumulation)"
           + (f", sequence parallel: {args.sp} ranks a sample" if args.sp > 1 else ""))
    if args.mode == "bench":
        bench(args, cfg, device, compute_dtype, world, micro, sp_group)
        return cdist.cleanup()

    # 1. Data -> cache. The VAE and T5 exist only inside this block, and only if something is not cached yet. The
    # texts: the sample prompts, the guidance's negative prompt, the empty prompt of caption dropout.
    prompts = prompts_from(args.sample_prompts)
    negative = NEGATIVE_PROMPT if args.sample_negative == "official" else args.sample_negative
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
                                   multiple=sh, frame_step=st, min_frames=args.min_frames,
                                   clips_per_video=args.clips_per_video, log=print0, cache_dir=args.cache_dir,
                                   reference=args.reference, reference_dir=args.reference_dir or None)
        except (ValueError, FileNotFoundError) as e:  # no usable samples, no such folder: the user's to fix
            raise UserError(str(e)) from None
        entries, todo = cache_entries(records, args.cache_dir, settings, log=print0)
    need = torch.tensor(float(todo > 0 or (bool(texts) and not os.path.exists(text_file))))
    torch.distributed.all_reduce(need, op=torch.distributed.ReduceOp.MAX)  # every rank takes the same branch
    if need.item():
        encode_video, _, encode_text = build_encoders(args, cfg, device, video=todo > 0)
        if todo:
            enc = with_keyframes(encode_video, bool(args.last_frame_p), bool(args.keyframe_p),
                                 LATENT_STRIDE[args.encoders][0])  # neither: the clip's latents alone
            entries = encode_dataset(records, enc, encode_text, args.cache_dir, settings, log=print0,
                                     encode_reference=encode_video)  # a reference: its latents alone
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
    # straight into the compute dtype.
    # --lora (sample) / --init_lora (train): the file's adapters, rank, alpha and targets
    lora_alpha, lsd = None, None
    value = args.lora if args.mode == "sample" else args.init_lora
    if value:
        lsd, args.lora_rank, lora_alpha = lora_for(value, cfg)
        args.lora_targets = lora_file.targets_of(lsd)
    bases = [(f, m) for _, f, m in lora_file.parse_list(args.base_lora)]  # --base_lora: (file, multiplier)
    sd = read_dit_weights(args, cfg, rank, torch.float32 if args.lora_rank == 0 else compute_dtype)
    if rank == 0:
        for file, mult in bases:  # --base_lora: W += mult (alpha / rank) B @ A (+ deltas), in fp32, then its dtype
            print0(f"--base_lora: {file} x {mult} merged into the DiT")
            diffs = {}
            blsd, brank, balpha = lora_for(file, cfg, diffs)
            lora_file.merge(sd, blsd, brank, balpha, diffs, mult)
    if lsd is not None and rank == 0:
        sd.update(lsd)
        # a LoRA that skips some blocks: the adapters there start as a fresh one does (training) or as zeros (B = 0
        # and A = 0: a no-op in a sample)
        with torch.device("meta"):
            probe = add_lora(Transformer3DModel(cfg), args.lora_rank, lora_alpha, args.lora_targets)
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
                       base=os.path.abspath(args.dit_path or ckpt_file(args)) if (args.dit_path or args.ckpt_dir) else
                       f"init:{args.preset}", lora_rank=args.lora_rank, lora_alpha=args.lora_alpha,
                       lora_targets=args.lora_targets, timestep_sampling=args.timestep_sampling, shift=args.shift,
                       caption_dropout=args.caption_dropout, first_frame_p=args.first_frame_p, ema=args.ema,
                       encoders=args.encoders, **({"last_frame_p": args.last_frame_p} if args.last_frame_p else {}),
                       **({"keyframe_p": args.keyframe_p} if args.keyframe_p else {}),
                       **({"prefix_p": args.prefix_p} if args.prefix_p else {}),
                       **({"reference": True} if args.reference else {}),
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
        def loss(b, x0, sigma, eps):  # the longest sequence: with the reference and a keyframe when they are drawn
            ctx, mask = text_batch(b, device)
            kf = batch_keyframes(b, x0, device, ("last" if args.last_frame_p else 0.0)
                                 if args.last_frame_p or args.keyframe_p else None, args.reference)
            return flow_loss(model, x0, ctx, mask, sigma, eps, b["fps"], keyframe=kf)
        preflight.check(train, micro, lambda idx: {**load_batch([train[i]["file"] for i in idx], pin=pin), "fps":
                        torch.tensor([float(train[i]["fps"]) for i in idx])}, loss, model, device, args.sp, print0,
                        key=batch_key)
    # Each step's global batch comes from one bucket (data/loader.py), read a step ahead on a thread into pinned
    # memory; the data state saved with a checkpoint is the one after the last step actually trained.
    steps = batches([batch_key(e) for e in train], args.global_batch, micro, dp_rank, dp_world, args.seed,
                    state)
    it = prefetch(steps, lambda item: ([(load_batch([train[i]["file"] for i in mb], pin=pin),
                                         torch.tensor([float(train[i]["fps"]) for i in mb])) for mb in item[0]],
                                       item[1]))
    val_idx = val_batches([batch_key(e) for e in val], micro, dp_rank, dp_world) if val else []
    stop = StopSignal()  # SIGTERM (pre-emption) or Ctrl-C: checkpoint the last whole step, exit
    log = RunLog(out_dir, enabled=rank == 0, tensorboard=args.tensorboard, wandb_project=args.wandb,
                 config=dataclasses.asdict(args), start_step=start)
    peak = device_peak_flops(device, args.peak_tflops)
    empty = text_ctx.get("")
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
        key = keyframe_draw(args, step)
        for m, (b, fps) in enumerate(micro_batches):
            if stop.requested():  # between micro-batches: a long accumulated step does not outlive the notice
                stopped = (m, len(micro_batches))
                break
            x0 = b["latents"].to(device, non_blocking=True).float()
            ctx, mask = text_batch(b, device)
            n_tok = math.prod(x0.shape[2:])
            first = (m * dp_world + dp_rank) * micro  # this micro-batch's first sample, as an index in the global batch
            sigma, drop, cond = training_draws(args, step, first, len(x0), n_tok, device, x0.shape[2])
            if args.caption_dropout:
                ctx, mask = drop_captions(ctx, mask, drop, empty)
            eps = training_noise(args, step, first, x0.shape[1:], len(x0), device)
            model.set_requires_gradient_sync(reduce_now(args, m, len(micro_batches)))
            kf = batch_keyframes(b, x0, device, key, args.reference)
            loss = flow_loss(model, x0, ctx, mask, sigma, eps, fps, cond, kf)  # cond all 0: no conditioning
            # --sp: each rank's gradients are the part through its own tokens and FSDP2 averages over all ranks, so
            # x sp makes the average the data-parallel mean of whole-sample gradients (common/sp.py)
            (loss * args.sp / accum).backward()
            loss_sum += loss.detach()
            tokens += len(x0) * n_tok
            n_seq = n_tok + sum(math.prod(z.shape[2:]) for z, _ in keyframe_list(kf))  # theirs are computed too
            flops += len(x0) * 3 * count_flops(cfg, n_seq, ctx.shape[1]) / args.sp  # this rank's share
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
            log.log(dict(step=step, val_loss=val_loss(model, val_idx, val, device, float(args.fps), args.reference)),
                    echo=bar.write)
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
