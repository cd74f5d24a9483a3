"""
Train HunyuanVideo (v1, 13B text-to-video) in one file: the dual-/single-stream DiT with its token refiner, the
causal 3-D VAE, the two text encoders (llava-llama-3-8b's language model and CLIP-L), LoRA, flow matching and the
official sampler, loading of the official weights by their own key names, FSDP2, and a flat main().

    python train_hunyuan.py --preset toy                                   # tiny model from scratch, CPU ok
    python train_hunyuan.py --ckpt_dir HunyuanVideo/ckpts --data my_clips/ --lora_rank 32 --ac 1
    torchrun --nproc_per_node=8 train_hunyuan.py --ckpt_dir HunyuanVideo/ckpts --data my_clips/ --ac 1

Reading order (train_wan.py's): DiT config and presets -> DiT -> VAE -> text encoders -> LoRA -> flow matching and
the sampler -> loading -> flags -> the pieces main() uses -> main. Module names equal the official checkpoint keys
(`double_blocks.3.img_attn_qkv.weight`), so mp_rank_00_model_states.pt loads as it is. Upstream references:
Tencent/HunyuanVideo hyvideo/modules/{models,token_refiner,embed_layers,mlp_layers,modulate_layers,norm_layers,
posemb_layers,attenion}.py, hyvideo/vae/{vae,unet_causal_3d_blocks,autoencoder_kl_causal_3d}.py,
hyvideo/text_encoder/__init__.py, hyvideo/constants.py, hyvideo/diffusion/; Tencent/HunyuanVideo-I2V (the only
official trainer of v1). The tests' parity references: diffusers HunyuanVideoTransformer3DModel and
AutoencoderKLHunyuanVideo, transformers LlamaModel and CLIPTextModel.
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
from common.weights import check_keys, check_shapes, read_weights, safetensors_header
from data.cache import cache_entries, encode_dataset, load_batch
from data.dataset import load_dataset
from data.loader import batch_key, batches, split_val, val_batches, with_repeats
from data.toy import DEMO_PROMPTS, make_toy_dataset
from data.video import write_video

# -----------------------------------------------------------------------------------------------------
# Configs and presets


@dataclass
class HunyuanConfig:
    hidden_size: int = 3072
    heads_num: int = 24  # head_dim = hidden_size / heads_num = 128
    mlp_dim: int = 12288  # the blocks' MLP width (mlp_width_ratio 4)
    refiner_mlp_dim: int = 12288  # the token refiner's MLP: always 4 x hidden upstream (built without the ratio)
    mm_double_blocks_depth: int = 20
    mm_single_blocks_depth: int = 40
    refiner_depth: int = 2
    in_channels: int = 16  # VAE latent channels
    out_channels: int = 16
    patch_size: tuple = (1, 2, 2)  # (t, h, w)
    text_states_dim: int = 4096  # the Llama hidden states
    text_states_dim_2: int = 768  # the CLIP-L pooled output
    rope_dim_list: tuple = (16, 56, 56)  # (t, h, w) parts of head_dim
    rope_theta: float = 256.0
    guidance_embed: bool = True  # the released t2v weights are guidance-distilled ("cfgdistill")
    eps: float = 1e-6


def rope_dims(head_dim):
    """The (t, h, w) split of head_dim: 1/8 for time, the rest halved. 128 -> (16, 56, 56), upstream's list."""
    t = head_dim // 8
    return (t, (head_dim - t) // 2, (head_dim - t) // 2)


DIT_PRESETS = {
    "13B": HunyuanConfig(),  # 12,821,012,544 params
    # tiny: the tests. mlp_dim != 4 x hidden, so that a refiner built with the blocks' ratio fails the parity test;
    # head_dim 32 -> RoPE split (4, 14, 14)
    "tiny": HunyuanConfig(hidden_size=64, heads_num=2, mlp_dim=96, refiner_mlp_dim=256, mm_double_blocks_depth=2,
                          mm_single_blocks_depth=2, text_states_dim=32, text_states_dim_2=24,
                          rope_dim_list=rope_dims(32)),
    # toy: trained from scratch in pixel space on the synthetic dataset (RGB "latents", 4x4-pixel patches), with
    # data/toy.py's word embedding as the text and its mean as the pooled vector; no guidance embedding
    "toy": HunyuanConfig(hidden_size=128, heads_num=4, mlp_dim=384, refiner_mlp_dim=512, mm_double_blocks_depth=2,
                         mm_single_blocks_depth=2, in_channels=3, out_channels=3, patch_size=(1, 4, 4),
                         text_states_dim=64, text_states_dim_2=64, rope_dim_list=rope_dims(32), guidance_embed=False),
}

# -----------------------------------------------------------------------------------------------------
# DiT (hyvideo/modules/models.py HYVideoDiffusionTransformer)
#
# Precision: the residual streams, the norms, the modulation vectors and RoPE are fp32; the Linears run in the
# weight dtype (bf16 under FSDP mixed precision, fp32 in tests). Every cast is written out (.float(), .to(dt)).


def timestep_embedding(t, dim=256, max_period=10000):
    """t (B,) float -> (B, dim) fp32 sinusoid, cos first then sin (upstream's order)."""
    half = dim // 2
    freqs = torch.exp(-math.log(max_period) * torch.arange(half, dtype=torch.float32, device=t.device) / half)
    args = t[:, None].float() * freqs[None]
    return torch.cat([torch.cos(args), torch.sin(args)], dim=-1)


def rope_tables(t, h, w, dims, theta, device):
    """cos, sin (t*h*w, sum(dims)) fp32 for a (t, h, w) token grid, tokens ordered t, h, w (w fastest). Per axis of
    dim d: angles pos * theta^(-2j/d), each repeated twice (one per member of an adjacent pair); axes concatenated."""
    grid = torch.meshgrid(*(torch.arange(n, dtype=torch.float32, device=device) for n in (t, h, w)), indexing="ij")
    angles = []
    for d, pos in zip(dims, grid):
        inv = 1.0 / theta ** (torch.arange(0, d, 2, dtype=torch.float32, device=device)[: d // 2] / d)
        angles.append(torch.outer(pos.reshape(-1), inv).repeat_interleave(2, dim=-1))  # (N, d)
    ang = torch.cat(angles, dim=-1)
    return ang.cos(), ang.sin()


def rope_apply(x, cos, sin):
    """x (B, N, H, D); rotate adjacent pairs (x[2i], x[2i+1]) -> (-x[2i+1], x[2i]) in fp32, cast back."""
    xf = x.float()
    x0, x1 = xf.unflatten(-1, (-1, 2)).unbind(-1)
    rot = torch.stack([-x1, x0], dim=-1).flatten(-2)
    return (xf * cos[None, :, None] + rot * sin[None, :, None]).type_as(x)


def attention(q, k, v, mask=None):
    """q, k, v (B, L, H, D); mask None or bool, broadcastable to (B, H, Lq, Lk), True = attend -> (B, L, H*D)."""
    y = F.scaled_dot_product_attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), attn_mask=mask)
    return y.transpose(1, 2).flatten(2)


def text_keep(mask, N):
    """The text part (B, L) of the joint mask (B, 1, 1, N+L), or None (no mask: every text token is attended)."""
    return None if mask is None else mask[:, 0, 0, N:]


class RMSNorm(nn.Module):
    """Over head_dim, in fp32, cast back, then times weight (hyvideo norm_layers.RMSNorm)."""

    def __init__(self, dim, eps=1e-6):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x):
        return F.rms_norm(x.float(), (x.shape[-1],), eps=self.eps).type_as(x) * self.weight


class LayerNorm(nn.LayerNorm):
    """LayerNorm in fp32, returns fp32; the affine ones (the refiner's) upcast their weight too."""

    def __init__(self, dim, eps=1e-6, elementwise_affine=False):
        super().__init__(dim, eps=eps, elementwise_affine=elementwise_affine)

    def forward(self, x):
        w = self.weight.float() if self.weight is not None else None
        b = self.bias.float() if self.bias is not None else None
        return F.layer_norm(x.float(), self.normalized_shape, w, b, self.eps)


def modulate(x, shift, scale):
    return x * (1 + scale[:, None]) + shift[:, None]


class TimestepEmbedder(nn.Module):
    """time_in, guidance_in, txt_in.t_embedder: 256-d sinusoid -> Linear -> SiLU -> Linear."""

    def __init__(self, hidden, freq_dim=256):
        super().__init__()
        self.freq_dim = freq_dim
        self.mlp = nn.Sequential(nn.Linear(freq_dim, hidden), nn.SiLU(), nn.Linear(hidden, hidden))

    def forward(self, t):
        w = self.mlp[0].weight
        return self.mlp(timestep_embedding(t, self.freq_dim).to(w.dtype)).float()


class MLPEmbedder(nn.Module):
    """vector_in: the CLIP pooled vector (B, 768) -> (B, hidden)."""

    def __init__(self, in_dim, hidden):
        super().__init__()
        self.in_layer = nn.Linear(in_dim, hidden)
        self.silu = nn.SiLU()
        self.out_layer = nn.Linear(hidden, hidden)

    def forward(self, x):
        return self.out_layer(self.silu(self.in_layer(x.to(self.in_layer.weight.dtype)))).float()


class TextProjection(nn.Module):
    """txt_in.c_embedder: the masked mean of the text states (B, 4096) -> (B, hidden)."""

    def __init__(self, in_dim, hidden):
        super().__init__()
        self.linear_1 = nn.Linear(in_dim, hidden)
        self.act_1 = nn.SiLU()
        self.linear_2 = nn.Linear(hidden, hidden)

    def forward(self, x):
        return self.linear_2(self.act_1(self.linear_1(x.to(self.linear_1.weight.dtype)))).float()


class MLP(nn.Module):
    def __init__(self, dim, hidden, act):
        super().__init__()
        self.fc1 = nn.Linear(dim, hidden)
        self.act = act
        self.fc2 = nn.Linear(hidden, dim)

    def forward(self, x):
        return self.fc2(self.act(self.fc1(x)))


class ModulateDiT(nn.Module):
    """img_mod / txt_mod / modulation: SiLU(vec) -> Linear(hidden, factor * hidden), in fp32 out."""

    def __init__(self, hidden, factor):
        super().__init__()
        self.act = nn.SiLU()
        self.linear = nn.Linear(hidden, factor * hidden)

    def forward(self, vec):
        # the dtype off the bias: under --base_dtype float8 reading .weight upcasts the whole weight (common/float8.py)
        return self.linear(self.act(vec).to(self.linear.bias.dtype)).float()


class IndividualTokenRefinerBlock(nn.Module):
    def __init__(self, hidden, heads, mlp_dim, eps=1e-6):
        super().__init__()
        self.heads = heads
        self.norm1 = LayerNorm(hidden, eps, elementwise_affine=True)
        self.self_attn_qkv = nn.Linear(hidden, 3 * hidden)
        self.self_attn_proj = nn.Linear(hidden, hidden)
        self.norm2 = LayerNorm(hidden, eps, elementwise_affine=True)
        self.mlp = MLP(hidden, mlp_dim, nn.SiLU())
        self.adaLN_modulation = nn.Sequential(nn.SiLU(), nn.Linear(hidden, 2 * hidden))

    def forward(self, x, c, mask):
        # x (B, L, C) fp32; c (B, C) fp32; mask (B, 1, L, L) bool
        dt = self.self_attn_qkv.weight.dtype
        gate_msa, gate_mlp = self.adaLN_modulation(c.to(dt)).float().chunk(2, dim=-1)
        q, k, v = self.self_attn_qkv(self.norm1(x).to(dt)).unflatten(-1, (3, self.heads, -1)).unbind(2)
        x = x + self.self_attn_proj(attention(q, k, v, mask)).float() * gate_msa[:, None]
        return x + self.mlp(self.norm2(x).to(dt)).float() * gate_mlp[:, None]


class IndividualTokenRefiner(nn.Module):
    def __init__(self, hidden, heads, mlp_dim, depth, eps=1e-6):
        super().__init__()
        self.blocks = nn.ModuleList(IndividualTokenRefinerBlock(hidden, heads, mlp_dim, eps) for _ in range(depth))

    def forward(self, x, c, text_mask):
        # self-attention among the valid tokens only; a padded query would see no key at all (a NaN row), so it
        # attends to token 0 (upstream's mask[:, :, :, 0] = True). Padded rows never reach the video tokens.
        m = text_mask.bool()
        mask = m[:, None, None, :] & m[:, None, :, None]  # (B, 1, L, L)
        mask[:, :, :, 0] = True
        for block in self.blocks:
            x = block(x, c, mask)
        return x


class SingleTokenRefiner(nn.Module):
    """txt_in: the Llama states (B, L, 4096) -> text tokens (B, L, hidden), conditioned on t and the states' mean."""

    def __init__(self, cfg: HunyuanConfig):
        super().__init__()
        C = cfg.hidden_size
        self.input_embedder = nn.Linear(cfg.text_states_dim, C)
        self.t_embedder = TimestepEmbedder(C)
        self.c_embedder = TextProjection(cfg.text_states_dim, C)
        self.individual_token_refiner = IndividualTokenRefiner(C, cfg.heads_num, cfg.refiner_mlp_dim,
                                                               cfg.refiner_depth, cfg.eps)

    def forward(self, x, t, text_mask):
        m = text_mask.float()[..., None]
        pooled = (x.float() * m).sum(1) / m.sum(1)  # mean over the valid tokens only
        c = self.t_embedder(t) + self.c_embedder(pooled)
        x = self.input_embedder(x.to(self.input_embedder.weight.dtype)).float()
        return self.individual_token_refiner(x, c, text_mask)


class MMDoubleStreamBlock(nn.Module):
    """Separate weights for the video (img_*) and text (txt_*) tokens, one joint attention over both."""

    def __init__(self, cfg: HunyuanConfig):
        super().__init__()
        C, self.heads = cfg.hidden_size, cfg.heads_num
        hd = C // cfg.heads_num
        for s in ("img", "txt"):
            setattr(self, f"{s}_mod", ModulateDiT(C, 6))
            setattr(self, f"{s}_norm1", LayerNorm(C, cfg.eps))
            setattr(self, f"{s}_attn_qkv", nn.Linear(C, 3 * C))
            setattr(self, f"{s}_attn_q_norm", RMSNorm(hd, cfg.eps))
            setattr(self, f"{s}_attn_k_norm", RMSNorm(hd, cfg.eps))
            setattr(self, f"{s}_attn_proj", nn.Linear(C, C))
            setattr(self, f"{s}_norm2", LayerNorm(C, cfg.eps))
            setattr(self, f"{s}_mlp", MLP(C, cfg.mlp_dim, nn.GELU(approximate="tanh")))

    def _qkv(self, s, x, shift, scale):
        # -> q, k, v (B, L, H, D) in the compute dtype, q and k RMS-normed per head
        dt = getattr(self, f"{s}_attn_qkv").bias.dtype  # the bias: a float8 .weight would be upcast just for this
        x = modulate(getattr(self, f"{s}_norm1")(x), shift, scale).to(dt)
        q, k, v = getattr(self, f"{s}_attn_qkv")(x).unflatten(-1, (3, self.heads, -1)).unbind(2)
        return getattr(self, f"{s}_attn_q_norm")(q), getattr(self, f"{s}_attn_k_norm")(k), v

    def forward(self, img, txt, vec, rope, mask):
        # img (B, N, C), txt (B, L, C) fp32; vec (B, C) fp32; rope = (cos, sin) (N, D); mask (B, 1, 1, N+L) bool
        # or None (all keys).
        # Under --sp, rope = (cos, sin, group, N_all): img and the tables hold this rank's ceil(N_all/sp) video
        # tokens, txt is whole on every rank, mask is still the whole (B, 1, 1, N_all+L) (common/sp.py)
        dt = self.img_attn_qkv.bias.dtype  # the bias: a float8 .weight would be upcast just for its dtype
        img_mod = self.img_mod(vec).chunk(6, dim=-1)  # shift1, scale1, gate1, shift2, scale2, gate2
        txt_mod = self.txt_mod(vec).chunk(6, dim=-1)
        iq, ik, iv = self._qkv("img", img, img_mod[0], img_mod[1])
        tq, tk, tv = self._qkv("txt", txt, txt_mod[0], txt_mod[1])
        cos, sin, *group = rope
        iq, ik = rope_apply(iq, cos, sin), rope_apply(ik, cos, sin)  # RoPE on the video tokens only
        N = img.shape[1]
        if group:  # the video over the group's all N_all tokens, the text's valid keys: mask's text part (B, L)
            a_img, a_txt = sp.joint_attention(iq, ik, iv, *group, tq, tk, tv, text_keep(mask, group[1]))
            a_img, a_txt = a_img.flatten(2), a_txt.flatten(2)
        else:
            a = attention(torch.cat([iq, tq], 1), torch.cat([ik, tk], 1), torch.cat([iv, tv], 1), mask)
            a_img, a_txt = a[:, :N], a[:, N:]
        img = img + self.img_attn_proj(a_img).float() * img_mod[2][:, None]
        y = self.img_mlp(modulate(self.img_norm2(img), img_mod[3], img_mod[4]).to(dt))
        img = img + y.float() * img_mod[5][:, None]
        txt = txt + self.txt_attn_proj(a_txt).float() * txt_mod[2][:, None]
        y = self.txt_mlp(modulate(self.txt_norm2(txt), txt_mod[3], txt_mod[4]).to(dt))
        txt = txt + y.float() * txt_mod[5][:, None]
        return img, txt


class MMSingleStreamBlock(nn.Module):
    """One stream over [video tokens, text tokens]: linear1 makes qkv and the MLP input in parallel, linear2 maps
    [attention, GELU(mlp)] back (the parallel block of ViT-22B / Flux)."""

    def __init__(self, cfg: HunyuanConfig):
        super().__init__()
        C, self.heads, self.mlp_dim = cfg.hidden_size, cfg.heads_num, cfg.mlp_dim
        hd = C // cfg.heads_num
        self.linear1 = nn.Linear(C, 3 * C + cfg.mlp_dim)
        self.linear2 = nn.Linear(C + cfg.mlp_dim, C)
        self.q_norm = RMSNorm(hd, cfg.eps)
        self.k_norm = RMSNorm(hd, cfg.eps)
        self.pre_norm = LayerNorm(C, cfg.eps)
        self.mlp_act = nn.GELU(approximate="tanh")
        self.modulation = ModulateDiT(C, 3)

    def forward(self, x, vec, rope, mask, N):
        # x (B, N+L, C) fp32, the first N tokens video; rope (N, D). Under --sp (rope = (cos, sin, group, N_all), as
        # the double block's): the first N are this rank's video shard, the L text tokens after it are whole
        dt = self.linear1.bias.dtype  # the bias: a float8 .weight would be upcast just for its dtype
        shift, scale, gate = self.modulation(vec).chunk(3, dim=-1)
        qkv, mlp = self.linear1(modulate(self.pre_norm(x), shift, scale).to(dt)).split(
            [3 * x.shape[-1], self.mlp_dim], dim=-1)
        q, k, v = qkv.unflatten(-1, (3, self.heads, -1)).unbind(2)
        q, k = self.q_norm(q), self.k_norm(k)
        cos, sin, *group = rope
        q = torch.cat([rope_apply(q[:, :N], cos, sin), q[:, N:]], 1)
        k = torch.cat([rope_apply(k[:, :N], cos, sin), k[:, N:]], 1)
        if group:  # split at the shard: video over the group, text replicated, its valid keys from mask (B, L)
            a = torch.cat(sp.joint_attention(q[:, :N], k[:, :N], v[:, :N], *group, q[:, N:], k[:, N:], v[:, N:],
                                             text_keep(mask, group[1])), 1).flatten(2)
        else:
            a = attention(q, k, v, mask)
        y = self.linear2(torch.cat([a, self.mlp_act(mlp)], dim=-1))
        return x + y.float() * gate[:, None]


class PatchEmbed(nn.Module):
    def __init__(self, patch_size, in_channels, hidden):
        super().__init__()
        self.proj = nn.Conv3d(in_channels, hidden, kernel_size=patch_size, stride=patch_size)

    def forward(self, x):  # (B, C, T, H, W) -> (B, T*H/2*W/2, hidden), tokens ordered t, h, w
        return self.proj(x.to(self.proj.weight.dtype)).flatten(2).transpose(1, 2).float()


class FinalLayer(nn.Module):
    def __init__(self, hidden, out_dim, eps=1e-6):
        super().__init__()
        self.norm_final = LayerNorm(hidden, eps)
        self.linear = nn.Linear(hidden, out_dim)
        self.adaLN_modulation = nn.Sequential(nn.SiLU(), nn.Linear(hidden, 2 * hidden))

    def forward(self, x, vec):
        dt = self.linear.weight.dtype
        shift, scale = self.adaLN_modulation(vec.to(dt)).float().chunk(2, dim=-1)  # (shift, scale): upstream's order
        return self.linear(modulate(self.norm_final(x), shift, scale).to(dt)).float()


class HunyuanVideoDiT(nn.Module):
    """HYVideo-T/2-cfgdistill. forward(x (B,16,T,H,W) latents, t (B,) in [0,1000], text_states (B,L,4096),
    text_mask (B,L) right-padded 0/1, text_states_2 (B,768), guidance (B,) = scale * 1000 or None)
    -> velocity (B,16,T,H,W) fp32."""

    def __init__(self, cfg: HunyuanConfig):
        super().__init__()
        self.cfg = cfg
        C = cfg.hidden_size
        self.img_in = PatchEmbed(cfg.patch_size, cfg.in_channels, C)
        self.txt_in = SingleTokenRefiner(cfg)
        self.time_in = TimestepEmbedder(C)
        self.vector_in = MLPEmbedder(cfg.text_states_dim_2, C)
        self.guidance_in = TimestepEmbedder(C) if cfg.guidance_embed else None
        self.double_blocks = nn.ModuleList(MMDoubleStreamBlock(cfg) for _ in range(cfg.mm_double_blocks_depth))
        self.single_blocks = nn.ModuleList(MMSingleStreamBlock(cfg) for _ in range(cfg.mm_single_blocks_depth))
        self.final_layer = FinalLayer(C, math.prod(cfg.patch_size) * cfg.out_channels, cfg.eps)
        self.rope_cache = {}  # (t, h, w, device) -> (cos, sin): a plain dict, not a buffer (not a checkpoint key)
        self.sp = None  # --sp N > 1: this rank's sequence-parallel group (common/sp.py), set by build_dit
        self.text_multiple = 1  # the text's length is rounded up to this (build_dit: 32 with --compile)

    def rope(self, t, h, w, device):
        key = (t, h, w, str(device))
        if key not in self.rope_cache:
            self.rope_cache[key] = rope_tables(t, h, w, self.cfg.rope_dim_list, self.cfg.rope_theta, device)
        return self.rope_cache[key]

    def forward(self, x, t, text_states, text_mask, text_states_2, guidance=None):
        cfg = self.cfg
        B = x.shape[0]
        pt, ph, pw = cfg.patch_size
        T, H, W = x.shape[2] // pt, x.shape[3] // ph, x.shape[4] // pw
        vec = self.time_in(t) + self.vector_in(text_states_2)  # (B, C) fp32
        if self.guidance_in is not None:
            assert guidance is not None, "this checkpoint is guidance-distilled: pass guidance = scale * 1000"
            vec = vec + self.guidance_in(guidance)
        # joint attention: every query sees the video tokens and the valid (right-padded: a prefix) text tokens, as
        # upstream's flash-attn varlen segments [video + valid text] (the video tokens are all that reach the
        # output). Padded text never reaches them, so the text is cut to the batch's longest prompt (rounded up to
        # text_multiple: under torch.compile each distinct length is a recompile) and the padded keys are masked
        # only where some prompt is shorter than that. At batch 1 without --compile there is no mask at all, and
        # SDPA may take its flash kernel (a mask rules it out). (One host sync per forward.)
        n_text = text_mask.sum(1)
        L = -(-int(n_text.max()) // self.text_multiple) * self.text_multiple
        assert torch.equal(text_mask[:, :L].sum(1), n_text), "text_mask must be right-padded (real tokens first)"
        pad = L - min(L, text_states.shape[1])  # > 0 only when rounding up goes past the given length
        text_states, text_mask = F.pad(text_states[:, :L], (0, 0, 0, pad)), F.pad(text_mask[:, :L], (0, pad))
        img = self.img_in(x)  # (B, N, C)
        txt = self.txt_in(text_states, t, text_mask)  # (B, L, C)
        N = img.shape[1]
        mask = None if bool((n_text == L).all()) else torch.cat(
            [torch.ones(B, N, dtype=torch.bool, device=x.device), text_mask.bool()], 1)[:, None, None]  # (B,1,1,N+L)
        rope = self.rope(T, H, W, x.device)
        if self.sp is not None:  # --sp N: from here to the final layer each rank holds ceil(N/sp) of the video tokens;
            # the text, vec and the mask stay whole (the refiner and the embeddings ran whole on every rank)
            img = sp.shard(img, self.sp)
            rope = (*(sp.shard(r, self.sp, dim=0) for r in rope), self.sp, N)
        for block in self.double_blocks:
            img, txt = block(img, txt, vec, rope, mask)
        Ns = img.shape[1]  # this rank's video tokens (N without --sp)
        x = torch.cat([img, txt], 1)  # (B, Ns+L, C): under --sp the rank's video shard, then the whole text
        for block in self.single_blocks:
            x = block(x, vec, rope, mask, Ns)
        x = self.final_layer(x[:, :Ns], vec)  # (B, Ns, C_out * pt * ph * pw), features ordered (c, pt, ph, pw)
        if self.sp is not None:
            x = sp.gather(x, self.sp, N)  # every rank of the group gets the whole output (the loss is computed whole)
        x = x.view(B, T, H, W, cfg.out_channels, pt, ph, pw).permute(0, 4, 1, 5, 2, 6, 3, 7)
        return x.reshape(B, cfg.out_channels, T * pt, H * ph, W * pw)

    @torch.no_grad()
    def init_weights(self):
        """A from-scratch init (toy/tiny runs only; real runs load the released weights): PyTorch's default for
        every Linear/Conv, unit norms, and upstream's zeros for every modulation and the output projection, so each
        block starts as the identity and the model predicts 0."""
        for m in self.modules():
            if isinstance(m, (nn.Linear, nn.Conv3d)):
                m.reset_parameters()
            elif isinstance(m, (RMSNorm, nn.LayerNorm)) and m.weight is not None:
                nn.init.ones_(m.weight)
                if getattr(m, "bias", None) is not None:
                    nn.init.zeros_(m.bias)
        zero = [m.linear for m in self.modules() if isinstance(m, ModulateDiT)]
        zero += [b.adaLN_modulation[1] for b in self.txt_in.individual_token_refiner.blocks]
        zero += [self.final_layer.linear, self.final_layer.adaLN_modulation[1]]
        for lin in zero:
            nn.init.zeros_(lin.weight)
            nn.init.zeros_(lin.bias)


def count_flops(cfg: HunyuanConfig, t, h, w, text_len=256):
    """Forward FLOPs of one sample on a (t, h, w) latent grid: 2 per multiply-add of every Linear/Conv, plus joint
    attention (QK^T and PV, 4 * S * S * hidden). Training is 3x this (see train_wan.count_flops)."""
    N = (t // cfg.patch_size[0]) * (h // cfg.patch_size[1]) * (w // cfg.patch_size[2])
    S, C, M = N + text_len, cfg.hidden_size, cfg.mlp_dim
    double = 2 * S * (3 * C * C + C * C + 2 * C * M) + 4 * S * S * C
    single = 2 * S * (C * (3 * C + M) + (C + M) * C) + 4 * S * S * C
    refiner = cfg.refiner_depth * (2 * text_len * (4 * C * C + 2 * C * cfg.refiner_mlp_dim) + 4 * text_len ** 2 * C)
    p = math.prod(cfg.patch_size)
    rest = 2 * N * cfg.in_channels * p * C + 2 * N * C * p * cfg.out_channels
    rest += 2 * text_len * cfg.text_states_dim * C + refiner
    # the per-sample vectors: time / guidance / refiner-time MLPs, vector_in, c_embedder, every modulation
    vec = 2 * ((2 + cfg.guidance_embed) * (256 * C + C * C) + (cfg.text_states_dim_2 + cfg.text_states_dim) * C
               + 2 * C * C)
    vec += 2 * C * C * (12 * cfg.mm_double_blocks_depth + 3 * cfg.mm_single_blocks_depth + 2 * cfg.refiner_depth + 2)
    return cfg.mm_double_blocks_depth * double + cfg.mm_single_blocks_depth * single + rest + vec


# -----------------------------------------------------------------------------------------------------
# VAE: the causal 3-D VAE "884-16c-hy" (hyvideo/vae/autoencoder_kl_causal_3d.py AutoencoderKLCausal3D)
#
# Video (B, 3, T, H, W) in [-1, 1], T = 1 + 4k, H and W multiples of 8 <-> latents (B, 16, 1 + k, H/8, W/8). Every
# conv is causal in time: all of its temporal padding (kernel - 1 frames, replicating frame 0) is in front, so the
# first frame is encoded on its own and images are 1-frame videos. Not strictly causal overall: the GroupNorms take
# their statistics over all frames. Inference only, frozen; same keys as the official pytorch_model.pt (248 tensors,
# 246,478,803 params). HunyuanVAE.tiling and .temporal_tiling trade exactness for memory, as upstream's inference
# does (on by default in the script, --vae_tiling: clips larger than a tile only); unset, the whole video goes
# through at once: exact, and memory-hungry at full size.

VAE_SCALE = 0.476986  # latents for the DiT = posterior mean * this (no shift)
VAE_TILING = (256, 192)  # upstream's spatial tiles: 256 px, overlapping by 1/4 (tile_overlap_factor 0.25)
VAE_TEMPORAL_TILING = (64, 48)  # upstream's temporal tiles: 64 frames (16 latent), every 48 (overlap 1/4)


@dataclass
class VAEConfig:
    block_out_channels: tuple = (128, 256, 512, 512)
    layers_per_block: int = 2  # resnets per encoder stage; each decoder stage has one more
    latent_channels: int = 16
    norm_num_groups: int = 32
    scaling_factor: float = VAE_SCALE


VAE_PRESETS = {
    "884-16c-hy": VAEConfig(),
    "tiny": VAEConfig(block_out_channels=(8, 16, 32, 32), norm_num_groups=4),  # tests only: same blocks and keys
}


class CausalConv3d(nn.Module):
    """Replicate-pad W and H by k//2 on both sides and T by k-1 in front, then a plain Conv3d (key `.conv`)."""

    def __init__(self, c_in, c_out, kernel_size, stride=1):
        super().__init__()
        k = kernel_size
        self.pad = (k // 2, k // 2, k // 2, k // 2, k - 1, 0)  # (W, H, T), F.pad's order
        self.conv = nn.Conv3d(c_in, c_out, k, stride=stride)

    def forward(self, x):
        return self.conv(F.pad(x, self.pad, mode="replicate"))


class ResnetBlockCausal3D(nn.Module):
    def __init__(self, c_in, c_out, groups):
        super().__init__()
        self.norm1 = nn.GroupNorm(groups, c_in, eps=1e-6)
        self.conv1 = CausalConv3d(c_in, c_out, 3)
        self.norm2 = nn.GroupNorm(groups, c_out, eps=1e-6)
        self.conv2 = CausalConv3d(c_out, c_out, 3)
        self.conv_shortcut = CausalConv3d(c_in, c_out, 1) if c_in != c_out else None

    def forward(self, x):
        h = self.conv1(F.silu(self.norm1(x)))
        h = self.conv2(F.silu(self.norm2(h)))  # (upstream's dropout here has p = 0)
        return (self.conv_shortcut(x) if self.conv_shortcut is not None else x) + h


class VAEAttention(nn.Module):
    """Single-head self-attention over all (f h w) positions, GroupNorm first, residual; a token attends to every
    token of its own frame and of the frames before it (causal per frame)."""

    def __init__(self, dim, groups):
        super().__init__()
        self.group_norm = nn.GroupNorm(groups, dim, eps=1e-6)
        self.to_q, self.to_k, self.to_v = nn.Linear(dim, dim), nn.Linear(dim, dim), nn.Linear(dim, dim)
        self.to_out = nn.ModuleList([nn.Linear(dim, dim)])  # to_out.0 (slot 1 is upstream's Dropout(0))

    def forward(self, x):
        B, C, T, H, W = x.shape
        h = self.group_norm(x.flatten(2)).transpose(1, 2)  # (B, T*H*W, C), statistics over all frames
        frame = torch.arange(T, device=x.device).repeat_interleave(H * W)
        # (L, L): key frame <= query frame. Quadratic in L (at 544x960x129 untiled L = 269,280, a 72 GB bool mask):
        # --vae_tiling bounds it to one tile, L <= 17 * 32 * 32 (0.3 GB). One call per query frame over the keys
        # before it would need no mask but is not bit-equal (1e-5 apart after the decoder): upstream's call kept.
        mask = frame[None, :] <= frame[:, None]
        q, k, v = (f(h)[:, None] for f in (self.to_q, self.to_k, self.to_v))  # (B, 1, L, C)
        y = self.to_out[0](F.scaled_dot_product_attention(q, k, v, attn_mask=mask)[:, 0])
        return x + y.transpose(1, 2).reshape(B, C, T, H, W)


class UNetMidBlockCausal3D(nn.Module):
    def __init__(self, dim, groups):
        super().__init__()
        self.resnets = nn.ModuleList([ResnetBlockCausal3D(dim, dim, groups), ResnetBlockCausal3D(dim, dim, groups)])
        self.attentions = nn.ModuleList([VAEAttention(dim, groups)])

    def forward(self, x):
        return self.resnets[1](self.attentions[0](self.resnets[0](x)))


class DownsampleCausal3D(nn.Module):
    def __init__(self, dim, stride):
        super().__init__()
        self.conv = CausalConv3d(dim, dim, 3, stride=stride)

    def forward(self, x):
        return self.conv(x)


class UpsampleCausal3D(nn.Module):
    """Nearest-neighbour upsampling by `factor` (t, h, w), except that frame 0 is only upsampled in space (it stays
    one frame: 1 + k latent frames -> 1 + 2k), then a causal conv."""

    def __init__(self, dim, factor):
        super().__init__()
        self.factor = factor
        self.conv = CausalConv3d(dim, dim, 3)

    def forward(self, x):
        first = F.interpolate(x[:, :, 0], scale_factor=self.factor[1:], mode="nearest")[:, :, None]
        if x.shape[2] > 1:
            rest = F.interpolate(x[:, :, 1:], scale_factor=self.factor, mode="nearest")
            first = torch.cat([first, rest], dim=2)
        return self.conv(first)


class DownEncoderBlockCausal3D(nn.Module):
    def __init__(self, c_in, c_out, n, groups, stride):
        super().__init__()
        self.resnets = nn.ModuleList(ResnetBlockCausal3D(c_in if i == 0 else c_out, c_out, groups) for i in range(n))
        self.downsamplers = nn.ModuleList([DownsampleCausal3D(c_out, stride)]) if stride else None

    def forward(self, x):
        for r in self.resnets:
            x = r(x)
        return self.downsamplers[0](x) if self.downsamplers is not None else x


class UpDecoderBlockCausal3D(nn.Module):
    def __init__(self, c_in, c_out, n, groups, factor):
        super().__init__()
        self.resnets = nn.ModuleList(ResnetBlockCausal3D(c_in if i == 0 else c_out, c_out, groups) for i in range(n))
        self.upsamplers = nn.ModuleList([UpsampleCausal3D(c_out, factor)]) if factor else None

    def forward(self, x):
        for r in self.resnets:
            x = r(x)
        return self.upsamplers[0](x) if self.upsamplers is not None else x


# The stages' strides: 3 spatial halvings (stages 0-2) and 2 temporal ones (stages 1-2), the last stage none.
VAE_STRIDES = ((1, 2, 2), (2, 2, 2), (2, 2, 2), None)


class EncoderCausal3D(nn.Module):
    def __init__(self, cfg: VAEConfig):
        super().__init__()
        ch, g = cfg.block_out_channels, cfg.norm_num_groups
        self.conv_in = CausalConv3d(3, ch[0], 3)
        self.down_blocks = nn.ModuleList(
            DownEncoderBlockCausal3D(ch[max(i - 1, 0)], ch[i], cfg.layers_per_block, g, VAE_STRIDES[i])
            for i in range(len(ch)))
        self.mid_block = UNetMidBlockCausal3D(ch[-1], g)
        self.conv_norm_out = nn.GroupNorm(g, ch[-1], eps=1e-6)
        self.conv_out = CausalConv3d(ch[-1], 2 * cfg.latent_channels, 3)  # mean and log-variance

    def forward(self, x):
        x = self.conv_in(x)
        for b in self.down_blocks:
            x = b(x)
        return self.conv_out(F.silu(self.conv_norm_out(self.mid_block(x))))


class DecoderCausal3D(nn.Module):
    def __init__(self, cfg: VAEConfig):
        super().__init__()
        ch, g = tuple(reversed(cfg.block_out_channels)), cfg.norm_num_groups  # 512, 512, 256, 128
        self.conv_in = CausalConv3d(cfg.latent_channels, ch[0], 3)
        self.mid_block = UNetMidBlockCausal3D(ch[0], g)
        self.up_blocks = nn.ModuleList(
            UpDecoderBlockCausal3D(ch[max(i - 1, 0)], ch[i], cfg.layers_per_block + 1, g, VAE_STRIDES[i])
            for i in range(len(ch)))
        self.conv_norm_out = nn.GroupNorm(g, ch[-1], eps=1e-6)
        self.conv_out = CausalConv3d(ch[-1], 3, 3)

    def forward(self, z):
        x = self.mid_block(self.conv_in(z))
        for b in self.up_blocks:
            x = b(x)
        return self.conv_out(F.silu(self.conv_norm_out(x)))


def _blend(a, b, n, dim):
    """Fade from tile a's last n rows (along dim) into tile b's first n, linearly, in place in b (upstream's
    blend_v / blend_h): row x of the overlap is a * (1 - x/n) + b * x/n."""
    n = min(a.shape[dim], b.shape[dim], n)
    if n <= 0:
        return b
    shape = [1] * b.dim()
    shape[dim] = n
    w = (torch.arange(n, device=b.device, dtype=torch.float64) / n).view(shape).to(b.dtype)
    b.narrow(dim, 0, n).copy_(a.narrow(dim, a.shape[dim] - n, n) * (1 - w) + b.narrow(dim, 0, n) * w)
    return b


def _tiled(fn, x, size, stride, scale):
    """Run fn over overlapping spatial tiles of x (B, C, T, H, W): tiles of size x size starting every stride rows and
    columns; fn maps a tile's H, W to H*scale, W*scale. Each tile is blended into its upper and left neighbours over
    the overlap, cropped to the stride, and the crops are put together. Upstream's tiling for memory: not exact."""
    H, W = x.shape[-2:]
    rows = [[fn(x[..., i:i + size, j:j + size]) for j in range(0, W, stride)] for i in range(0, H, stride)]
    out_stride, blend = int(stride * scale), int((size - stride) * scale)
    out_rows = []
    for i, row in enumerate(rows):
        out = []
        for j, tile in enumerate(row):
            if i > 0:
                tile = _blend(rows[i - 1][j], tile, blend, -2)
            if j > 0:
                tile = _blend(row[j - 1], tile, blend, -1)
            out.append(tile[..., :out_stride, :out_stride])
        out_rows.append(torch.cat(out, dim=-1))
    return torch.cat(out_rows, dim=-2)[..., :int(H * scale), :int(W * scale)]


def _tiled_time(fn, x, size, stride, scale):
    """Run fn over overlapping temporal tiles of x (B, C, T, H, W): tiles of size + 1 frames starting every stride
    frames; fn maps 1 + n frames to 1 + n*scale (causal: the extra frame is the tile's own first frame). A tile after
    the first drops its first output frame (it stands for the last frame of the stride before it), is blended into
    the tile before over (size - stride) * scale frames and cropped to stride * scale; the first tile keeps one frame
    more. Upstream's temporal_tiled_encode / _decode: for memory, not exact."""
    tiles = [fn(x[:, :, i:i + size + 1]) for i in range(0, x.shape[2], stride)]
    tiles = [t if i == 0 else t[:, :, 1:] for i, t in enumerate(tiles)]
    keep, blend = int(stride * scale), int((size - stride) * scale)
    out = [tiles[0][:, :, :keep + 1]]
    for i in range(1, len(tiles)):
        out.append(_blend(tiles[i - 1], tiles[i], blend, 2)[:, :, :keep])
    return torch.cat(out, dim=2)


class HunyuanVAE(nn.Module):
    def __init__(self, cfg: VAEConfig = VAEConfig()):
        super().__init__()
        self.cfg = cfg
        C = cfg.latent_channels
        self.encoder = EncoderCausal3D(cfg)
        self.decoder = DecoderCausal3D(cfg)
        self.quant_conv = nn.Conv3d(2 * C, 2 * C, 1)
        self.post_quant_conv = nn.Conv3d(C, C, 1)
        # spatial tiling, off on a bare HunyuanVAE (the exact path; build_encoders turns it on with --vae_tiling 1,
        # the default): (tile, stride) in pixels, upstream's (256, 192) = tiles of 256 px overlapping by 1/4. For
        # memory only: at 544x960x129 the fp32 activations of a whole frame stack run to tens of GB; tiles bound
        # them, at the price of seams blended away (the output differs from untiled).
        self.tiling = None
        # temporal tiling, likewise: (tile, stride) in video frames, upstream's (64, 48). Clips longer than the tile
        # go through in overlapping chunks of 1 + 64 frames (the GroupNorms then see one chunk at a time)
        self.temporal_tiling = None

    def tiles(self, shape, latent=False):
        """(spatial, temporal): whether a video (..., T, H, W) is encoded, or latents (..., t, h, w) with
        latent=True are decoded, in tiles. Upstream's rule (autoencoder_kl_causal_3d.py encode / _decode): only
        what is larger than one tile is tiled, H or W > 256 and T > 64 (latents: h or w > 32, t > 16); a smaller
        clip goes through whole, exactly as untiled."""
        T, H, W = shape[-3:]
        size, ts = (self.tiling or (0,))[0], (self.temporal_tiling or (0,))[0]
        if latent:
            size, ts = size // 8, ts // 4
        return bool(self.tiling) and max(H, W) > size, bool(self.temporal_tiling) and T > ts

    def posterior(self, video):
        """(B, 3, T, H, W) in [-1, 1] -> mean, std (B, 16, 1 + (T-1)/4, H/8, W/8), unscaled, fp32."""
        B, C, T, H, W = video.shape
        assert C == 3 and T % 4 == 1 and H % 8 == 0 and W % 8 == 0, \
            f"video must be (B, 3, 1+4k, 8m, 8n), got {tuple(video.shape)}"
        video = video.to(self.quant_conv.weight.dtype)
        plain = lambda v: self.quant_conv(self.encoder(v))  # noqa: E731
        spatial, temporal = self.tiles(video.shape)
        enc = (lambda v: _tiled(plain, v, *self.tiling, 1 / 8)) if spatial else plain
        moments = _tiled_time(enc, video, *self.temporal_tiling, 1 / 4) if temporal else enc(video)
        moments = moments.float()
        mean, logvar = moments.chunk(2, dim=1)
        return mean, torch.exp(0.5 * logvar.clamp(-30.0, 20.0))

    def encode(self, video, generator=None, sample=False):
        """-> latents for the DiT: the posterior mean (or, with sample=True, mean + std * N(0, 1)) x 0.476986."""
        mean, std = self.posterior(video)
        if sample:
            mean = mean + std * torch.randn(mean.shape, generator=generator, device=mean.device)
        return mean * self.cfg.scaling_factor

    def decode(self, latents):
        """DiT latents (B, 16, t, h, w) -> video (B, 3, 1 + 4(t-1), 8h, 8w) in [-1, 1], fp32."""
        z = (latents.float() / self.cfg.scaling_factor).to(self.post_quant_conv.weight.dtype)
        plain = lambda z: self.decoder(self.post_quant_conv(z))  # noqa: E731
        spatial, temporal = self.tiles(z.shape, latent=True)
        size, stride = self.tiling or (0, 0)
        dec = (lambda z: _tiled(plain, z, size // 8, stride // 8, 8)) if spatial else plain
        ts, tstride = self.temporal_tiling or (0, 0)
        out = _tiled_time(dec, z, ts // 4, tstride // 4, 4) if temporal else dec(z)
        return out.float().clamp(-1, 1)


# -----------------------------------------------------------------------------------------------------
# Text encoders, inference only, frozen (hyvideo/text_encoder/__init__.py, hyvideo/constants.py):
#   1. llava-llama-3-8b's language model, text only: the prompt goes into a chat template, is tokenized to
#      crop_start + 256 tokens, and the hidden state after all but the last 2 decoder layers (HF hidden_states[-3],
#      no final norm) minus the template's crop_start tokens is text_states (B, 256, 4096) with its mask.
#   2. CLIP-L/14's text model: the pooled output (final LayerNorm at the first EOS; not projected) is
#      text_states_2 (B, 768).
# Module names equal the Hugging Face keys (LlamaModel; CLIPTextModel's text_model.*), so the folders load as they are.

PROMPT_TEMPLATE_VIDEO = (  # upstream's "dit-llm-encode-video" (crop_start 95 with the Llama-3 tokenizer)
    "<|start_header_id|>system<|end_header_id|>\n\nDescribe the video by detailing the following aspects: "
    "1. The main content and theme of the video."
    "2. The color, shape, size, texture, quantity, text, and spatial relationships of the objects."
    "3. Actions, events, behaviors temporal relationships, physical movement changes of the objects."
    "4. background environment, light, style and atmosphere."
    "5. camera angles, movements, and transitions used in the video:<|eot_id|>"
    "<|start_header_id|>user<|end_header_id|>\n\n{}<|eot_id|>")
PROMPT_TEMPLATE_IMAGE = (  # "dit-llm-encode" (crop_start 36): official inference uses it for 1-frame videos
    "<|start_header_id|>system<|end_header_id|>\n\nDescribe the image by detailing the color, shape, size, texture, "
    "quantity, text, spatial relationships of the objects and background:<|eot_id|>"
    "<|start_header_id|>user<|end_header_id|>\n\n{}<|eot_id|>")
PROMPT_TEMPLATES = {"video": PROMPT_TEMPLATE_VIDEO, "image": PROMPT_TEMPLATE_IMAGE}  # upstream's data_type names
TEXT_LEN = 256  # Llama tokens after the crop
CLIP_LEN = 77


@dataclass
class LlamaConfig:
    vocab_size: int = 128320  # llava's Llama-3 vocabulary (128256 + image/pad tokens, rounded)
    hidden_size: int = 4096
    intermediate_size: int = 14336
    num_hidden_layers: int = 32
    num_attention_heads: int = 32
    num_key_value_heads: int = 8
    head_dim: int = 128
    rms_norm_eps: float = 1e-5
    rope_theta: float = 500000.0
    skip_layers: int = 2  # upstream's hidden_state_skip_layer: the last 2 layers (and the final norm) are not run


@dataclass
class CLIPTextConfig:
    vocab_size: int = 49408
    hidden_size: int = 768
    intermediate_size: int = 3072
    num_hidden_layers: int = 12
    num_attention_heads: int = 12
    max_position_embeddings: int = 77
    layer_norm_eps: float = 1e-5


class LlamaRMSNorm(nn.Module):
    def __init__(self, dim, eps):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x):  # statistics in fp32, rounded to the input dtype before the gain (as HF)
        xf = x.float()
        return self.weight * (xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + self.eps)).to(x.dtype)


class LlamaAttention(nn.Module):
    def __init__(self, cfg: LlamaConfig):
        super().__init__()
        self.n, self.n_kv, self.d = cfg.num_attention_heads, cfg.num_key_value_heads, cfg.head_dim
        self.q_proj = nn.Linear(cfg.hidden_size, self.n * self.d, bias=False)
        self.k_proj = nn.Linear(cfg.hidden_size, self.n_kv * self.d, bias=False)
        self.v_proj = nn.Linear(cfg.hidden_size, self.n_kv * self.d, bias=False)
        self.o_proj = nn.Linear(self.n * self.d, cfg.hidden_size, bias=False)

    def forward(self, x, cos, sin, mask):
        B, L, _ = x.shape
        q = self.q_proj(x).view(B, L, self.n, self.d).transpose(1, 2)  # (B, n, L, d)
        k = self.k_proj(x).view(B, L, self.n_kv, self.d).transpose(1, 2)
        v = self.v_proj(x).view(B, L, self.n_kv, self.d).transpose(1, 2)

        def rot(t):  # Llama's RoPE: rotate the two HALVES of head_dim (not adjacent pairs as the DiT)
            t1, t2 = t.chunk(2, dim=-1)
            return t * cos + torch.cat([-t2, t1], dim=-1) * sin
        q, k = rot(q), rot(k)
        y = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, enable_gqa=True)  # 8 KV heads serve 32 queries
        return self.o_proj(y.transpose(1, 2).reshape(B, L, -1))


class LlamaMLP(nn.Module):
    def __init__(self, cfg: LlamaConfig):
        super().__init__()
        self.gate_proj = nn.Linear(cfg.hidden_size, cfg.intermediate_size, bias=False)
        self.up_proj = nn.Linear(cfg.hidden_size, cfg.intermediate_size, bias=False)
        self.down_proj = nn.Linear(cfg.intermediate_size, cfg.hidden_size, bias=False)

    def forward(self, x):
        return self.down_proj(F.silu(self.gate_proj(x)) * self.up_proj(x))


class LlamaDecoderLayer(nn.Module):
    def __init__(self, cfg: LlamaConfig):
        super().__init__()
        self.self_attn = LlamaAttention(cfg)
        self.mlp = LlamaMLP(cfg)
        self.input_layernorm = LlamaRMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.post_attention_layernorm = LlamaRMSNorm(cfg.hidden_size, cfg.rms_norm_eps)

    def forward(self, x, cos, sin, mask):
        x = x + self.self_attn(self.input_layernorm(x), cos, sin, mask)
        return x + self.mlp(self.post_attention_layernorm(x))


class LlamaModel(nn.Module):
    """The decoder layers that upstream uses: num_hidden_layers - skip_layers of them. The file's last layers and
    final norm are never run, so they are not built (and not read)."""

    def __init__(self, cfg: LlamaConfig):
        super().__init__()
        self.cfg = cfg
        self.embed_tokens = nn.Embedding(cfg.vocab_size, cfg.hidden_size)
        self.layers = nn.ModuleList(LlamaDecoderLayer(cfg) for _ in range(cfg.num_hidden_layers - cfg.skip_layers))

    def forward(self, ids, mask):
        # ids, mask (B, L), right-padded -> (B, L, hidden): HF LlamaModel(...).hidden_states[-(skip_layers + 1)]
        B, L = ids.shape
        x = self.embed_tokens(ids)
        d = self.cfg.head_dim
        inv = 1.0 / self.cfg.rope_theta ** (torch.arange(0, d, 2, dtype=torch.float32, device=ids.device) / d)
        ang = torch.outer(torch.arange(L, dtype=torch.float32, device=ids.device), inv)
        ang = torch.cat([ang, ang], dim=-1)  # (L, d): the same angle for element i and i + d/2
        cos, sin = ang.cos().to(x.dtype), ang.sin().to(x.dtype)
        causal = torch.ones(L, L, dtype=torch.bool, device=ids.device).tril()
        attn_mask = causal[None, None] & mask.bool()[:, None, None, :]  # (B, 1, L, L); padded keys never seen
        for layer in self.layers:
            x = layer(x, cos, sin, attn_mask)
        return x


class CLIPAttention(nn.Module):
    def __init__(self, cfg: CLIPTextConfig):
        super().__init__()
        C, self.n = cfg.hidden_size, cfg.num_attention_heads
        self.q_proj, self.k_proj, self.v_proj, self.out_proj = (nn.Linear(C, C) for _ in range(4))

    def forward(self, x, mask):
        B, L, C = x.shape
        q, k, v = (f(x).view(B, L, self.n, -1).transpose(1, 2) for f in (self.q_proj, self.k_proj, self.v_proj))
        return self.out_proj(F.scaled_dot_product_attention(q, k, v, attn_mask=mask).transpose(1, 2).reshape(B, L, C))


class CLIPMLP(nn.Module):
    def __init__(self, cfg: CLIPTextConfig):
        super().__init__()
        self.fc1 = nn.Linear(cfg.hidden_size, cfg.intermediate_size)
        self.fc2 = nn.Linear(cfg.intermediate_size, cfg.hidden_size)

    def forward(self, x):
        h = self.fc1(x)
        return self.fc2(h * torch.sigmoid(1.702 * h))  # quick_gelu


class CLIPEncoderLayer(nn.Module):
    def __init__(self, cfg: CLIPTextConfig):
        super().__init__()
        self.layer_norm1 = nn.LayerNorm(cfg.hidden_size, eps=cfg.layer_norm_eps)
        self.self_attn = CLIPAttention(cfg)
        self.layer_norm2 = nn.LayerNorm(cfg.hidden_size, eps=cfg.layer_norm_eps)
        self.mlp = CLIPMLP(cfg)

    def forward(self, x, mask):
        x = x + self.self_attn(self.layer_norm1(x), mask)
        return x + self.mlp(self.layer_norm2(x))


class CLIPEmbeddings(nn.Module):
    def __init__(self, cfg: CLIPTextConfig):
        super().__init__()
        self.token_embedding = nn.Embedding(cfg.vocab_size, cfg.hidden_size)
        self.position_embedding = nn.Embedding(cfg.max_position_embeddings, cfg.hidden_size)


class CLIPEncoder(nn.Module):
    def __init__(self, cfg: CLIPTextConfig):
        super().__init__()
        self.layers = nn.ModuleList(CLIPEncoderLayer(cfg) for _ in range(cfg.num_hidden_layers))


class CLIPTextTransformer(nn.Module):
    def __init__(self, cfg: CLIPTextConfig):
        super().__init__()
        self.embeddings = CLIPEmbeddings(cfg)
        self.encoder = CLIPEncoder(cfg)
        self.final_layer_norm = nn.LayerNorm(cfg.hidden_size, eps=cfg.layer_norm_eps)


class CLIPTextModel(nn.Module):
    def __init__(self, cfg: CLIPTextConfig):
        super().__init__()
        self.cfg = cfg
        self.text_model = CLIPTextTransformer(cfg)

    def forward(self, ids, mask, eos_id):
        # ids, mask (B, L) -> pooled (B, hidden): the final LayerNorm's output at each row's first EOS token
        tm, (B, L) = self.text_model, ids.shape
        x = tm.embeddings.token_embedding(ids) + tm.embeddings.position_embedding(torch.arange(L, device=ids.device))
        causal = torch.ones(L, L, dtype=torch.bool, device=ids.device).tril()
        attn_mask = causal[None, None] & mask.bool()[:, None, None, :]
        for layer in tm.encoder.layers:
            x = layer(x, attn_mask)
        x = tm.final_layer_norm(x)
        return x[torch.arange(B, device=ids.device), (ids == eos_id).int().argmax(-1)]


class HFTokenizer:
    """A Hugging Face tokenizer.json through the `tokenizers` library, with HF's padding="max_length",
    truncation=True: [bos] + pieces (+ [eos]), truncated so that the special tokens fit, right-padded with pad_id."""

    def __init__(self, path, bos, eos, pad):
        import tokenizers
        self.tok = tokenizers.Tokenizer.from_file(path)
        ids = [self.tok.token_to_id(t) if t is not None else None for t in (bos, eos, pad)]
        assert None not in [i for i, t in zip(ids, (bos, eos, pad)) if t is not None], f"{path}: no {bos}/{eos}/{pad}"
        self.bos_id, self.eos_id, self.pad_id = ids

    def __call__(self, texts, max_len):  # -> ids, mask (B, max_len) int64
        pieces = [e.ids for e in self.tok.encode_batch(texts, add_special_tokens=False)]
        ids = torch.full((len(texts), max_len), self.pad_id, dtype=torch.long)
        mask = torch.zeros(len(texts), max_len, dtype=torch.long)
        tail = [self.eos_id] if self.eos_id is not None else []
        for i, p in enumerate(pieces):
            p = [self.bos_id] + p[: max_len - 1 - len(tail)] + tail
            ids[i, : len(p)], mask[i, : len(p)] = torch.tensor(p), 1
        return ids, mask


class TextEncoders:
    """prompts -> (text_states (B, 256, 4096), text_mask (B, 256), text_states_2 (B, 768)), as upstream's pipeline
    makes them. crop_start is the template prefix's token count (+ BOS), 95 for the video template with the
    Llama-3 tokenizer (upstream hard-codes that number; checked once with Meta's released Llama-3 vocabulary:
    95 and 36, through tiktoken and through this class on the same vocabulary as a tokenizer.json).
    encode(prompts, template) takes another template (the image one) for one call; CLIP never sees a template."""

    def __init__(self, llm, llm_tok, clip, clip_tok, template=PROMPT_TEMPLATE_VIDEO):
        self.llm, self.llm_tok, self.clip, self.clip_tok, self.template = llm, llm_tok, clip, clip_tok, template
        self.crop_start = self.crop(template)

    def crop(self, template):
        prefix = template.split("{}")[0]
        return 1 + len(self.llm_tok.tok.encode(prefix, add_special_tokens=False).ids)

    @torch.no_grad()
    def encode(self, prompts, template=None):
        template = template or self.template
        crop = self.crop_start if template == self.template else self.crop(template)
        prompts = [p.strip() for p in prompts]
        ids, mask = self.llm_tok([template.format(p) for p in prompts], TEXT_LEN + crop)
        dev = self.llm.embed_tokens.weight.device
        h = self.llm(ids.to(dev), mask.to(dev))
        text_states, text_mask = h[:, crop:], mask[:, crop:].to(dev)
        cids, cmask = self.clip_tok(prompts, CLIP_LEN)
        dev2 = self.clip.text_model.final_layer_norm.weight.device
        text_states_2 = self.clip(cids.to(dev2), cmask.to(dev2), self.clip_tok.eos_id)
        return text_states, text_mask, text_states_2


def _hf_folder(path):
    """-> (config.json as a dict, state dict) of a Hugging Face model folder (one .safetensors, or shards + index)."""
    import glob
    from common.weights import read_safetensors
    with open(os.path.join(path, "config.json")) as f:
        cfg = json.load(f)
    index = glob.glob(os.path.join(path, "*.safetensors.index.json"))
    if index:
        with open(index[0]) as f:
            files = [os.path.join(path, s) for s in sorted(set(json.load(f)["weight_map"].values()))]
    else:
        files = sorted(glob.glob(os.path.join(path, "*.safetensors")))
    if not files:
        raise FileNotFoundError(f"{path}: no .safetensors weights")
    return cfg, read_safetensors(files)


def _fields(cls, c):
    return {f: c[f] for f in cls.__dataclass_fields__ if f in c}


def _load_strict(model, sd, path):
    check_keys(model.state_dict().keys(), sd, path)
    check_shapes(model.state_dict(), sd, path)
    model.load_state_dict(sd, assign=True)
    return model.eval().requires_grad_(False)


def load_llm(path, dtype=torch.float32, device="cpu"):
    """The Llama text encoder from upstream's ckpts/text_encoder folder (LlamaModel or LlamaForCausalLM keys, or a
    whole llava-llama-3 folder: language_model.* taken, the vision tower dropped) -> (LlamaModel, tokenizer)."""
    c, sd = _hf_folder(path)
    c = c.get("text_config", c)
    c = {**c, **c.get("rope_parameters", {})}  # transformers 5 keeps rope_theta there
    cfg = LlamaConfig(**_fields(LlamaConfig, c))
    if "head_dim" not in c:
        cfg.head_dim = cfg.hidden_size // cfg.num_attention_heads
    for prefix in ("language_model.model.", "model.language_model.", "model."):
        if any(k.startswith(prefix) for k in sd):
            sd = {k[len(prefix):]: v for k, v in sd.items() if k.startswith(prefix)}
            break
    n_used = cfg.num_hidden_layers - cfg.skip_layers  # the last layers and the final norm are never run
    sd = {k: v.to(device=device, dtype=dtype) for k, v in sd.items()
          if k != "norm.weight" and not (k.startswith("layers.") and int(k.split(".")[1]) >= n_used)}
    with torch.device("meta"):
        model = LlamaModel(cfg)
    tok = HFTokenizer(os.path.join(path, "tokenizer.json"), "<|begin_of_text|>", None, "<pad>")
    return _load_strict(model, sd, path), tok


def load_clip(path, dtype=torch.float32, device="cpu"):
    """CLIP-L/14's text model from upstream's ckpts/text_encoder_2 (CLIPTextModel, or a whole CLIPModel folder)."""
    c, sd = _hf_folder(path)
    cfg = CLIPTextConfig(**_fields(CLIPTextConfig, c.get("text_config", c)))
    if not any(k.startswith("text_model.") for k in sd):  # transformers 5 saves CLIPTextModel unprefixed
        sd = {"text_model." + k: v for k, v in sd.items()}
    sd = {k: v.to(device=device, dtype=dtype) for k, v in sd.items()
          if k.startswith("text_model.") and not k.endswith("position_ids")}  # a CLIPModel's vision half dropped
    with torch.device("meta"):
        model = CLIPTextModel(cfg)
    tok = HFTokenizer(os.path.join(path, "tokenizer.json"), "<|startoftext|>", "<|endoftext|>", "<|endoftext|>")
    return _load_strict(model, sd, path), tok


def load_text_encoders(path, dtype=torch.float32, device="cpu"):
    """Both encoders from upstream's ckpts folder (text_encoder/ + text_encoder_2/) -> TextEncoders."""
    llm, llm_tok = load_llm(os.path.join(path, "text_encoder"), dtype, device)
    clip, clip_tok = load_clip(os.path.join(path, "text_encoder_2"), dtype, device)
    return TextEncoders(llm, llm_tok, clip, clip_tok)


# -----------------------------------------------------------------------------------------------------
# LoRA. The adapter lives INSIDE the Linear it adapts, so the base keeps its official key
# (`double_blocks.0.img_attn_qkv.weight`) and the adapter gets `double_blocks.0.img_attn_qkv.lora_A.weight` (rank, in)
# and `.lora_B.weight` (out, rank): the PEFT / ComfyUI naming, exported prefixed `diffusion_model.`.


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


# musubi-tuner's default set (networks/lora.py): every Linear of the double and single blocks except the modulations,
# 240 modules at 20 + 40 blocks. Add img_mod.linear,txt_mod.linear,modulation.linear for diffusion-pipe's 320.
LORA_TARGETS = ("img_attn_qkv,img_attn_proj,img_mlp.fc1,img_mlp.fc2,txt_attn_qkv,txt_attn_proj,txt_mlp.fc1,txt_mlp.fc2,"
                "linear1,linear2")


def add_lora(model, rank, alpha, targets=LORA_TARGETS):
    """Swap the target Linears of every double and single block (each target where the block has it) for
    LoRALinear; freeze everything but the adapters."""
    names = targets.split(",")
    for blk in [*model.double_blocks, *model.single_blocks]:
        for name in names:
            parent_name, _, child = name.rpartition(".")
            parent = getattr(blk, parent_name, None) if parent_name else blk
            if isinstance(getattr(parent, child, None), nn.Linear):
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
    """musubi/kohya LoRA files flatten the module path with underscores:
    double_blocks_0_img_attn_qkv -> double_blocks.0.img_attn_qkv, single_blocks_3_linear1 -> single_blocks.3.linear1."""
    kind, _, rest = flat.partition("_blocks_")
    i, _, mod = rest.partition("_")
    mod = mod.replace("_mlp_", "_mlp.").replace("_mod_linear", "_mod.linear").replace("modulation_linear",
                                                                                      "modulation.linear")
    return f"{kind}_blocks.{i}.{mod}"


def read_lora(path, diffs=None):
    """A LoRA file in ComfyUI's format (ours, diffusion-pipe's `diffusion_model.` or `transformer.` prefix) or
    musubi's kohya format -> (official-key state dict, rank, alpha); common/lora_file.py has the rules. diffs: a dict
    for the full-weight deltas (`X.diff`, `X.diff_b`) as {"X.weight": .., "X.bias": ..}; None refuses them."""
    check_lora_layout(path)
    return lora_file.read_lora(path, prefixes=("diffusion_model.", "transformer."), kohya_name=kohya_module_name,
                               diffs=diffs)


def lora_for(path, cfg):
    """--mode sample --lora, --init_lora, --base_lora: the file read and checked against the model of `cfg` ->
    (adapters of the blocks' Linears, {"X.weight" / "X.bias": delta to add}, rank, alpha). The deltas are the file's
    .diff / .diff_b and its adapters outside the blocks merged ((alpha / rank) B @ A: add_lora adapts the blocks
    only). A module the model lacks (a LoRA of more blocks, another width) is one UserError line naming the keys,
    before any weight is read."""
    diffs = {}
    with torch.device("meta"):
        model = HunyuanVideoDiT(cfg)
    try:
        lsd, rank, alpha = read_lora(path, diffs)
        lora_file.check_fits(path, lsd, rank, model, diffs)
    except ValueError as e:  # common/lora_file.py's: the file and what is wrong with it, in one line
        raise UserError(str(e)) from None
    lora_file.fold_outside(lsd, rank, alpha, ("double_blocks.", "single_blocks."), diffs)
    return lsd, diffs, rank, alpha


def check_lora_layout(path):
    """One clear line for a diffusers-format LoRA (`transformer.transformer_blocks.N.attn.to_q.lora_A.weight`), from
    the header alone. Not mapped: its adapters on the split to_q / to_k / to_v (add_*_proj; to_q/k/v + proj_mlp in
    the single blocks) would become one block-diagonal adapter of 3 or 4 times the rank on each fused Linear."""
    names = [k.removeprefix("transformer.").removeprefix("diffusion_model.") for k in safetensors_header(path)[1]]
    if any(k.startswith(DIFFUSERS_DIT) for k in names):
        raise UserError(f"{path}: diffusers-format LoRA (transformer_blocks.N.attn.to_q...): not supported; the "
                        "formats that load: ComfyUI's with the official names (ours, diffusion-pipe's: "
                        "[diffusion_model.|transformer.]double_blocks.N.img_attn_qkv.lora_A.weight) and musubi's / "
                        "kohya's (lora_unet_double_blocks_N_img_attn_qkv.lora_down.weight)")


# -----------------------------------------------------------------------------------------------------
# Flow matching, upstream's convention (--flow-reverse; HunyuanVideo-I2V transport.py): sigma in [0, 1], sigma = 1 is
# pure noise, x_t = (1 - sigma) * x0 + sigma * noise, target v = noise - x0, model timestep t = 1000 * sigma (float).
#
# Embedded guidance during training (the trainers disagree): we feed 1.0 x 1000 = 1000 by default
# (--train_guidance 1.0), as diffusion-pipe does and as FastVideo's maintainers advise for fine-tuning the
# distilled model, so that sampling at upstream's 6.0 keeps the distilled behaviour. The official I2V LoRA trainer
# feeds 6.0 (6016 after its bf16 cast); musubi feeds 1.0 without the x 1000, which is almost 0: we don't.


def shift_sigma(sigma, shift):
    """Upstream's sd3_time_shift: s*sigma / (1 + (s-1)*sigma). shift > 1 moves mass toward noise."""
    return shift * sigma / (1 + (shift - 1) * sigma)


def sample_sigmas(n, method, shift=1.0, generator=None, device="cpu"):
    """Training sigmas. uniform: U(0,1). logit_normal: sigmoid(N(0,1)) (upstream's I2V trainer 'lognorm' default,
    diffusion-pipe's default). shift: U(0,1) then shifted. Any method is shifted when shift != 1 (the I2V recipe:
    logit_normal with --shift 7)."""
    if method in ("uniform", "shift"):
        s = torch.rand(n, generator=generator, device=device)
    elif method == "logit_normal":
        s = torch.sigmoid(torch.randn(n, generator=generator, device=device))
    else:
        raise ValueError(f"--timestep_sampling must be uniform, logit_normal or shift, got {method!r}")
    return shift_sigma(s, shift) if shift != 1.0 else s


def embedded_guidance(scale, n, device="cpu"):
    """(n,) the guidance input for a scale, as upstream's bf16 pipeline makes it: bf16(scale) * 1000 in bf16
    (6.0 -> 6016, 1.0 -> 1000), returned in fp32."""
    return (torch.full((n,), float(scale)).to(torch.bfloat16) * 1000.0).float().to(device)


def flow_loss(model, x0, text, sigma, noise, guidance):
    """MSE between the predicted and the true velocity. x0, noise (B,16,T,H,W); text = (text_states, text_mask,
    text_states_2); sigma (B,); guidance (B,) or None."""
    s = sigma.view(-1, 1, 1, 1, 1)
    xt = (1 - s) * x0 + s * noise
    v = model(xt, sigma * 1000, *text, guidance)
    return F.mse_loss(v.float(), (noise - x0).float())


def sampling_sigmas(steps, shift):
    """Upstream's FlowMatchDiscreteScheduler(shift, reverse=True): linspace(1, 0, steps + 1) shifted, in fp32."""
    return shift_sigma(torch.linspace(1, 0, steps + 1), shift)


@torch.no_grad()
def sample_euler(model, noise, text, neg_text=None, steps=50, shift=7.0, embedded_scale=6.0, cfg_scale=1.0):
    """The official t2v sampler: Euler from sigma 1 to 0 on the shifted schedule, the model at t = 1000 * sigma, the
    distilled guidance embedded (6.0 -> 6016), true classifier-free guidance off unless cfg_scale > 1 (then against
    neg_text, cond and uncond in one batch). noise (B,16,T,H,W); text = (states, mask, states_2). -> x0 fp32."""
    sigmas = sampling_sigmas(steps, shift)
    x = noise.float()
    B = x.shape[0]
    cfg = cfg_scale > 1.0 and neg_text is not None
    if cfg:
        text = tuple(torch.cat([n, c]) for n, c in zip(neg_text, text))  # uncond first, as upstream
    g = embedded_guidance(embedded_scale, 2 * B if cfg else B, x.device) if model.guidance_in is not None else None
    for i in range(steps):
        xin = torch.cat([x, x]) if cfg else x
        t = (sigmas[i] * 1000).expand(xin.shape[0]).to(x.device)
        v = model(xin, t, *text, g).float()
        if cfg:
            uncond, cond = v.chunk(2)
            v = uncond + cfg_scale * (cond - uncond)
        x = x + v * (sigmas[i + 1] - sigmas[i]).item()
    return x


# -----------------------------------------------------------------------------------------------------
# Loading the released weights. Accepted DiT layouts:
#   1. the official mp_rank_00_model_states.pt (a DeepSpeed-style dict, the weights under "module"), given as the
#      file, its transformers/ folder, the folder above it (hunyuan-video-t2v-720p/) or the ckpts/ root; also the
#      official mp_rank_00_model_states_fp8.pt with its _fp8_map.pt (dequantized on load, as upstream computes);
#   2. a single .safetensors with the official names (Kijai's hunyuan_video_720_cfgdistill_bf16.safetensors and
#      our own exports), optionally prefixed `model.diffusion_model.`, `diffusion_model.` or `transformer.`.
# The files carry no config: the architecture is read off the tensor shapes (dit_config_from).

DIT_FILE = "mp_rank_00_model_states.pt"
DIT_HINT = ("train_hunyuan.py loads the HunyuanVideo t2v DiT: mp_rank_00_model_states.pt (key 'module') or a "
            "single .safetensors with the official key names (img_in.*, double_blocks.N.*, single_blocks.N.*).")
DIFFUSERS_DIT = ("x_embedder.", "transformer_blocks.", "single_transformer_blocks.")  # HunyuanVideoTransformer3DModel


def dit_file(path):
    """The DiT weight file at `path` (a file, or one of the official folders)."""
    path = str(path)
    if os.path.isfile(path):
        return path
    for name in (DIT_FILE, DIT_FILE.replace(".pt", "_fp8.pt")):  # the bf16 file first, else the official fp8 one
        for sub in ("", "transformers", os.path.join("hunyuan-video-t2v-720p", "transformers")):
            f = os.path.join(path, sub, name)
            if os.path.isfile(f):
                return f
    if any(glob.glob(os.path.join(path, sub, "diffusion_pytorch_model*.safetensors")) for sub in ("", "transformer")):
        raise FileNotFoundError(f"{path}: a diffusers-format folder (diffusion_pytorch_model*.safetensors): not "
                                f"supported. {DIT_HINT}")
    raise FileNotFoundError(f"{path}: expected {DIT_FILE} (in it, in transformers/ or in "
                            f"hunyuan-video-t2v-720p/transformers/) or a .safetensors file")


def check_dit_layout(keys, path):
    """One clear line for a DiT file in another layout (rather than dit_config_from's KeyError on img_in)."""
    if "img_in.proj.weight" in keys:
        return
    if any(k.startswith(DIFFUSERS_DIT) for k in keys):
        raise UserError(f"{path}: a diffusers-format HunyuanVideo transformer (x_embedder.*, transformer_blocks.N.*): "
                        f"not supported. {DIT_HINT}")
    raise UserError(f"{path}: not a HunyuanVideo DiT (no img_in.proj.weight). {DIT_HINT}")


def official_dit_keys(sd):
    """Unwrap the DeepSpeed dict and strip a one-level prefix: -> the official key names."""
    if "module" in sd and isinstance(sd["module"], dict):
        sd = sd["module"]
    for prefix in ("model.diffusion_model.", "diffusion_model.", "transformer."):
        if sd and all(k.startswith(prefix) for k in sd):
            sd = {k[len(prefix):]: v for k, v in sd.items()}
    return sd


def dit_config_from(sd):
    """HunyuanConfig from the tensor shapes: widths from the embedders, heads from the q-norm (head_dim), the block
    counts, both MLP widths (the refiner's from its own tensors), both text widths, and whether guidance_in exists."""
    def count(prefix):
        return 1 + max((int(k[len(prefix):].split(".")[0]) for k in sd if k.startswith(prefix)), default=-1)
    hidden, in_ch, *patch = sd["img_in.proj.weight"].shape
    head_dim = (sd.get("double_blocks.0.img_attn_q_norm.weight") if "double_blocks.0.img_attn_q_norm.weight" in sd
                else sd["single_blocks.0.q_norm.weight"]).shape[0]
    n_single = count("single_blocks.")
    mlp = (sd["double_blocks.0.img_mlp.fc1.weight"].shape[0] if "double_blocks.0.img_mlp.fc1.weight" in sd
           else sd["single_blocks.0.linear1.weight"].shape[0] - 3 * hidden)
    return HunyuanConfig(
        hidden_size=hidden, heads_num=hidden // head_dim, mlp_dim=mlp,
        refiner_mlp_dim=sd["txt_in.individual_token_refiner.blocks.0.mlp.fc1.weight"].shape[0],
        mm_double_blocks_depth=count("double_blocks."), mm_single_blocks_depth=n_single,
        refiner_depth=count("txt_in.individual_token_refiner.blocks."), in_channels=in_ch,
        out_channels=sd["final_layer.linear.weight"].shape[0] // math.prod(patch), patch_size=tuple(patch),
        text_states_dim=sd["txt_in.input_embedder.weight"].shape[1],
        text_states_dim_2=sd["vector_in.in_layer.weight"].shape[1], rope_dim_list=rope_dims(head_dim),
        guidance_embed="guidance_in.mlp.0.weight" in sd)


def dequantize_fp8(sd, scales):
    """Upstream's mp_rank_00_model_states_fp8.pt: the Linears of the double and single blocks are float8_e4m3fn with
    one scale per module in the _fp8_map.pt beside it. Upstream computes with w.to(bf16) * scale.to(bf16)
    (hyvideo/modules/fp8_optimization.py); that bf16 product becomes the weight here."""
    for k, v in sd.items():
        mod = k[: -len(".weight")]
        if k.endswith(".weight") and v.dtype == torch.float8_e4m3fn and mod in scales:
            sd[k] = v.to(torch.bfloat16) * scales[mod].to(torch.bfloat16)
    return sd


def read_dit_checkpoint(path, dtype=None):
    """-> (HunyuanConfig, state dict with official keys on CPU; a .pt is memory-mapped, cast tensor by tensor)."""
    f = dit_file(path)
    sd = official_dit_keys(read_weights(f))  # .pt through torch.load(weights_only=True, mmap=True)
    check_dit_layout(sd, f)
    if f.endswith(".pt") and os.path.exists(f[:-3] + "_map.pt"):  # the official fp8 file and its scales
        sd = dequantize_fp8(sd, read_weights(f[:-3] + "_map.pt"))
    if dtype is not None:
        sd = {k: v.to(dtype) if v.is_floating_point() else v for k, v in sd.items()}
    return dit_config_from(sd), sd


def read_dit_config(path):
    """The HunyuanConfig of the DiT at `path` without reading its weights: the safetensors header's shapes, or the
    memory-mapped .pt (its tensors are not paged in)."""
    f = dit_file(path)
    if f.endswith(".safetensors"):
        sd = official_dit_keys({k: torch.empty(v, device="meta") for k, v in safetensors_header(f)[1].items()})
    else:
        sd = official_dit_keys(read_weights(f))
    check_dit_layout(sd, f)
    return dit_config_from(sd)


def load_dit(path, dtype=torch.float32, device="cpu"):
    """A HunyuanVideoDiT (eval mode) from any supported layout, built on meta and filled with the weights."""
    cfg, sd = read_dit_checkpoint(path, dtype)
    with torch.device("meta"):
        model = HunyuanVideoDiT(cfg)
    check_keys(model.state_dict().keys(), sd, path, hint=DIT_HINT)
    check_shapes(model.state_dict(), sd, path)
    model.load_state_dict(sd, assign=True)
    return model.to(device).eval()


VAE_FILE = "pytorch_model.pt"


def load_vae(path, dtype=torch.float32, device="cpu"):
    """The VAE from upstream's vae/ folder or its pytorch_model.pt (optionally wrapped in "state_dict", optionally
    with `vae.`-prefixed keys), with the config.json beside it, else the official 884-16c-hy config."""
    import json
    path = str(path)
    f = os.path.join(path, VAE_FILE) if os.path.isdir(path) else path
    sd = read_weights(f)
    if "state_dict" in sd and isinstance(sd["state_dict"], dict):
        sd = sd["state_dict"]
    if any(k.startswith("vae.") for k in sd):
        sd = {k[4:]: v for k, v in sd.items() if k.startswith("vae.")}
    cfg = VAE_PRESETS["884-16c-hy"]
    cfg_file = os.path.join(os.path.dirname(f), "config.json")
    if os.path.exists(cfg_file):
        with open(cfg_file) as fh:
            c = json.load(fh)
        cfg = VAEConfig(**{k: tuple(v) if isinstance(v, list) else v for k, v in _fields(VAEConfig, c).items()})
    with torch.device("meta"):
        model = HunyuanVAE(cfg)
    sd = {k: v.to(device=device, dtype=dtype) for k, v in sd.items()}
    return _load_strict(model, sd, f)


def official_paths(ckpt_dir):
    """The parts of upstream's ckpts/ folder: the DiT file, the VAE folder, the text encoders' root."""
    model = os.path.join(ckpt_dir, "hunyuan-video-t2v-720p")
    return dict(dit=dit_file(ckpt_dir), vae=os.path.join(model, "vae"), text=ckpt_dir)


# -----------------------------------------------------------------------------------------------------
# Flags (common/args.py turns every field into --name value; the comment is its --help). The same names as
# train_wan.py; the Hunyuan-only ones: --train_guidance, --sample_embedded_guidance.

# upstream's constant (hyvideo/constants.py), used only with true classifier-free guidance (--sample_guidance > 1)
NEGATIVE_PROMPT = ("Aerial view, aerial view, overexposed, low quality, deformation, a poor composition, bad hands, "
                   "bad teeth, bad eyes, bad limbs, distortion")


@dataclass
class Args:
    mode: str = "train"  # train | cache (encode the dataset, stop) | sample (videos for --sample_prompts) | bench
    preset: str = "13B"  # toy | tiny | 13B (with --ckpt_dir or --dit_path the checkpoint's own shapes win)
    ckpt_dir: str = ""  # upstream's ckpts/ folder (hunyuan-video-t2v-720p/, text_encoder/, text_encoder_2/)
    dit_path: str = ""  # a DiT elsewhere than ckpt_dir: an mp_rank_00_model_states.pt, a .safetensors (ours too)
    encoders: str = "official"  # official (the VAE and text encoders of --ckpt_dir) | toy (data/toy.py's pixel pair)
    data: str = ""  # a folder of videos/images + same-name .txt captions, or a .jsonl/.csv; several: clips/,stills/*3
    cache_dir: str = "cache"  # encoded latents and text embeddings (keyed by content and settings)
    out_dir: str = ""  # the run folder; default runs/hunyuan-<preset> (runs/hunyuan-<preset>-sample for --mode sample)
    # data
    height: int = 544  # the bucket area is height*width; buckets keep that area at other aspect ratios
    width: int = 960  # (sides are multiples of 16: the VAE's 8 times the patch's 2)
    frames: int = 129  # the most frames of a clip (4k+1); shorter videos get the largest 4k+1 that fits
    min_frames: int = 1  # shorter clips are skipped
    fps: int = 24  # HunyuanVideo's frame rate: videos are resampled to it
    clips_per_video: int = 1  # consecutive clips from one long video (0 = as many as fit)
    val_count: int = 0  # source files held out for the validation loss
    caption_dropout: float = 0.0  # probability that a sample trains with the empty prompt (upstream's I2V LoRA: 0.1)
    vae_tiling: bool = True  # VAE tiles for clips over 256 px / 64 frames, as upstream: less memory, inexact; 0: none
    # (upstream's enable_tiling, its --vae-tiling default: 256-px tiles every 192, 65-frame chunks every 48, blended;
    # smaller clips go through whole, exactly. 0: every clip whole, exact; 544x960x129 then needs far over 80 GB)
    # LoRA (rank 0 = full fine-tune)
    lora_rank: int = 0  # LoRA rank; 0 = full fine-tune
    lora_alpha: float = 0.0  # LoRA alpha; 0 = the rank (scale 1)
    lora_targets: str = LORA_TARGETS  # the Linears (inside each double/single block) that get an adapter
    lora_plus: float = 1.0  # LoRA+: lora_B learns at this multiple of --lr (the paper: 16; musubi's loraplus_lr_ratio)
    lora: str = ""  # --mode sample: a LoRA file to apply (ours, diffusion-pipe's, musubi's)
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
    seed: int = 0  # one seed for init, data order, noise, sigmas and caption dropout
    timestep_sampling: str = "logit_normal"  # uniform | logit_normal | shift (U(0,1) through --shift; not with 1)
    shift: float = 1.0  # applied to the sampled sigmas when != 1 (upstream's I2V LoRA recipe: logit_normal, 7)
    train_guidance: float = 1.0  # the embedded guidance scale fed while training (x 1000; see Flow matching)
    # speed
    dtype: str = "auto"  # compute dtype of the blocks: auto (bf16 on GPU, fp32 on CPU) | bf16 | fp32
    ac: int = 0  # activation checkpointing per block: 1; 2: with its saved inputs in CPU memory (common/fsdp.py)
    ac_interval: int = 1  # with --ac: checkpoint every N-th block only (2: every other one): faster, more memory
    compile: bool = False  # torch.compile per block, in place
    sp: int = 1  # sequence parallelism (Ulysses, common/sp.py): N consecutive ranks share each sample, split its tokens
    shard: int = 0  # FSDP2 shards each weight over N ranks, replicated across world/N (HSDP; 1: as DDP); 0 = all ranks
    preflight: bool = True  # before step 1, one forward + backward of the largest bucket (common/preflight.py)
    # memory, for a LoRA on one GPU (common/float8.py, common/offload.py; README "HunyuanVideo on one GPU")
    base_dtype: str = "auto"  # frozen base of the blocks: auto (compute dtype) | float8 (e4m3 + row scales: half bf16)
    offload: bool = False  # blocks' frozen base in (pinned) CPU memory, copied to the device a block ahead (exact)
    # checkpoints, samples, validation, logging
    ckpt_every: int = 0  # write a checkpoint every N steps (0 = only when stopped by a signal)
    keep: int = 3  # keep the newest K checkpoints (0 = all)
    resume: bool = False  # continue the run in --out_dir from its newest valid checkpoint (none: start fresh)
    sample_every: int = 0  # write sample videos every N steps (0 = only at the end)
    sample_prompts: str = ""  # prompts separated by |, or a text file with one per line
    sample_negative: str = "official"  # negative prompt for true CFG (--sample_guidance > 1): official or any text
    sample_steps: int = 50  # sampler steps
    sample_guidance: float = 1.0  # true classifier-free guidance scale; 1 = off, as upstream's default
    sample_embedded_guidance: float = 6.0  # the distilled guidance fed to guidance_in (upstream's default 6.0)
    sample_shift: float = 7.0  # the sampling schedule's shift: upstream's --flow-shift default (hyvideo/config.py)
    # and its only value in the T2V code; 17 for under 20 steps is the paper's / musubi-tuner docs' advice
    sample_frames: int = 0  # frames of the samples; 0 = --frames
    val_every: int = 0  # validation loss every N steps (needs --val_count)
    log_every: int = 10  # a log line (log.jsonl) every N steps
    tensorboard: bool = False  # also log to TensorBoard (<out_dir>/tb)
    wandb: str = ""  # also log to this W&B project
    # bench
    bench_steps: int = 5  # timed steps (after 2 warm-up steps)
    peak_tflops: float = 0.0  # the device's dense bf16 peak for MFU; 0 = known GPUs by name (H100: 989)


# The toy preset: a tiny DiT trained from scratch on data/toy.py's synthetic clips, in pixel space, on CPU, in
# minutes (train_wan.py's README section). Defaults of --preset toy, applied before parsing.
TOY_PROMPTS = "|".join(DEMO_PROMPTS)  # data/toy.py: one per direction, the dataset's first clips
# --preset tiny is the tests' random config: its default clip is small too (flags still override), so that
# `--mode bench --preset tiny` takes seconds on a CPU, not the minutes of the released size's default shape
TINY_ARGS = dict(height=64, width=64, frames=9)

TOY_ARGS = dict(encoders="toy", data="toy_data", height=32, width=32, frames=5, fps=4, global_batch=16, micro_batch=0,
                lr=3e-3, warmup_steps=20, max_steps=600, weight_decay=0.0, timestep_sampling="logit_normal",
                log_every=50, caption_dropout=0.1, ema=0.99, ema_export=True, sample_prompts=TOY_PROMPTS,
                sample_negative="", sample_steps=30, sample_guidance=3.0, sample_shift=1.0, val_count=4, val_every=100)
TOY_TEXT_LEN = 16

# The stride of the encoder in (frames, height, width): the VAE's 4 x 8 x 8, the toy's pixel space the identity.
LATENT_STRIDE = {"official": (4, 8, 8), "toy": (1, 1, 1)}


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
    st, sh, sw = LATENT_STRIDE[args.encoders]
    cfg = DIT_PRESETS[args.preset]
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
    need(not args.init_lora or args.mode == "train", "--init_lora starts a training run's adapter from a file; "
         "to sample with one use --lora")
    need(not args.base_lora or args.mode in ("train", "sample"), "--base_lora merges a LoRA into the base of a "
         "training or sampling run")
    weights = args.dit_path or args.ckpt_dir
    for k in ("ckpt_dir", "dit_path", "lora", "init_lora"):
        need(not getattr(args, k) or os.path.exists(getattr(args, k)),
             f"--{k} {getattr(args, k)}: no such file or folder")
    if weights:  # the DiT file is found and, for a .safetensors (header only), in a layout that loads
        try:
            f = dit_file(weights)
        except FileNotFoundError as e:
            raise UserError(str(e)) from None
        if f.endswith(".safetensors"):
            read_dit_config(f)
    if args.lora or args.init_lora or args.base_lora:  # (each only in the modes it is for, checked above)
        # read and fitted to the model now (the checkpoint's shapes, no weights read), not after the cache is built
        fit = read_dit_config(f) if weights else cfg
        if args.lora:
            lora_for(args.lora, fit)
        if args.init_lora:
            # the run's rank, alpha and targets are the file's, set here so that every later check sees a LoRA run
            lsd, diffs, r, a = lora_for(args.init_lora, fit)
            need(lsd and not diffs, f"--init_lora {args.init_lora}: its full-weight deltas (.diff / .diff_b) or "
                 "adapters outside the blocks cannot train as LoRA adapters: merge it into the base with --base_lora")
            lora_file.adopt(args, r, a, lora_file.targets_of(lsd), LORA_TARGETS)
        for _, path, _ in lora_file.parse_list(args.base_lora):
            need(os.path.isfile(path), f"--base_lora {path}: no such file")
            lora_for(path, fit)
    if args.mode in ("train", "cache"):
        need(args.data, "--data is needed: a folder of videos/images with .txt captions, or a .jsonl / .csv")
    if args.mode in ("train", "cache", "sample") and args.encoders == "official":
        need(args.ckpt_dir, f"--mode {args.mode} needs --ckpt_dir: upstream's ckpts/ folder, for its VAE and text "
             "encoders (or --encoders toy)")
    if args.mode == "train":
        need(weights or args.preset in ("toy", "tiny"), f"--preset {args.preset} trains from the released weights: "
             "pass --ckpt_dir (random init is for the toy and tiny presets only)")
        need(not (args.lora_rank and not weights), "--lora_rank needs base weights to adapt: --ckpt_dir or --dit_path")
    need(args.lora_plus > 0 and (args.lora_plus == 1 or args.lora_rank), f"--lora_plus {args.lora_plus}: the "
         "multiple of --lr at which a LoRA's B matrices learn, > 0, for a LoRA run (--lora_rank or --init_lora)")
    memory.check_flags(args)  # --base_dtype float8 / --offload 1: where they do not apply
    if args.mode == "sample":
        need(weights, "--mode sample needs trained weights: --dit_path (e.g. runs/hunyuan-toy/model.safetensors) or "
             "--ckpt_dir")
        need(prompts_from(args.sample_prompts), "--mode sample needs --sample_prompts ('a|b', or a file)")


# -----------------------------------------------------------------------------------------------------
# The pieces main() puts together. The text of a sample is a dict {"states": (n, D) its valid tokens only,
# "pooled": (D2,)}: the cache stores it so, and load_batch pads a batch's states to the longest (with
# "text.states_lens"), from which the mask is rebuilt. Padded text tokens never change the DiT's output, so this
# is exactly upstream's 256-token padded input.


def encoder_settings(args, cfg, device):
    """What identifies the encoding of a clip or caption, for the cache key (data/cache.py)."""
    if args.encoders == "toy":
        from data.toy import toy_encoders
        return dict(toy_encoders(cfg.text_states_dim, TOY_TEXT_LEN)[3], pooled="mean")
    return dict(model="hunyuan-video", vae="884-16c-hy", text="llava-llama-3-8b+clip-l", text_len=TEXT_LEN,
                template="video", ckpt=os.path.abspath(args.ckpt_dir),
                vae_tiling=(VAE_TILING, VAE_TEMPORAL_TILING) if args.vae_tiling else False,
                dtype="fp16" if device.type == "cuda" else "fp32")


def text_caches(args, settings, prompts, negative):
    """-> {template: (cache file, its texts)} for the templates that have texts. The samples' texts (the prompts, the
    negative prompt of true CFG) get the template that official inference picks by the samples' length: the image one
    for 1 frame, the video one otherwise (hyvideo/inference.py:662, data_type; the negative prompt too,
    pipeline_hunyuan_video.py:398). The empty prompt of caption dropout is training's: always the video template, as
    for the captions and in the official I2V trainer. A file's key is its texts and settings (+ the template when it is
    not the video one), so with video samples the file is the one it has always been."""
    samples = prompts + [negative] * (bool(prompts) and args.sample_guidance > 1)
    train = [""] * (args.caption_dropout > 0)
    image = (args.sample_frames or args.frames) == 1
    groups = {"video": list(dict.fromkeys(train if image else samples + train)),
              "image": list(dict.fromkeys(samples if image else []))}
    out = {}
    for template, texts in groups.items():
        if texts:
            s = settings if template == "video" else dict(settings, template=template)
            key = hashlib.sha1(json.dumps([texts, s]).encode()).hexdigest()[:16]
            out[template] = (os.path.join(args.cache_dir, f"texts-{key}.pt"), texts)
    return out


def build_encoders(args, cfg, device, video=True, text=True):
    """-> (encode_video, decode_video, encode_text) as plain functions (None for the parts not asked for). Built only
    while caching and sampling, so that neither the VAE nor the text encoders are in memory while the DiT trains.
    encode_text([prompt], template="video") -> {"states": (1, n, D), "pooled": (1, D2)}: the n valid tokens (n = the
    longest prompt); template "image" for 1-frame samples (text_caches)."""
    if args.encoders == "toy":
        from data.toy import toy_encoders
        enc_v, dec_v, enc = toy_encoders(cfg.text_states_dim, TOY_TEXT_LEN)[:3]

        def enc_t(prompts, template="video"):  # the toy's rows are zero past the end token; it has no template
            x = enc(prompts)
            n = int((x.abs().sum(-1) > 0).sum(1).max())
            return {"states": x[:, :n], "pooled": x[:, :n].mean(1)}
        return enc_v, dec_v, enc_t
    enc_v = dec_v = enc_t = None
    paths = official_paths(args.ckpt_dir)
    if video:
        vae = load_vae(paths["vae"], dtype=torch.float32, device=device)  # fp32
        # upstream's enable_tiling, both kinds; HunyuanVAE.tiles picks per clip (only clips larger than a tile)
        vae.tiling = VAE_TILING if args.vae_tiling else None
        vae.temporal_tiling = VAE_TEMPORAL_TILING if args.vae_tiling else None
        enc_v = lambda v: vae.encode(v.to(device)).cpu()  # noqa: E731
        dec_v = lambda z: vae.decode(z.float().to(device))  # noqa: E731
    if text:
        te = load_text_encoders(paths["text"], dtype=torch.float16 if device.type == "cuda" else torch.float32,
                                device=device)  # upstream runs both encoders in fp16

        def enc_t(prompts, template="video"):
            states, mask, pooled = te.encode(prompts, PROMPT_TEMPLATES[template])
            n = int(mask.sum(1).max())
            return {"states": states[:, :n].float().cpu(), "pooled": pooled.float().cpu()}
    return enc_v, dec_v, enc_t


def batch_text(b, device):
    """A cached batch's text -> (text_states (B, L, D), text_mask (B, L), text_states_2 (B, D2)) on device."""
    states = b["text.states"].to(device, non_blocking=True).float()
    B, L = states.shape[:2]
    lens = b.get("text.states_lens", torch.full((B,), L))
    mask = (torch.arange(L)[None] < lens[:, None]).long().to(device)
    return states, mask, b["text.pooled"].to(device, non_blocking=True).float()


def one_text(t, device):
    """A single cached text {"states": (n, D), "pooled": (D2,)} -> the model's three inputs, batch 1."""
    return batch_text({"text.states": t["states"][None], "text.pooled": t["pooled"][None]}, device)


def pad_text(text, L):
    states, mask, pooled = text
    n = L - states.shape[1]
    return F.pad(states, (0, 0, 0, n)), F.pad(mask, (0, n)), pooled


def drop_captions(text, drop, empty):
    """The rows where drop (B,) is True replaced by the empty prompt's text (`empty` from one_text)."""
    if not drop.any():  # a CPU tensor: no device sync
        return text
    L = max(text[0].shape[1], empty[0].shape[1])
    text, empty = pad_text(text, L), pad_text(empty, L)
    d = drop.to(text[0].device)
    return (torch.where(d.view(-1, 1, 1), empty[0], text[0]), torch.where(d.view(-1, 1), empty[1], text[1]),
            torch.where(d.view(-1, 1), empty[2], text[2]))


def read_dit_weights(args, cfg, rank, dtype):
    """The full state dict on rank 0 (None elsewhere): the checkpoint, read straight into `dtype`, or a fresh init
    (seeded) for the toy and tiny presets."""
    if rank != 0:
        return None
    if args.dit_path or args.ckpt_dir:
        return read_dit_checkpoint(args.dit_path or args.ckpt_dir, dtype)[1]
    with torch.random.fork_rng():
        torch.manual_seed(args.seed)
        m = HunyuanVideoDiT(cfg)
        m.init_weights()
    return m.state_dict()


def build_dit(args, cfg, sd, device, compute_dtype, lora_alpha=None, sp_group=None):
    """meta build -> LoRA -> FSDP2 (+AC, compile) -> storage on the device -> weights broadcast from rank 0.
    `sd`: the full state dict on rank 0 (None on the others), or "random" for --mode bench without weights.
    sp_group: --sp's group of this rank (None: every rank holds its samples whole)."""
    rank = torch.distributed.get_rank()
    with torch.device("meta"):
        model = HunyuanVideoDiT(cfg)
    model.sp = sp_group
    model.text_multiple = 32 if args.compile else 1  # at most 8 text lengths (<= 256) per latent shape to compile for
    if args.lora_rank:
        model.double_blocks.to(compute_dtype)  # the frozen base is stored in the compute dtype
        model.single_blocks.to(compute_dtype)
        add_lora(model, args.lora_rank, lora_alpha or args.lora_alpha or args.lora_rank, args.lora_targets)
        if rank == 0 and sd != "random" and not any(".lora_" in k for k in sd):
            sd.update(lora_init_state(model, args.seed))
    where = args.dit_path or args.ckpt_dir or "init"
    if rank == 0 and sd != "random":
        check_keys(model.state_dict().keys(), sd, where, hint=DIT_HINT)
        check_shapes(model.state_dict(), sd, where)
    one_gpu = memory.wanted(args)  # --base_dtype float8 / --offload 1: the base is loaded and converted on the CPU
    if one_gpu:
        memory.prepare(model, [model.double_blocks, model.single_blocks], sd, device, compute_dtype, args)
    parallelize(model, [model.double_blocks, model.single_blocks], compute_dtype, ac=args.ac, compile=args.compile,
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
    """Whether micro-batch m of n reduce-scatters its gradients (train_wan.py says why): every one for a full
    fine-tune, only the last for LoRA."""
    return args.lora_rank == 0 or m == n - 1


def train_guidance(model, args, n, device):
    return embedded_guidance(args.train_guidance, n, device) if model.cfg.guidance_embed else None


def val_loss(model, args, val_idx, val, device):
    """Mean flow loss over the held-out clips at fixed sigmas with fixed noise. Collective."""
    sigmas = [0.1, 0.3, 0.5, 0.7, 0.9]
    total = torch.zeros(2, dtype=torch.float64, device=device)
    with torch.no_grad():
        for idx in val_idx:
            b = load_batch([val[i]["file"] for i in idx])
            x0, text = b["latents"].to(device).float(), batch_text(b, device)
            g = train_guidance(model, args, len(idx), device)
            for j, s in enumerate(sigmas):
                eps = torch.stack([noise.randn(x0.shape[1:], "val", val[i]["key"], j, device=device) for i in idx])
                loss = flow_loss(model, x0, text, torch.full((len(idx),), s, device=device), eps, g)
                total += torch.stack([loss.double() * len(idx), torch.tensor(float(len(idx)), device=device).double()])
    torch.distributed.all_reduce(total)
    return (total[0] / total[1]).item()


def write_samples(model, args, cfg, text_ctx, negative, out_dir, step, device):
    """One video per --sample_prompts prompt, seeded by (seed, prompt index), through upstream's Euler sampler.
    Collective (the sharded DiT runs on every rank); rank 0 decodes and writes samples/step_XXXXXXXX_i.mp4."""
    rank = torch.distributed.get_rank()
    decode = build_encoders(args, cfg, device, video=True, text=False)[1] if rank == 0 else None
    was_training = model.training
    model.eval()
    paths = []
    for i, p in enumerate(prompts_from(args.sample_prompts)):
        shape = latent_shape(cfg, args, args.sample_frames or args.frames)
        x = noise.randn(shape, args.seed, "sample", i)[None].to(device)  # CPU noise: the same on every device
        text = one_text(text_ctx[p], device)
        neg = one_text(text_ctx[negative], device) if args.sample_guidance > 1 else None
        if neg is not None:
            L = max(text[0].shape[1], neg[0].shape[1])
            text, neg = pad_text(text, L), pad_text(neg, L)
        z = sample_euler(model, x, text, neg, steps=args.sample_steps, shift=args.sample_shift,
                         embedded_scale=args.sample_embedded_guidance, cfg_scale=args.sample_guidance)
        if rank == 0:
            paths.append(os.path.join(out_dir, "samples", f"step_{step:08d}_{i}.mp4"))
            write_video(paths[-1], decode(z)[0].float().cpu(), args.fps)
    model.train(was_training)
    return paths


def export_weights(model, args, cfg, path):
    """The LoRA in ComfyUI's key format (common/lora_file.py, alpha folded into B), or a full fine-tune as the
    official-key DiT in bf16 (load_dit reads it back, the config off the shapes). Collective (every rank gathers);
    rank 0 writes."""
    lora = args.lora_rank > 0
    sd = gather_params(model, only=(lambda k: ".lora_" in k) if lora else None)
    if torch.distributed.get_rank() != 0:
        return
    meta = {"format": "pt", "base_model": "HunyuanVideo-" + (args.preset if args.preset == "13B" else "custom"),
            "hunyuan_config": json.dumps(dataclasses.asdict(cfg)), "args": json.dumps(dataclasses.asdict(args))}
    if lora:
        alpha = args.lora_alpha or args.lora_rank
        meta.update(lora_rank=args.lora_rank, lora_alpha=float(alpha), lora_targets=args.lora_targets)
        # alpha folded into B, no `.alpha` keys: diffusers' HunyuanVideo LoRA converter chunks every tensor of a
        # fused-qkv module, a 0-d `.alpha` included, and fails on it; without `.alpha` every reader takes scale 1
        lora_file.write_lora(path, sd, alpha, metadata=meta, fold_alpha=True)
    else:
        from safetensors.torch import save_file
        save_file({k: v.to(torch.bfloat16).contiguous() for k, v in sd.items()}, path + ".tmp", metadata=meta)
        os.replace(path + ".tmp", path)


def bench(args, cfg, device, compute_dtype, world, micro, sp_group=None):
    """--mode bench: a few training steps on random latents of --height x --width x --frames and a random
    256-token text; prints step time, tokens/s, peak memory and MFU."""
    sd = read_dit_weights(args, cfg, torch.distributed.get_rank(), torch.float32 if not args.lora_rank else
                          compute_dtype) if (args.dit_path or args.ckpt_dir) else "random"
    torch.manual_seed(args.seed)  # the same weights and inputs every run: eager and --compile give comparable losses
    model = build_dit(args, cfg, sd, device, compute_dtype, sp_group=sp_group)
    reset_peak_memory(device)  # mem_gb: the steps' peak, not the load's
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=1e-5, fused=True)
    shape = (micro, *latent_shape(cfg, args, args.frames))
    x0 = torch.randn(shape, device=device)
    text = (torch.randn(micro, TEXT_LEN, cfg.text_states_dim, device=device),
            torch.ones(micro, TEXT_LEN, dtype=torch.long, device=device),
            torch.randn(micro, cfg.text_states_dim_2, device=device))
    f, h, w = shape[2:]
    tokens = micro * (f // cfg.patch_size[0]) * (h // cfg.patch_size[1]) * (w // cfg.patch_size[2])
    flops = micro * 3 * count_flops(cfg, f, h, w) / args.sp  # --sp: this rank's share of the samples' work
    peak = device_peak_flops(device, args.peak_tflops)
    times = []
    for i in range(args.bench_steps + 2):  # the first two steps warm up (compile, allocator) and are not counted
        with StepTimer(device) as t:
            loss = flow_loss(model, x0, text, torch.rand(micro, device=device), torch.randn_like(x0),
                             train_guidance(model, args, micro, device))
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
    out_dir = args.out_dir or os.path.join("runs", f"hunyuan-{args.preset}" + ("-sample" * (args.mode == "sample")))
    if args.mode == "train":
        run_folder.claim(out_dir, args.resume)
    rank, world, device = cdist.init()
    print0 = cdist.print0
    memory.check_world(args, world)  # --base_dtype float8 / --offload 1: one process
    try:
        weights = args.dit_path or (official_paths(args.ckpt_dir)["dit"] if args.ckpt_dir else "")
    except FileNotFoundError as e:  # a --ckpt_dir without the DiT: the user's to fix
        raise UserError(str(e)) from None
    args.dit_path = weights  # one path from here on: read_dit_weights and the fingerprint use it
    cfg = read_dit_config(weights) if weights else DIT_PRESETS[args.preset]  # the shapes only: no weights read
    # --sp N: each group of N consecutive ranks trains the same samples, each rank a share of their tokens
    # (common/sp.py). The data, the noise draws and the batch arithmetic count data-parallel ranks: dp_rank of dp_world.
    sp_group, dp_rank, dp_world, micro, accum = sp.data_parallel(args, rank, world, cfg.heads_num)
    compute_dtype = torch.float32 if args.dtype == "fp32" or (args.dtype == "auto" and device.type == "cpu") \
        else torch.bfloat16
    print0(f"hunyuan: {args.mode} preset={args.preset} world={world} device={device} compute={compute_dtype} "
           f"batch={args.global_batch} (micro {micro} x {dp_world} ranks x {accum} accumulation)"
           + (f", sequence parallel: {args.sp} ranks a sample" if args.sp > 1 else ""))
    if args.mode == "bench":
        bench(args, cfg, device, compute_dtype, world, micro, sp_group)
        return cdist.cleanup()

    # 1. Data -> cache. The VAE and the text encoders exist only inside this block, and only if something is not
    # cached yet. The texts: the sample prompts, the negative prompt of true CFG, the empty prompt of caption dropout;
    # one file per prompt template (text_caches).
    prompts = prompts_from(args.sample_prompts)
    negative = NEGATIVE_PROMPT if args.sample_negative == "official" else args.sample_negative
    settings = encoder_settings(args, cfg, device)
    text_files = text_caches(args, settings, prompts, negative)
    records, entries, todo = [], [], 0
    if args.mode in ("train", "cache"):
        if args.encoders == "toy" and args.data == TOY_ARGS["data"]:
            make_toy_dataset(args.data)  # a no-op when it is already there
        st, sh, _ = LATENT_STRIDE[args.encoders]
        try:
            records = load_dataset(args.data, area=args.height * args.width, fps=args.fps, max_frames=args.frames,
                                   multiple=sh * cfg.patch_size[1], frame_step=st, min_frames=args.min_frames,
                                   clips_per_video=args.clips_per_video, log=print0, cache_dir=args.cache_dir)
        except (ValueError, FileNotFoundError) as e:  # no usable samples, no such folder: the user's to fix
            raise UserError(str(e)) from None
        entries, todo = cache_entries(records, args.cache_dir, settings, log=print0)
    need = torch.tensor(float(todo > 0 or any(not os.path.exists(f) for f, _ in text_files.values())))
    torch.distributed.all_reduce(need, op=torch.distributed.ReduceOp.MAX)  # every rank takes the same branch
    if need.item():
        encode_video, _, encode_text = build_encoders(args, cfg, device, video=todo > 0)
        if todo:
            entries = encode_dataset(records, encode_video, encode_text, args.cache_dir, settings, log=print0)
        for template, (text_file, texts) in text_files.items() if rank == 0 else ():
            os.makedirs(args.cache_dir, exist_ok=True)
            torch.save({p: {k: v[0] for k, v in encode_text([p], template).items()} for p in texts}, text_file + ".tmp")
            os.replace(text_file + ".tmp", text_file)
        del encode_video, encode_text  # frees the VAE and the text encoders before the DiT is read
        torch.distributed.barrier()
    if args.mode == "cache":
        return cdist.cleanup()
    if args.mode == "train" and not entries:
        raise UserError(f"no sample of {args.data} could be encoded (see the skip lines above)")
    text_ctx = torch.load(text_files["video"][0]) if "video" in text_files else {}
    sample_ctx = torch.load(text_files["image"][0]) if "image" in text_files else text_ctx  # 1-frame samples

    # 2. The DiT: (LoRA), FSDP2, weights. A full fine-tune keeps fp32 master weights; a LoRA's frozen base is read
    # straight into the compute dtype.
    # --lora (sample) / --init_lora (train): the file's adapters, rank, alpha and targets
    value = args.lora if args.mode == "sample" else args.init_lora if args.mode == "train" else ""
    lora_alpha, lsd, diffs = None, None, {}
    if value:
        lsd, diffs, args.lora_rank, lora_alpha = lora_for(value, cfg)
        args.lora_targets = lora_file.targets_of(lsd)
        if not lsd:  # only adapters outside the blocks (merged as deltas): no LoRALinear
            lsd, args.lora_rank = None, 0
    sd = read_dit_weights(args, cfg, rank, torch.float32 if args.lora_rank == 0 else compute_dtype)
    if rank == 0:
        for _, file, mult in lora_file.parse_list(args.base_lora):  # W += mult (alpha / rank) B @ A, fp32
            print0(f"--base_lora: {file} x {mult} merged into the DiT")
            blsd, bdiffs, brank, balpha = lora_for(file, cfg)
            lora_file.merge(sd, blsd, brank, balpha, bdiffs, mult)
        lora_file.merge(sd, {}, 1, 1, diffs)  # --lora's deltas: W += diff, b += diff_b
    if lsd is not None and rank == 0:
        sd.update(lsd)
        # a LoRA that skips some blocks: the adapters there start as a fresh one does (training) or as zeros (B = 0
        # and A = 0: a no-op in a sample)
        with torch.device("meta"):
            probe = add_lora(HunyuanVideoDiT(cfg), args.lora_rank, lora_alpha, args.lora_targets)
        fill = lora_init_state(probe, args.seed) if args.mode == "train" else \
            {k: torch.zeros(v.shape) for k, v in probe.state_dict().items() if ".lora_" in k}
        sd.update({k: v for k, v in fill.items() if k not in sd})
    model = build_dit(args, cfg, sd, device, compute_dtype, lora_alpha, sp_group)
    del sd
    if args.mode == "sample":
        for path in write_samples(model, args, cfg, sample_ctx, negative, out_dir, 0, device):
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
                       base=os.path.abspath(weights) if weights else f"init:{args.preset}", lora_rank=args.lora_rank,
                       lora_alpha=args.lora_alpha, lora_targets=args.lora_targets,
                       timestep_sampling=args.timestep_sampling, shift=args.shift, train_guidance=args.train_guidance,
                       caption_dropout=args.caption_dropout, ema=args.ema, encoders=args.encoders,
                       **({"base_dtype": "float8"} if args.base_dtype == "float8" else {}))  # not offload: exact
    if args.init_lora:  # only where set: a run folder of before still resumes
        fingerprint.update(init_lora=os.path.abspath(args.init_lora))
    if args.base_lora:
        fingerprint.update(base_lora=[[os.path.abspath(f), m] for _, f, m in lora_file.parse_list(args.base_lora)])
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
            return flow_loss(model, x0, batch_text(b, device), sigma, eps, train_guidance(model, args, len(x0), device))
        preflight.check(train, micro, lambda idx: load_batch([train[i]["file"] for i in idx], pin=pin), loss, model,
                        device, args.sp, print0)
    # Each step's global batch comes from one bucket (data/loader.py), read a step ahead on a thread.
    steps = batches([batch_key(e) for e in train], args.global_batch, micro, dp_rank, dp_world, args.seed,
                    state)
    it = prefetch(steps, lambda item: ([load_batch([train[i]["file"] for i in mb], pin=pin) for mb in item[0]],
                                       item[1]))
    val_idx = val_batches([batch_key(e) for e in val], micro, dp_rank, dp_world) if val else []
    stop = StopSignal()  # SIGTERM (pre-emption) or Ctrl-C: checkpoint the last whole step, exit
    log = RunLog(out_dir, enabled=rank == 0, tensorboard=args.tensorboard, wandb_project=args.wandb,
                 config=dataclasses.asdict(args), start_step=start)
    peak = device_peak_flops(device, args.peak_tflops)
    empty = one_text(text_ctx[""], device) if "" in text_ctx else None
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
            text = batch_text(b, device)
            first = (m * dp_world + dp_rank) * micro  # this micro-batch's first sample, as an index in the global batch
            sigma, drop = training_draws(args, step, first, len(x0), device)
            if args.caption_dropout:
                text = drop_captions(text, drop, empty)
            eps = training_noise(args, step, first, x0.shape[1:], len(x0), device)
            model.set_requires_gradient_sync(reduce_now(args, m, len(micro_batches)))
            loss = flow_loss(model, x0, text, sigma, eps, train_guidance(model, args, len(x0), device))
            # --sp: each rank's gradients are the part through its own tokens and FSDP2 averages over all ranks, so
            # x sp makes the average the data-parallel mean of whole-sample gradients (common/sp.py)
            (loss * args.sp / accum).backward()
            loss_sum += loss.detach()
            f, h, w = x0.shape[2:]
            tokens += len(x0) * (f // cfg.patch_size[0]) * (h // cfg.patch_size[1]) * (w // cfg.patch_size[2])
            flops += len(x0) * 3 * count_flops(cfg, f, h, w, text[0].shape[1]) / args.sp  # this rank's share
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
            log.log(dict(step=step, val_loss=val_loss(model, args, val_idx, val, device)), echo=bar.write)
        if prompts and args.sample_every and step % args.sample_every == 0 and step < args.max_steps:
            if ema:
                ema.swap()
            write_samples(model, args, cfg, sample_ctx, negative, out_dir, step, device)
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
        for path in write_samples(model, args, cfg, sample_ctx, negative, out_dir, step, device) if prompts else []:
            print0(f"sample -> {path}")
    log.close()
    cdist.cleanup()


if __name__ == "__main__":
    cli(main)
