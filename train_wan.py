"""
Train Wan 2.1 text-to-video (1.3B / 14B) in one file: the DiT, the VAE, the umT5 text encoder, LoRA,
flow matching, loading of the official weights by their own key names, FSDP2, and a flat main().

    python train_wan.py --preset toy                                   # tiny model from scratch, CPU ok
    python train_wan.py --preset 1.3B --ckpt_dir Wan2.1-T2V-1.3B --data my_clips/ --lora_rank 32
    torchrun --nproc_per_node=8 train_wan.py --preset 14B --ckpt_dir Wan2.1-T2V-14B --data my_clips/

Reading order: configs -> DiT -> VAE -> text encoder -> LoRA -> flow matching -> loading -> parallelize
-> args -> main. Module names equal the official checkpoint keys (`blocks.3.self_attn.q.weight`), so the
released files load as they are. Facts and references: README.md.
"""
import dataclasses
import json
import math
import os
import sys
import time
from dataclasses import dataclass, field

import torch
import torch.nn as nn
import torch.nn.functional as F

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


DIT_PRESETS = {
    "1.3B": WanConfig(),
    "14B": WanConfig(dim=5120, ffn_dim=13824, num_heads=40, num_layers=40),
    # tiny: the tests; head_dim 32 keeps the 3-axis RoPE split non-trivial (6 + 5 + 5 rotation pairs)
    "tiny": WanConfig(dim=128, ffn_dim=256, num_heads=4, num_layers=2, text_dim=32, text_len=16),
    # toy: trained from scratch in pixel space on the synthetic dataset (in_dim 3 = RGB), see README
    "toy": WanConfig(dim=128, ffn_dim=384, num_heads=4, num_layers=4, in_dim=3, out_dim=3, text_dim=64,
                     text_len=16),
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
    x = x.float().unflatten(-1, (-1, 2))  # (B, L, n, d/2, 2)
    x0, x1 = x[..., 0], x[..., 1]
    cos, sin = cos[None, :, None], sin[None, :, None]
    return torch.stack([x0 * cos - x1 * sin, x0 * sin + x1 * cos], dim=-1).flatten(-2)


class WanRMSNorm(nn.Module):
    """RMSNorm over the whole width (all heads together), in fp32, cast back, then times weight."""

    def __init__(self, dim, eps=1e-6):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x):
        xf = x.float()
        return (xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + self.eps)).type_as(x) * self.weight


class WanLayerNorm(nn.LayerNorm):
    """LayerNorm in fp32. norm1/norm2/head.norm have no affine params; norm3 (before cross-attention) has."""

    def __init__(self, dim, eps=1e-6, elementwise_affine=False):
        super().__init__(dim, eps=eps, elementwise_affine=elementwise_affine)

    def forward(self, x):
        return super().forward(x.float())


class WanSelfAttention(nn.Module):
    def __init__(self, dim, num_heads, eps=1e-6):
        super().__init__()
        self.num_heads = num_heads
        self.q, self.k, self.v, self.o = (nn.Linear(dim, dim) for _ in range(4))
        self.norm_q = WanRMSNorm(dim, eps)
        self.norm_k = WanRMSNorm(dim, eps)

    def forward(self, x, rope):
        # x (B, L, C) in the compute dtype; rope = (cos, sin), each (L, head_dim/2)
        B, L, C = x.shape
        n = self.num_heads
        q = self.norm_q(self.q(x)).view(B, L, n, -1)
        k = self.norm_k(self.k(x)).view(B, L, n, -1)
        v = self.v(x).view(B, L, n, -1)
        # RoPE is computed in fp32 (upstream: float64), then q/k go back to the compute dtype for attention.
        # Every sample of a batch has the same shape (bucketing), so no padding and no mask: plain SDPA.
        q, k = rope_apply(q, *rope).type_as(v), rope_apply(k, *rope).type_as(v)
        y = F.scaled_dot_product_attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2))
        return self.o(y.transpose(1, 2).reshape(B, L, C))


class WanCrossAttention(nn.Module):
    """Text cross-attention: q from video tokens, k/v from the 512 context tokens (all attended, no mask)."""

    def __init__(self, dim, num_heads, eps=1e-6):
        super().__init__()
        self.num_heads = num_heads
        self.q, self.k, self.v, self.o = (nn.Linear(dim, dim) for _ in range(4))
        self.norm_q = WanRMSNorm(dim, eps)
        self.norm_k = WanRMSNorm(dim, eps)

    def forward(self, x, context):
        B, L, C = x.shape
        n = self.num_heads
        q = self.norm_q(self.q(x)).view(B, L, n, -1).transpose(1, 2)
        k = self.norm_k(self.k(context)).view(B, -1, n, C // n).transpose(1, 2)
        v = self.v(context).view(B, -1, n, C // n).transpose(1, 2)
        y = F.scaled_dot_product_attention(q, k, v)
        return self.o(y.transpose(1, 2).reshape(B, L, C))


class WanAttentionBlock(nn.Module):
    def __init__(self, cfg: WanConfig):
        super().__init__()
        dim = cfg.dim
        self.norm1 = WanLayerNorm(dim, cfg.eps)
        self.self_attn = WanSelfAttention(dim, cfg.num_heads, cfg.eps)
        self.norm3 = WanLayerNorm(dim, cfg.eps, elementwise_affine=True)  # yes, norm3 comes before norm2
        self.cross_attn = WanCrossAttention(dim, cfg.num_heads, cfg.eps)
        self.norm2 = WanLayerNorm(dim, cfg.eps)
        self.ffn = nn.Sequential(nn.Linear(dim, cfg.ffn_dim), nn.GELU(approximate="tanh"), nn.Linear(cfg.ffn_dim, dim))
        self.modulation = nn.Parameter(torch.randn(1, 6, dim) / dim**0.5)

    def forward(self, x, e0, context, rope):
        # x (B, L, C) fp32 residual stream; e0 (B, 6, C) fp32; context (B, 512, C)
        dt = self.ffn[0].weight.dtype  # compute dtype: bf16 under FSDP mixed precision, fp32 in tests
        shift_msa, scale_msa, gate_msa, shift_ffn, scale_ffn, gate_ffn = (self.modulation.float() + e0).unbind(1)
        scale_msa, scale_ffn = (1 + scale_msa[:, None]), (1 + scale_ffn[:, None])
        y = self.self_attn((self.norm1(x) * scale_msa + shift_msa[:, None]).to(dt), rope)
        x = x + y.float() * gate_msa[:, None]  # the gated residual adds happen in fp32, as upstream
        x = x + self.cross_attn(self.norm3(x).to(dt), context.to(dt)).float()  # no gate, no modulation
        y = self.ffn((self.norm2(x) * scale_ffn + shift_ffn[:, None]).to(dt))
        return x + y.float() * gate_ffn[:, None]


class Head(nn.Module):
    def __init__(self, cfg: WanConfig):
        super().__init__()
        self.norm = WanLayerNorm(cfg.dim, cfg.eps)
        self.head = nn.Linear(cfg.dim, math.prod(cfg.patch_size) * cfg.out_dim)
        self.modulation = nn.Parameter(torch.randn(1, 2, cfg.dim) / cfg.dim**0.5)

    def forward(self, x, e):
        # e (B, C) is the time embedding itself (not the 6-way projection)
        shift, scale = (self.modulation.float() + e[:, None].float()).unbind(1)
        h = self.norm(x) * (1 + scale[:, None]) + shift[:, None]
        return self.head(h.to(self.head.weight.dtype))


class WanModel(nn.Module):
    """Wan 2.1 text-to-video DiT. forward(x (B,C,F,H,W) latents, t (B,) in [0,1000], context (B,L,text_dim))
    -> velocity (B,C,F,H,W) fp32."""

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

    def forward(self, x, t, context):
        cfg = self.cfg
        B = x.shape[0]
        pt, ph, pw = cfg.patch_size
        f, h, w = x.shape[2] // pt, x.shape[3] // ph, x.shape[4] // pw
        # patchify: (B, C, F, H, W) -> (B, f*h*w, dim), tokens ordered f, h, w (w fastest)
        wdt = self.patch_embedding.weight.dtype
        x = self.patch_embedding(x.to(wdt)).flatten(2).transpose(1, 2).float()
        # time: sinusoid -> MLP (fp32 island, as upstream's autocast(float32) region)
        e = self.time_embedding(sinusoidal_embedding(t, cfg.freq_dim).to(wdt)).float()  # (B, dim)
        e0 = self.time_projection(e.to(wdt)).float().unflatten(1, (6, cfg.dim))  # (B, 6, dim)
        # text: zero-pad to text_len (the padded rows are NOT masked: they become the bias vector after
        # text_embedding and every block attends to all 512 of them, exactly as upstream)
        if context.shape[1] < cfg.text_len:
            context = F.pad(context, (0, 0, 0, cfg.text_len - context.shape[1]))
        context = self.text_embedding(context.to(wdt))
        ang = rope_angles(f, h, w, cfg.dim // cfg.num_heads, x.device)
        rope = (ang.cos().float(), ang.sin().float())
        for block in self.blocks:
            x = block(x, e0, context, rope)
        x = self.head(x, e).float()  # (B, L, pt*ph*pw*C), features laid out (p, q, r, c), c fastest
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
    rest = 2 * L * cfg.in_dim * math.prod(cfg.patch_size) * d + 2 * L * d * math.prod(cfg.patch_size) * cfg.out_dim
    rest += 2 * Lt * (cfg.text_dim * d + d * d)
    return cfg.num_layers * per_block + rest


# -----------------------------------------------------------------------------------------------------
# VAE (wan/modules/vae.py)
# @@VAE@@

# -----------------------------------------------------------------------------------------------------
# Text encoder: umT5-XXL encoder + tokenizer (wan/modules/t5.py, tokenizers.py)
# @@T5@@

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

    @torch.no_grad()
    def init_lora(self):
        nn.init.kaiming_uniform_(self.lora_A.weight, a=math.sqrt(5))  # PEFT / kohya init; B = 0 => no-op at start
        nn.init.zeros_(self.lora_B.weight)


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


def init_lora(model):
    for m in model.modules():
        if isinstance(m, LoRALinear):
            m.init_lora()


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


def flow_loss(model, x0, context, sigma, noise):
    """MSE between the predicted and the true velocity; x0, noise (B,C,F,H,W); sigma (B,)."""
    s = sigma.view(-1, 1, 1, 1, 1)
    xt = (1 - s) * x0 + s * noise
    v = model(xt, sigma * 1000, context)
    return F.mse_loss(v.float(), (noise - x0).float())


# -----------------------------------------------------------------------------------------------------
# Loading the released weights. Accepted DiT layouts (README lists them):
#   1. the official folder (Wan-AI/Wan2.1-T2V-1.3B, -14B): config.json + diffusion_pytorch_model.safetensors, or
#      diffusion_pytorch_model-0000k-of-0000n.safetensors + diffusion_pytorch_model.safetensors.index.json
#   2. a single .safetensors file with the official keys, optionally prefixed `model.diffusion_model.` or
#      `diffusion_model.` (ComfyUI's repackaged wan2.1_t2v_*.safetensors); the config is read off the shapes
#   3. the diffusers repo (Wan-AI/Wan2.1-T2V-1.3B-Diffusers) or its transformer/ folder: renamed back below


def read_safetensors(files, dtype=None):
    """Read one or more .safetensors files into one dict on CPU, casting each tensor as it is read (so a 57 GB
    fp32 14B checkpoint needs 28.6 GB of host memory when it is trained in bf16)."""
    from safetensors import safe_open
    sd = {}
    for fn in files:
        with safe_open(fn, framework="pt", device="cpu") as f:
            for k in f.keys():
                t = f.get_tensor(k)
                sd[k] = t.to(dtype) if dtype is not None and t.is_floating_point() else t
    return sd


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


# diffusers' WanTransformer3DModel names -> the official names (the reverse of diffusers' own conversion).
# Order matters: the specific patterns come before the general ones.
DIFFUSERS_DIT_RENAMES = [
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


def dit_config_from(cfg_json=None, sd=None):
    """WanConfig from an official or diffusers config.json, else from the tensor shapes."""
    if cfg_json is not None and "num_attention_heads" in cfg_json:  # diffusers
        c = cfg_json
        cfg_json = dict(dim=c["num_attention_heads"] * c["attention_head_dim"], ffn_dim=c["ffn_dim"],
                        num_heads=c["num_attention_heads"], num_layers=c["num_layers"], in_dim=c["in_channels"],
                        out_dim=c["out_channels"], text_dim=c.get("text_dim", 4096), freq_dim=c.get("freq_dim", 256),
                        eps=c.get("eps", 1e-6), model_type="i2v" if c.get("image_dim") else "t2v")
    if cfg_json is not None:
        if cfg_json.get("model_type", "t2v") != "t2v":
            raise ValueError(f"model_type {cfg_json['model_type']!r}: train_wan.py implements the text-to-video "
                             "model (t2v); image-to-video checkpoints have extra weights (img_emb, k_img, v_img)")
        fields = {f.name for f in dataclasses.fields(WanConfig)}
        return WanConfig(**{k: v for k, v in cfg_json.items() if k in fields and k != "patch_size"})
    dim, in_dim = sd["patch_embedding.weight"].shape[:2]
    n_layers = 1 + max(int(k.split(".")[1]) for k in sd if k.startswith("blocks."))
    return WanConfig(dim=dim, in_dim=in_dim, num_heads=dim // 128, num_layers=n_layers,
                     ffn_dim=sd["blocks.0.ffn.0.weight"].shape[0], text_dim=sd["text_embedding.0.weight"].shape[1],
                     out_dim=sd["head.head.weight"].shape[0] // 4)


def read_dit_checkpoint(path, dtype=None):
    """-> (WanConfig, state dict with official keys) from any layout listed above."""
    cfg_json = None
    if os.path.isdir(path):
        if os.path.isdir(os.path.join(path, "transformer")):  # diffusers repo root
            path = os.path.join(path, "transformer")
        cfg_file = os.path.join(path, "config.json")
        if os.path.exists(cfg_file):
            with open(cfg_file) as f:
                cfg_json = json.load(f)
        files = safetensors_files(path, "diffusion_pytorch_model")
    elif path.endswith(".safetensors"):
        files = [path]
    else:
        raise ValueError(f"{path}: expected a checkpoint folder or a .safetensors file")
    sd = read_safetensors(files, dtype)
    for prefix in ("model.diffusion_model.", "diffusion_model."):
        if all(k.startswith(prefix) for k in sd):
            sd = {k[len(prefix):]: v for k, v in sd.items()}
    if any(k.startswith("condition_embedder.") for k in sd):
        sd = diffusers_to_official_dit(sd)
    return dit_config_from(cfg_json, sd), sd


def check_keys(expected, got, path, ignore=lambda k: False, hint=""):
    """Fail with the names of missing and unexpected keys (the first few of each) and a hint."""
    expected = {k for k in expected if not ignore(k)}
    missing, unexpected = sorted(expected - set(got)), sorted(set(got) - expected)
    if missing or unexpected:
        def show(ks):
            return ", ".join(ks[:8]) + (f" ... ({len(ks)} in all)" if len(ks) > 8 else "")
        raise KeyError(f"{path}: the checkpoint does not match the model. missing: [{show(missing)}]; "
                       f"unexpected: [{show(unexpected)}]. {hint}")


def check_shapes(model_sd, sd, path):
    bad = [f"{k} {tuple(sd[k].shape)} vs model {tuple(v.shape)}" for k, v in model_sd.items()
           if k in sd and tuple(sd[k].shape) != tuple(v.shape)]
    if bad:
        raise ValueError(f"{path}: shape mismatch: " + "; ".join(bad[:8]))


DIT_HINT = ("train_wan.py loads Wan 2.1 text-to-video DiTs: the official folder, a single official-key "
            ".safetensors (ComfyUI's repackaged files) or a diffusers folder.")


def load_dit(path, dtype=torch.float32, device="cpu"):
    """A WanModel (eval mode) from any supported layout, built on the meta device and filled with the weights."""
    cfg, sd = read_dit_checkpoint(path, dtype)
    with torch.device("meta"):
        model = WanModel(cfg)
    check_keys(model.state_dict().keys(), sd, path, hint=DIT_HINT)
    check_shapes(model.state_dict(), sd, path)
    model.load_state_dict(sd, assign=True)
    return model.to(device).eval()
