# -----------------------------------------------------------------------------
# Text encoder: umT5-XXL encoder (Wan 2.1 / 2.2), inference only, frozen.
# Facts from Wan-Video/Wan2.1 wan/modules/t5.py (model), wan/modules/tokenizers.py (cleaning),
# wan/text2video.py (how the context reaches the DiT) and HF transformers' UMT5EncoderModel (the parity reference).
# Module names equal the keys of the official models_t5_umt5-xxl-enc-bf16.pth, so that file loads with no renames.
import glob
import html
import json
import math
import os
import re
import unicodedata
from dataclasses import dataclass

import sentencepiece
import tokenizers
import torch
import torch.nn as nn
import torch.nn.functional as F
from safetensors.torch import load_file


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


def load_text_encoder(path, dtype=torch.bfloat16, device="cpu", config=T5_PRESETS["umt5-xxl"], tokenizer_path=None):
    # path: the official Wan folder (models_t5_umt5-xxl-enc-bf16.pth + google/umt5-xxl/), a diffusers-format folder
    # (text_encoder/*.safetensors + tokenizer/), or one file: the .pth, or an HF-key .safetensors such as ComfyUI's
    # umt5_xxl_fp16 / umt5_xxl_fp8_e4m3fn_scaled (their tokenizer is the embedded "spiece_model" tensor).
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
    elif path.endswith(".safetensors"):
        sd = load_file(path)
    else:
        sd = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
    if "spiece_model" in sd:
        tok = sd.pop("spiece_model").numpy().tobytes()
    hf_keys = "shared.weight" in sd or "encoder.embed_tokens.weight" in sd
    if hf_keys:
        sd = hf_to_wan_keys(sd)
    # ComfyUI "fp8_scaled": fp8 weight + per-tensor `<name>.scale_weight`; `scaled_fp8` and `scale_input` are markers
    # (dequantized in the target dtype, as ComfyUI does, so no fp32 copy of the model is ever made)
    for k in [k for k in sd if k.endswith(".scale_weight")]:
        w = k[: -len("scale_weight")] + "weight"
        sd[w] = sd[w].to(dtype) * sd.pop(k).to(dtype)
    sd = {k: v for k, v in sd.items() if k != "scaled_fp8" and not k.endswith(".scale_input")}

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
