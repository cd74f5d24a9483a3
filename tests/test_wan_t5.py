"""umT5 text encoder: parity with transformers' UMT5EncoderModel and tokenizer, prompt cleaning, the full-size key
fixture from the official code, and the loaders (official .pth, diffusers, ComfyUI). CPU, fp32 unless named."""
import copy
import html
import json
import os
import random
import shutil

import pytest
import torch
from safetensors.torch import save_file

from train_wan import (T5_PRESETS, T5Encoder, TextEncoder, Tokenizer, clean_prompt, load_text_encoder,
                          relative_position_bucket)

FIXTURES = os.path.join(os.path.dirname(__file__), "fixtures")
CFG = T5_PRESETS["tiny"]
NEG = "色调艳丽，过曝，静态，细节模糊不清，字幕，风格，作品，画作，画面，静止，整体发灰，最差质量，低质量，JPEG压缩残留"
WORDS = ("a cat dog runs jumps over the lazy fox in snowy forest camera pans slowly left right close up shot of woman "
         "man city night rain neon lights café naïve über 猫 狗 跑 森林 雪 夜晚 城市 色调 艳丽 过曝 静态 细节 模糊").split()
PROMPTS = ["a cat runs over the lazy dog.", "", "   leading and  trailing   ", "tabs\tand\nnewlines\r\n here",
           "café naïve über ÜBER", "猫 跑 森林 雪 夜晚", NEG, "emoji 🐱🐶 and unknown ☃ ✓", "ＡＢＣ fullwidth ﬁne",
           "“quoted” ‘single’ don’t", "e\u0301 combining", "zero\u200bwidth nbsp\u00a0ideo\u3000space",
           "numbers 12345 67.89 UPPER MiXeD", " ".join(WORDS) * 3]  # the last one is longer than L: truncation


def random_tiny_encoder(seed=0):
    # every tensor random and O(1) in effect (norm gains around 1, a rel-pos bias that matters): no zero or one may
    # hide a bug
    torch.manual_seed(seed)
    model = T5Encoder(CFG).eval()
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "norm" in name:
                p.copy_(1 + 0.2 * torch.randn_like(p))
            elif "embedding" in name:
                p.copy_(torch.randn_like(p))
            else:
                p.copy_(torch.randn_like(p) * p.shape[1] ** -0.5)
    return model


def wan_to_hf(sd):
    # written out by hand (independent of the loader's rename table), following wan.md §3.2
    out = {"shared.weight": sd["token_embedding.weight"], "encoder.embed_tokens.weight": sd["token_embedding.weight"],
           "encoder.final_layer_norm.weight": sd["norm.weight"]}
    for i in range(CFG.num_layers):
        b, h = f"blocks.{i}.", f"encoder.block.{i}.layer."
        out[h + "0.layer_norm.weight"] = sd[b + "norm1.weight"]
        for x in "qkvo":
            out[h + f"0.SelfAttention.{x}.weight"] = sd[b + f"attn.{x}.weight"]
        out[h + "0.SelfAttention.relative_attention_bias.weight"] = sd[b + "pos_embedding.embedding.weight"]
        out[h + "1.layer_norm.weight"] = sd[b + "norm2.weight"]
        out[h + "1.DenseReluDense.wi_0.weight"] = sd[b + "ffn.gate.0.weight"]  # the GELU branch
        out[h + "1.DenseReluDense.wi_1.weight"] = sd[b + "ffn.fc1.weight"]  # the linear branch
        out[h + "1.DenseReluDense.wo.weight"] = sd[b + "ffn.fc2.weight"]
    return out


def padded_batch(lens=(140, 77, 5), seed=1):
    # L = 140 > max_distance: every bucket is used, including the clamped far ones
    L = max(lens)
    ids = torch.randint(3, CFG.vocab, (len(lens), L), generator=torch.Generator().manual_seed(seed))
    mask = (torch.arange(L)[None] < torch.tensor(lens)[:, None]).long()
    return ids * mask, mask


@pytest.fixture(scope="module")
def model():
    return random_tiny_encoder()


@pytest.fixture(scope="module")
def hf_model(model):
    from transformers import UMT5Config, UMT5EncoderModel
    config = UMT5Config(vocab_size=CFG.vocab, d_model=CFG.dim, d_kv=CFG.dim_attn // CFG.num_heads, d_ff=CFG.dim_ffn,
                        num_layers=CFG.num_layers, num_heads=CFG.num_heads,
                        relative_attention_num_buckets=CFG.num_buckets,
                        relative_attention_max_distance=CFG.max_distance, feed_forward_proj="gated-gelu",
                        layer_norm_epsilon=CFG.eps, dropout_rate=0.0)
    config._attn_implementation = "eager"  # the plain reference math
    assert config.dense_act_fn == "gelu_new" and config.is_gated_act  # as google/umt5-xxl's config
    hf = UMT5EncoderModel(config).eval()
    hf.load_state_dict(wan_to_hf(model.state_dict()), strict=True)
    return hf


@pytest.fixture(scope="module")
def tok_dir(tmp_path_factory):
    """A folder laid out like Wan's google/umt5-xxl/: a sentencepiece unigram model trained here (pad 0, eos 1, unk 2,
    no bos, as umT5's), and the tokenizer.json transformers builds from it, with <extra_id_*> added tokens after the
    pieces (umT5: 256,000 pieces + 300 extra ids)."""
    import sentencepiece
    from transformers import AutoTokenizer
    rng = random.Random(0)
    lines = [" ".join(rng.choice(WORDS) for _ in range(rng.randint(3, 12))) + rng.choice(".,!? ") for _ in range(2000)]
    src, out = tmp_path_factory.mktemp("spm"), tmp_path_factory.mktemp("umt5-xxl")
    with open(src / "spiece.model", "wb") as f:
        sentencepiece.SentencePieceTrainer.train(
            sentence_iterator=iter(lines), model_writer=f, model_type="unigram", vocab_size=100, hard_vocab_limit=False,
            pad_id=0, eos_id=1, unk_id=2, bos_id=-1, pad_piece="<pad>", eos_piece="</s>", unk_piece="<unk>",
            character_coverage=1.0, num_threads=1, minloglevel=2)
    special = {"eos_token": "</s>", "pad_token": "<pad>", "unk_token": "<unk>"}
    config = {"tokenizer_class": "T5Tokenizer", "extra_ids": 3, **special}
    (src / "tokenizer_config.json").write_text(json.dumps(config))
    AutoTokenizer.from_pretrained(str(src)).save_pretrained(str(out))  # tokenizer.json, tokenizer_config.json
    shutil.copy(src / "spiece.model", out / "spiece.model")
    (out / "special_tokens_map.json").write_text(json.dumps(special))
    assert sorted(os.listdir(out)) == ["special_tokens_map.json", "spiece.model", "tokenizer.json",
                                       "tokenizer_config.json"]
    return str(out)


@pytest.fixture(scope="module")
def hf_tok(tok_dir):
    from transformers import AutoTokenizer
    return AutoTokenizer.from_pretrained(tok_dir)  # loads the tokenizer.json, as upstream's AutoTokenizer does


# ----------------------------------------------------------------------------------------------------- model parity

def test_relative_position_buckets_match_hf(hf_model):
    rel = torch.arange(-300, 301)[None, :]
    ref = hf_model.encoder.block[0].layer[0].SelfAttention._relative_position_bucket(rel)
    ours = relative_position_bucket(rel, CFG.num_buckets, CFG.max_distance)
    assert torch.equal(ours, ref)
    assert ours.min() == 0 and ours.max() == CFG.num_buckets - 1


def test_encoder_matches_hf_umt5(model, hf_model):
    ids, mask = padded_batch()
    with torch.no_grad():
        ours = model(ids, mask)
        ref = hf_model(input_ids=ids, attention_mask=mask).last_hidden_state
    valid = mask.bool()
    diff = (ours - ref)[valid].abs().max().item()
    print(f"max |ours - HF| at non-padded positions: {diff:.2e}")
    assert ours.shape == (3, 140, CFG.dim) and diff <= 1e-5


def test_text_encoder_matches_hf_trimmed_and_zero_padded(model, hf_model, tok_dir, hf_tok):
    te = TextEncoder(model, Tokenizer(tok_dir))  # max_len 512, as Wan
    prompts = PROMPTS[:3] + [NEG, " ".join(WORDS) * 20]  # the last one is > 512 tokens
    emb = te.encode(prompts)
    assert emb.shape == (len(prompts), 512, CFG.dim) and te.max_len == 512
    batch = hf_tok([clean_prompt(p) for p in prompts], padding="max_length", truncation=True, max_length=512,
                   return_tensors="pt")
    with torch.no_grad():
        ref = hf_model(input_ids=batch.input_ids, attention_mask=batch.attention_mask).last_hidden_state
    lens = batch.attention_mask.sum(1).tolist()
    assert lens[-1] == 512 and min(lens) >= 1
    worst = 0.0
    for e, r, n in zip(emb, ref, lens):  # upstream: u[:n] (EOS included), then the DiT zero-pads to 512
        worst = max(worst, (e[:n] - r[:n]).abs().max().item())
        assert torch.equal(e[n:], torch.zeros_like(e[n:]))
    print(f"max |encode - HF trimmed| : {worst:.2e}")
    assert worst <= 1e-5


def test_bf16_matches_fp32_and_masks_padding(model):
    # bf16 weights and activations (mask bias in bf16, SDPA in bf16) against fp32 with the same rounded weights
    m16 = copy.deepcopy(model).to(torch.bfloat16)
    m32 = copy.deepcopy(m16).float()
    ids, mask = padded_batch()
    other = torch.where(mask.bool(), ids, torch.randint_like(ids, 3, CFG.vocab))  # different ids under the padding
    with torch.no_grad():
        x16, x16_other, x32 = m16(ids, mask), m16(other, mask), m32(ids, mask)
    valid = mask.bool()
    rel = ((x16.float() - x32)[valid].norm() / x32[valid].norm()).item()
    print(f"bf16 vs fp32 relative error: {rel:.2e}")
    assert x16.dtype == torch.bfloat16 and torch.isfinite(x16).all()
    assert rel < 3e-2
    assert torch.equal(x16[valid], x16_other[valid])  # padded keys contribute exactly nothing


# --------------------------------------------------------------------------------------------------------- tokenizer

@pytest.mark.parametrize("source", ["tokenizer.json", "spiece.model"])
def test_tokenizer_matches_hf(tok_dir, hf_tok, source):
    L = 16
    tok = Tokenizer(os.path.join(tok_dir, source))
    assert (tok.tok is not None) == (source == "tokenizer.json")
    ids, mask = tok(PROMPTS, max_len=L)
    ref = hf_tok(PROMPTS, padding="max_length", truncation=True, max_length=L, return_tensors="pt")
    assert ids.dtype == torch.long and ids.shape == mask.shape == (len(PROMPTS), L)
    assert torch.equal(ids, ref.input_ids) and torch.equal(mask, ref.attention_mask)
    # the long prompt: L - 1 pieces + EOS, no padding; the empty one: just EOS
    assert ids[-1, -1] == 1 and mask[-1].all() and ids[1, 0] == 1 and mask[1].sum() == 1
    # cleaned prompts too (what TextEncoder feeds it)
    cleaned = [clean_prompt(p) for p in PROMPTS]
    ref = hf_tok(cleaned, padding="max_length", truncation=True, max_length=L, return_tensors="pt")
    assert torch.equal(tok(cleaned, L)[0], ref.input_ids)


def test_tokenizer_folder_prefers_tokenizer_json_and_special_tokens_differ(tok_dir, tmp_path, hf_tok):
    assert Tokenizer(tok_dir).tok is not None
    shutil.copy(os.path.join(tok_dir, "spiece.model"), tmp_path / "spiece.model")
    assert Tokenizer(str(tmp_path)).sp is not None  # no tokenizer.json: sentencepiece
    # the documented difference: special tokens written in the text are single ids only through tokenizer.json
    text = ["x </s> y <extra_id_0>"]
    ref = hf_tok(text, padding="max_length", truncation=True, max_length=16, return_tensors="pt").input_ids
    assert torch.equal(Tokenizer(tok_dir)(text, 16)[0], ref)
    assert not torch.equal(Tokenizer(str(tmp_path))(text, 16)[0], ref)


# ----------------------------------------------------------------------------------------------------- clean_prompt

def test_clean_prompt_html_whitespace_and_ftfy_fixes():
    assert clean_prompt("Tom &amp;amp; Jerry &amp;lt;3 &quot;hi&quot;") == 'Tom & Jerry <3 "hi"'  # double-escaped
    assert clean_prompt("  a\t\tb\n\n c \r\n d \u3000 e\u00a0 ") == "a b c d e"
    assert clean_prompt(" \t\n ") == "" and clean_prompt("") == ""
    assert clean_prompt("“Hi,” she said. It’s") == '"Hi," she said. It\'s'
    assert clean_prompt("色调艳丽，过曝！（ＡＢＣ）") == "色调艳丽,过曝!(ABC)"
    assert clean_prompt("ﬁne ĳs") == "fine ijs"
    assert clean_prompt("a\x00b\x07c \x1b[31mred\x1b[0m") == "abc red"
    assert clean_prompt("e\u0301") == "\u00e9"  # NFC


def test_clean_prompt_equals_upstream_on_plain_text():
    # upstream's own pipeline: ftfy and regex are test requirements (pinned), never runtime ones
    import ftfy
    import regex

    def upstream(text):
        text = html.unescape(html.unescape(ftfy.fix_text(text))).strip()
        return regex.sub(r"\s+", " ", text).strip()

    rng = random.Random(0)
    pool = list("abcXYZ019 .,;:!?'\"-()&<>#\t\n\r\u00a0\u3000\u2028\x0b\x0c\x1c\x1f\x00\x7f\u200b") + \
        list("猫森林，。！？（）「」“”‘’ＡＢ１２ｶﾀﾅéüñß") + ["&amp;", "&lt;", "&#39;", "\x1b[1m", "ﬁ", "ĳ", "e\u0301", "🐱"]
    cases = PROMPTS + ["ＬＯＵＤ　ＮＯＩＳＥＳ", "ﬂuﬃeﬆ ŉ Ǆ", "it&rsquo;s", "\ufeffbom x\u2028y"]
    cases += ["".join(rng.choice(pool) for _ in range(rng.randint(0, 30))) for _ in range(1000)]
    # random text can look like mojibake to ftfy ("”ü" read as MacRoman -> "ӟ"): that repair is what we leave out
    plain = [c for c in cases if ftfy.fix_text(c) == ftfy.fix_text(c, fix_encoding=False)]
    assert len(plain) > 0.98 * len(cases)
    assert [clean_prompt(c) for c in plain] == [upstream(c) for c in plain]


# -------------------------------------------------------------------------------------------- full size, meta device

def test_full_size_keys_match_upstream_fixture():
    with open(os.path.join(FIXTURES, "umt5_xxl_keys.json")) as f:
        fixture = json.load(f)  # from upstream's umt5_xxl(encoder_only=True), see make_umt5_keys.py
    with torch.device("meta"):
        model = T5Encoder(T5_PRESETS["umt5-xxl"])
    assert {k: list(v.shape) for k, v in model.state_dict().items()} == fixture
    assert len(fixture) == 242
    assert sum(p.numel() for p in model.parameters()) == 5_680_910_336


# ----------------------------------------------------------------------------------------------------------- loaders

def hf_state(hf_model):  # cloned: safetensors refuses the tied shared/embed_tokens pair that shares memory
    return {k: v.clone() for k, v in hf_model.state_dict().items()}


def official_folder(root, sd, tok_dir):
    os.makedirs(root / "google")
    torch.save(sd, root / "models_t5_umt5-xxl-enc-bf16.pth")
    shutil.copytree(tok_dir, root / "google" / "umt5-xxl")
    return str(root)


def test_loaders_official_diffusers_comfy_agree(model, hf_model, tok_dir, tmp_path):
    prompts = ["a cat runs over the lazy dog.", NEG, ""]
    ref = load_text_encoder(official_folder(tmp_path / "wan", model.state_dict(), tok_dir), dtype=torch.float32,
                            config=CFG)
    emb = ref.encode(prompts)
    assert torch.equal(emb, TextEncoder(model, Tokenizer(tok_dir)).encode(prompts))

    # diffusers: text_encoder/ with 2 shards + index (HF's own state_dict keys, tied embedding saved once), tokenizer/
    hf_sd = {k: v for k, v in hf_state(hf_model).items() if k != "encoder.embed_tokens.weight"}
    names = sorted(hf_sd)
    shards = {"model-00001-of-00002.safetensors": names[: len(names) // 2],
              "model-00002-of-00002.safetensors": names[len(names) // 2:]}
    os.makedirs(tmp_path / "diffusers" / "text_encoder")
    for fname, keys in shards.items():
        save_file({k: hf_sd[k] for k in keys}, str(tmp_path / "diffusers" / "text_encoder" / fname))
    index = {"metadata": {}, "weight_map": {k: f for f, keys in shards.items() for k in keys}}
    (tmp_path / "diffusers" / "text_encoder" / "model.safetensors.index.json").write_text(json.dumps(index))
    shutil.copytree(tok_dir, tmp_path / "diffusers" / "tokenizer")
    te = load_text_encoder(str(tmp_path / "diffusers"), dtype=torch.float32, config=CFG)
    assert torch.equal(te.encode(prompts), emb)

    # ComfyUI single file: HF keys (with the tied duplicate), tokenizer embedded as the uint8 tensor "spiece_model"
    comfy = hf_state(hf_model)
    with open(os.path.join(tok_dir, "spiece.model"), "rb") as f:
        comfy["spiece_model"] = torch.frombuffer(bytearray(f.read()), dtype=torch.uint8)
    save_file(comfy, str(tmp_path / "umt5_xxl_fp16.safetensors"))
    te = load_text_encoder(str(tmp_path / "umt5_xxl_fp16.safetensors"), dtype=torch.float32, config=CFG)
    assert te.tokenizer.sp is not None and torch.equal(te.encode(prompts), emb)

    # bf16 (the default dtype): weights and output in bf16, padded rows still exactly zero
    te = load_text_encoder(str(tmp_path / "wan"), config=CFG)
    assert all(p.dtype == torch.bfloat16 for p in te.model.parameters())
    out = te.encode(prompts)
    assert out.dtype == torch.bfloat16 and (out[2, 1:] == 0).all() and (out[2, 0] != 0).any()


def test_loader_comfy_scaled_fp8_and_tokenizer_path(model, hf_model, tok_dir, tmp_path):
    # ComfyUI's umt5_xxl_fp8_e4m3fn_scaled layout: fp8 Linear weights, a per-tensor fp32 `.scale_weight`, markers
    sd = hf_state(hf_model)
    name = "encoder.block.0.layer.0.SelfAttention.q"
    scale = sd[name + ".weight"].abs().max() / 448
    sd[name + ".weight"] = (sd[name + ".weight"] / scale).to(torch.float8_e4m3fn)
    sd[name + ".scale_weight"] = scale.reshape(())
    sd[name + ".scale_input"] = torch.ones(())
    sd["scaled_fp8"] = torch.empty(0, dtype=torch.float8_e4m3fn)
    save_file(sd, str(tmp_path / "umt5_fp8.safetensors"))
    with pytest.raises(FileNotFoundError, match="tokenizer_path"):  # no embedded spiece_model, no tokenizer given
        load_text_encoder(str(tmp_path / "umt5_fp8.safetensors"), dtype=torch.float32, config=CFG)
    te = load_text_encoder(str(tmp_path / "umt5_fp8.safetensors"), dtype=torch.float32, config=CFG,
                           tokenizer_path=tok_dir)
    assert torch.equal(te.model.blocks[0].attn.q.weight, sd[name + ".weight"].float() * scale)
    assert torch.equal(te.model.blocks[0].attn.k.weight, model.blocks[0].attn.k.weight)
    assert torch.isfinite(te.encode(["a cat"])).all()


@pytest.mark.parametrize("change", ["missing", "unexpected"])
def test_loader_names_bad_keys(model, hf_model, tok_dir, tmp_path, change):
    sd = dict(model.state_dict())
    hf_sd = hf_state(hf_model)
    if change == "missing":
        del sd["blocks.1.ffn.fc1.weight"]
        del hf_sd["encoder.block.1.layer.0.SelfAttention.k.weight"]
        names = ["blocks.1.ffn.fc1.weight", "blocks.1.attn.k.weight"]  # the HF name is reported renamed
    else:
        sd["blocks.0.attn.extra.weight"] = torch.zeros(1)
        hf_sd["decoder.block.0.layer.0.SelfAttention.q.weight"] = torch.zeros(1)
        names = ["blocks.0.attn.extra.weight", "decoder.block.0.attn.q.weight"]  # reported after the HF->Wan renames
    save_file(hf_sd, str(tmp_path / "hf.safetensors"))
    paths = [official_folder(tmp_path / "wan", sd, tok_dir), str(tmp_path / "hf.safetensors")]
    for path, key in zip(paths, names):
        with pytest.raises(ValueError, match=f"1 {change} keys") as err:
            load_text_encoder(path, dtype=torch.float32, config=CFG, tokenizer_path=tok_dir)
        assert key in str(err.value)
