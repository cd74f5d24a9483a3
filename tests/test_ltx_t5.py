"""The T5-v1.1 encoder against transformers' T5EncoderModel at a tiny config (random weights, unequal masks), and the
tokenizer against transformers' T5Tokenizer on a sentencepiece model trained here (nothing downloads)."""
import os

import torch

import train_ltx as L

WORDS = ("a red fox jumps over the lazy dog while the camera pans slowly to the left across a snowy field at "
         "dawn, cinematic lighting, shallow depth of field").split()


def make_spiece(folder, vocab=40):
    """A tiny T5-style sentencepiece model: pad 0, eos 1, unk 2, no BOS (the T5 ids)."""
    import sentencepiece as spm
    text = os.path.join(folder, "corpus.txt")
    with open(text, "w") as f:
        for i in range(300):
            f.write(" ".join(WORDS[(i * 7 + j) % len(WORDS)] for j in range(12)) + "\n")
    spm.SentencePieceTrainer.train(input=text, model_prefix=os.path.join(folder, "spiece"), vocab_size=vocab,
                                   pad_id=0, eos_id=1, unk_id=2, bos_id=-1, model_type="unigram",
                                   character_coverage=1.0, hard_vocab_limit=False, minloglevel=2)
    return os.path.join(folder, "spiece.model")


def tiny_t5(seed=0):
    torch.manual_seed(seed)
    m = L.T5EncoderModel(L.T5_PRESETS["tiny"])
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in m.named_parameters():
            if "layer_norm" in name:
                p.copy_(1 + 0.2 * torch.randn(p.shape, generator=g))
            elif "relative_attention_bias" in name:
                p.copy_(torch.randn(p.shape, generator=g))
            else:
                p.copy_(torch.randn(p.shape, generator=g) * p.shape[-1] ** -0.5)
    return m.eval()


def hf_twin(model):
    from transformers import T5Config, T5EncoderModel
    c = model.cfg
    ref = T5EncoderModel(T5Config(vocab_size=c.vocab_size, d_model=c.d_model, d_kv=c.d_kv, d_ff=c.d_ff,
                                  num_layers=c.num_layers, num_heads=c.num_heads,
                                  relative_attention_num_buckets=c.relative_attention_num_buckets,
                                  relative_attention_max_distance=c.relative_attention_max_distance,
                                  feed_forward_proj="gated-gelu", dropout_rate=0.0, tie_word_embeddings=False))
    sd = model.state_dict()
    ref.load_state_dict({**sd, "encoder.embed_tokens.weight": sd["shared.weight"]}, strict=True)
    return ref.eval()


def test_t5_matches_transformers():
    model = tiny_t5()
    ref = hf_twin(model)
    g = torch.Generator().manual_seed(1)
    L_ = 150  # longer than max_distance: the far buckets are used
    ids = torch.randint(3, model.cfg.vocab_size, (2, L_), generator=g)
    mask = torch.ones(2, L_, dtype=torch.long)
    mask[0, 100:] = 0
    mask[1, 7:] = 0
    with torch.no_grad():
        ours = model(ids, mask)
        theirs = ref(input_ids=ids, attention_mask=mask).last_hidden_state
    err = (ours - theirs).abs().max().item()
    assert err <= 1e-5 * max(1, theirs.abs().max().item()), err


def test_tokenizer_matches_transformers(tmp_path):
    from transformers import T5Tokenizer
    sp = make_spiece(str(tmp_path))
    ours = L.Tokenizer(sp)
    hf = T5Tokenizer.from_pretrained(str(tmp_path))  # converts spiece.model (transformers 5)
    prompts = ["a red fox jumps over the lazy dog", " the camera pans slowly to the left  ", "",
               " ".join(WORDS * 3)]  # the last one is truncated
    for max_len in (16, 256):
        ids, mask = ours([p.strip() for p in prompts], max_len)
        ref = hf([p.strip() for p in prompts], padding="max_length", max_length=max_len, truncation=True,
                 add_special_tokens=True, return_tensors="pt")
        assert torch.equal(ids, ref.input_ids), (ids, ref.input_ids)
        assert torch.equal(mask, ref.attention_mask)
    assert ids.shape == (4, 256) and ids[3, 15] != 0


def test_text_encoder_as_the_pipeline(tmp_path):
    sp = make_spiece(str(tmp_path))
    te = L.TextEncoder(tiny_t5(), L.Tokenizer(sp))
    ctx, mask = te.encode(["  a red fox  ", "the lazy dog jumps over a snowy field at dawn"])
    assert ctx.shape == (2, 256, 32) and mask.shape == (2, 256)
    ids, m = te.tokenizer(["a red fox", "the lazy dog jumps over a snowy field at dawn"], 256)
    assert torch.equal(mask.cpu(), m) and mask[0].sum() < mask[1].sum()
    with torch.no_grad():
        assert torch.allclose(ctx, te.model(ids, m), atol=0)  # T5 runs with the mask, as the official pipeline
