"""The T5-v1.1 encoder against transformers' T5EncoderModel (what upstream runs) at a tiny random config, the
tokenizer against transformers' T5Tokenizer on a sentencepiece model trained here, the official conditioning
(256 tokens, the empty prompt's all-False mask), the full-size keys/shapes/count against a fixture, and the loader
on the layouts it accepts."""
import json
import os
import random

import pytest
import torch
from safetensors.torch import save_file

import train_mochi as M
from tests.checks import check_full_size_keys

FIX = os.path.join(os.path.dirname(__file__), "fixtures")
CFG = M.T5_PRESETS["tiny"]
WORDS = ("a cat dog runs jumps over the lazy fox in snowy forest camera pans slowly left right close up shot of "
         "woman man city night rain neon lights café naïve über").split()
PROMPTS = ["a cat runs over the lazy dog.", "a", "   leading and  trailing   ", "café naïve über ÜBER",
           "numbers 12345 UPPER MiXeD", " ".join(WORDS) * 3]  # the last one is longer than 16 tokens: truncation


def hf_config():
    from transformers import T5Config
    c = T5Config(vocab_size=CFG.vocab, d_model=CFG.dim, d_kv=CFG.d_kv, d_ff=CFG.d_ff, num_layers=CFG.num_layers,
                 num_heads=CFG.num_heads, relative_attention_num_buckets=CFG.num_buckets,
                 relative_attention_max_distance=CFG.max_distance, feed_forward_proj="gated-gelu",
                 layer_norm_epsilon=CFG.eps, dropout_rate=0.0, tie_word_embeddings=False)
    c._attn_implementation = "eager"
    return c


@pytest.fixture(scope="module")
def hf_model():
    from transformers import T5EncoderModel
    torch.manual_seed(0)
    m = T5EncoderModel(hf_config()).eval()
    with torch.no_grad():
        for name, p in m.named_parameters():
            if "layer_norm" in name:
                p.copy_(1 + 0.2 * torch.randn_like(p))
            elif "shared" in name or "relative" in name:
                p.copy_(torch.randn_like(p))
            else:
                p.copy_(torch.randn_like(p) * p.shape[1] ** -0.5)
    return m


@pytest.fixture(scope="module")
def model(hf_model):
    m = M.T5Encoder(CFG).eval()
    sd = {k: v for k, v in hf_model.state_dict().items() if k != "encoder.embed_tokens.weight"}
    m.load_state_dict(sd, strict=True)  # our module names are transformers' own
    return m


@pytest.fixture(scope="module")
def tok_dir(tmp_path_factory):
    """A t5-style sentencepiece unigram model (pad 0, eos 1, unk 2, no bos) trained here, with the
    tokenizer_config.json that T5Tokenizer reads."""
    import sentencepiece
    rng = random.Random(0)
    lines = [" ".join(rng.choice(WORDS) for _ in range(rng.randint(3, 12))) + rng.choice(".,!? ") for _ in range(2000)]
    out = tmp_path_factory.mktemp("t5tok")
    with open(out / "spiece.model", "wb") as f:
        sentencepiece.SentencePieceTrainer.train(
            sentence_iterator=iter(lines), model_writer=f, model_type="unigram", vocab_size=100, hard_vocab_limit=False,
            pad_id=0, eos_id=1, unk_id=2, bos_id=-1, pad_piece="<pad>", eos_piece="</s>", unk_piece="<unk>",
            character_coverage=1.0, num_threads=1, minloglevel=2)
    (out / "tokenizer_config.json").write_text(json.dumps(
        {"tokenizer_class": "T5Tokenizer", "extra_ids": 3, "eos_token": "</s>", "pad_token": "<pad>",
         "unk_token": "<unk>", "legacy": False}))
    return str(out)


def test_relative_position_buckets_match_hf(hf_model):
    rel = torch.arange(-300, 301)[None, :]
    ref = hf_model.encoder.block[0].layer[0].SelfAttention._relative_position_bucket(
        rel, bidirectional=True, num_buckets=CFG.num_buckets, max_distance=CFG.max_distance)
    assert torch.equal(M.relative_position_bucket(rel, CFG.num_buckets, CFG.max_distance), ref)


def test_encoder_matches_hf(model, hf_model):
    lens = (140, 77, 5)
    ids = torch.randint(3, CFG.vocab, (3, 140), generator=torch.Generator().manual_seed(1))
    mask = (torch.arange(140)[None] < torch.tensor(lens)[:, None]).long()
    with torch.no_grad():
        ours = model(ids * mask, mask)
        ref = hf_model(input_ids=ids * mask, attention_mask=mask).last_hidden_state
    err = (ours - ref)[mask.bool()].abs().max().item()
    print(f"T5 vs transformers: max diff {err:.2e}")
    assert err <= 1e-5, err


def test_tokenizer_matches_transformers(tok_dir):
    from transformers import T5Tokenizer
    ref_tok = T5Tokenizer.from_pretrained(tok_dir, legacy=False)  # as upstream's t5_tokenizer()
    ids, mask = M.Tokenizer(tok_dir)(PROMPTS, max_len=16)
    ref = ref_tok(PROMPTS, padding="max_length", truncation=True, max_length=16, return_tensors="pt")
    assert torch.equal(ids, ref.input_ids) and torch.equal(mask, ref.attention_mask.bool())
    assert ids[-1, -1] == 1 and mask[-1].all()  # truncated: 15 pieces + EOS


def test_conditioning_256_tokens_and_empty_prompt(model, tok_dir):
    te = M.TextEncoder(model, M.Tokenizer(tok_dir))
    y, mask = te.encode(["a cat runs", ""])
    assert y.shape == (2, 256, CFG.dim) and y.dtype == torch.float32 and mask.dtype == torch.bool
    assert mask[0].sum() == 4 and not mask[1].any()  # "a cat runs" = 3 pieces + EOS; "" -> no text at all


def test_full_size_keys_shapes_and_count():
    with torch.device("meta"):
        m = M.T5Encoder(M.T5_PRESETS["t5-v1_1-xxl"])
    # less transformers' tied alias of shared.weight
    check_full_size_keys(m, os.path.join(FIX, "mochi_t5_keys.json"), 4_762_310_656, drop=["encoder.embed_tokens.weight"])


@pytest.mark.parametrize("layout", ["mochi", "t5_folder", "file"])
def test_loader_layouts(hf_model, model, tok_dir, tmp_path, layout):
    import shutil
    sd = {k: v.clone() for k, v in hf_model.state_dict().items()}  # shared and embed_tokens: two tensors
    if layout == "mochi":  # genmo/mochi-1-preview: text_encoder/ (sharded safetensors) + tokenizer/
        (tmp_path / "text_encoder").mkdir()
        keys = sorted(sd)
        save_file({k: sd[k] for k in keys[::2]}, str(tmp_path / "text_encoder" / "model-00001-of-00002.safetensors"))
        save_file({k: sd[k] for k in keys[1::2]}, str(tmp_path / "text_encoder" / "model-00002-of-00002.safetensors"))
        shutil.copytree(tok_dir, tmp_path / "tokenizer")
        te = M.load_text_encoder(tmp_path)
    elif layout == "t5_folder":  # google/t5-v1_1-xxl: pytorch_model.bin + spiece.model side by side
        torch.save(sd, tmp_path / "pytorch_model.bin")
        shutil.copy(os.path.join(tok_dir, "spiece.model"), tmp_path / "spiece.model")
        te = M.load_text_encoder(tmp_path)
    else:
        sd.pop("encoder.embed_tokens.weight")
        save_file(sd, str(tmp_path / "t5.safetensors"))
        te = M.load_text_encoder(tmp_path / "t5.safetensors", tokenizer_path=tok_dir)
    assert te.model.cfg == CFG
    ids = torch.randint(3, CFG.vocab, (1, 12), generator=torch.Generator().manual_seed(2))
    mask = torch.ones_like(ids)
    with torch.no_grad():
        assert torch.equal(te.model(ids, mask), model(ids, mask))


def test_comfyui_t5xxl_fp8_scaled_file(hf_model, tok_dir, tmp_path):
    """ComfyUI's t5xxl_fp8_e4m3fn_scaled.safetensors layout (transformers' keys, fp8 Linear weights with fp32
    `.scale_weight`s, the `scaled_fp8` marker): each weight dequantized, weight.float() x scale."""
    sd = {k: v.clone() for k, v in hf_model.state_dict().items() if k != "encoder.embed_tokens.weight"}
    name = "encoder.block.0.layer.0.SelfAttention.q"
    scale = sd[name + ".weight"].abs().max() / 448
    sd[name + ".weight"] = (sd[name + ".weight"] / scale).to(torch.float8_e4m3fn)
    sd[name + ".scale_weight"] = scale.reshape(())
    sd["scaled_fp8"] = torch.empty(0, dtype=torch.float8_e4m3fn)
    save_file(sd, str(tmp_path / "t5xxl_fp8_e4m3fn_scaled.safetensors"))
    te = M.load_text_encoder(tmp_path / "t5xxl_fp8_e4m3fn_scaled.safetensors", tokenizer_path=tok_dir)
    got = te.model.state_dict()
    assert torch.equal(got[name + ".weight"], sd[name + ".weight"].float() * scale)
    k = "encoder.block.0.layer.0.SelfAttention.k.weight"
    assert torch.equal(got[k], hf_model.state_dict()[k])


def test_official_weights_folder_without_t5_is_named_before_reading(tmp_path):
    """genmoai/mochi scripts/download_weights.py fills a folder with dit/encoder/decoder.safetensors only (upstream
    takes T5 from google/t5-v1_1-xxl): say so, instead of reading the 40 GB DiT as T5 weights."""
    save_file({"pos_frequencies": torch.zeros(3, 2, 4)}, str(tmp_path / "dit.safetensors"))
    save_file({"layers.0.weight": torch.zeros(4, 15)}, str(tmp_path / "encoder.safetensors"))
    with pytest.raises(FileNotFoundError, match="text_encoder"):
        M.load_text_encoder(tmp_path)


def test_sharded_folder_reads_its_index_not_every_file(hf_model, model, tok_dir, tmp_path):
    """A transformers-saved folder lists its shards in model.safetensors.index.json (what from_pretrained reads); other
    .safetensors beside them, e.g. a bf16 variant (model.bf16-0000x-of-0000n.safetensors), are not part of it."""
    import shutil
    sd = {k: v.clone() for k, v in hf_model.state_dict().items() if k != "encoder.embed_tokens.weight"}
    keys = sorted(sd)
    shards = {"model-00001-of-00002.safetensors": keys[::2], "model-00002-of-00002.safetensors": keys[1::2]}
    te_dir = tmp_path / "text_encoder"
    te_dir.mkdir()
    for name, ks in shards.items():
        save_file({k: sd[k] for k in ks}, str(te_dir / name))
    (te_dir / "model.safetensors.index.json").write_text(json.dumps(
        {"metadata": {}, "weight_map": {k: name for name, ks in shards.items() for k in ks}}))
    save_file({k: (v * 0.5).bfloat16() for k, v in sd.items()}, str(te_dir / "model.bf16-00001-of-00001.safetensors"))
    shutil.copytree(tok_dir, tmp_path / "tokenizer")
    te = M.load_text_encoder(tmp_path)
    ids = torch.randint(3, CFG.vocab, (1, 12), generator=torch.Generator().manual_seed(2))
    mask = torch.ones_like(ids)
    with torch.no_grad():
        assert torch.equal(te.model(ids, mask), model(ids, mask))
