import os
from dataclasses import dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F
from safetensors.torch import load_file

# -----------------------------------------------------------------------------
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

# -----------------------------------------------------------------------------
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
    # the parameter-free pad / upsample), time_conv only exists in the 3d modes.
    def __init__(self, dim, mode):
        super().__init__()
        assert mode in ("down2d", "down3d", "up2d", "up3d")
        self.mode = mode
        if mode.startswith("down"):
            # pad right and bottom by one, then a stride-2 3x3 conv: (H, W) -> (H/2, W/2)
            self.resample = nn.Sequential(nn.ZeroPad2d((0, 1, 0, 1)), nn.Conv2d(dim, dim, 3, stride=2))
        else:
            # upstream does the upsample in fp32 to dodge missing bf16 kernels; nearest at exactly 2x is a pure copy
            # (nearest-exact == nearest here), so any dtype gives identical values and we skip the cast.
            # The conv halves the channels: (C, H, W) -> (C/2, 2H, 2W).
            self.resample = nn.Sequential(nn.Upsample(scale_factor=2.0, mode="nearest-exact"),
                                          nn.Conv2d(dim, dim // 2, 3, padding=1))
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


def load_vae(path, dtype=torch.float32, device="cpu", config=VAE_PRESETS["2.1"]) -> WanVAE:
    # path: the official checkpoint folder (with Wan2.1_VAE.pth), Wan2.1_VAE.pth itself, or a .safetensors file with
    # the same keys (ComfyUI's wan_2.1_vae.safetensors). Returns the model in eval mode, frozen, on device in dtype.
    path = str(path)
    if os.path.isdir(path):
        path = os.path.join(path, "Wan2.1_VAE.pth")
    if path.endswith(".safetensors"):
        sd = load_file(path)
    else:
        # weights_only: a .pth is a pickle, and this way it can't run code. mmap: no second copy in RAM.
        sd = torch.load(path, map_location="cpu", weights_only=True, mmap=True)

    with torch.device("meta"):
        model = WanVAE(config)
    expected = model.state_dict().keys()
    missing = sorted(expected - sd.keys())
    unexpected = sorted(sd.keys() - expected)
    if missing or unexpected:
        msg = f"{path} does not match the Wan 2.1 VAE: {len(missing)} missing keys {missing[:5]}, " \
              f"{len(unexpected)} unexpected keys {unexpected[:5]}. "
        if any(".down_blocks." in k or ".up_blocks." in k or k.startswith("quant_conv.") for k in sd):
            msg += "This looks like a diffusers-format VAE (AutoencoderKLWan, keys like 'decoder.up_blocks.0...'), " \
                   "which is not supported: use the official Wan2.1_VAE.pth (or ComfyUI's wan_2.1_vae.safetensors)."
        elif any(k.startswith("decoder.upsamples.0.upsamples.") for k in sd):
            msg += "This looks like the Wan 2.2 VAE (48 latent channels), which is a different model."
        else:
            msg += "Is this a Wan 2.1 VAE file? Expected the official Wan2.1_VAE.pth keys, e.g. " \
                   "'encoder.downsamples.0.residual.0.gamma'."
        raise ValueError(msg)
    # assign=True: the params become these tensors (no allocation on meta, no copy); shape mismatches still raise
    sd = {k: v.to(device=device, dtype=dtype) for k, v in sd.items()}
    model.load_state_dict(sd, assign=True)
    return model.eval().requires_grad_(False)
