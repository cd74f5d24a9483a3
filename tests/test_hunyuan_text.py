"""Both text encoders against transformers (LlamaModel hidden_states[-3] with the prompt template and crop, and
CLIPTextModel's pooler_output) at tiny configs, with tokenizers made here, through our folder loaders."""
import json
import os

import pytest
import torch

import train_hunyuan as H

PROMPTS = ["a red cat walks on the grass", "  a dog  ", "a very long prompt " * 70]


def _words(*texts):
    import re
    return sorted({w for t in texts for w in re.findall(r"\w+|[^\w\s]+", t)})


def make_tokenizer(path, specials, first_specials=True, texts=PROMPTS):
    """A word-level tokenizer.json: the special tokens as added tokens (matched whole, as in Llama-3's file)."""
    import tokenizers
    words = _words(H.PROMPT_TEMPLATE_VIDEO.replace("{}", ""), H.PROMPT_TEMPLATE_IMAGE.replace("{}", ""), *texts)
    vocab = ({s: i for i, s in enumerate(specials)} | {w: len(specials) + i for i, w in enumerate(["<unk>", *words])}
             if first_specials else
             {w: i for i, w in enumerate(["<unk>", *words])} | {s: len(words) + 1 + i for i, s in enumerate(specials)})
    tok = tokenizers.Tokenizer(tokenizers.models.WordLevel(vocab, unk_token="<unk>"))
    tok.pre_tokenizer = tokenizers.pre_tokenizers.Whitespace()
    tok.add_special_tokens([tokenizers.AddedToken(s, special=True, normalized=False) for s in specials])
    tok.save(path)
    return len(vocab)


LLAMA_SPECIALS = ["<|begin_of_text|>", "<|end_of_text|>", "<|start_header_id|>", "<|end_header_id|>", "<|eot_id|>",
                  "<pad>"]


def _randomise(model, seed=0):
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for n, p in model.named_parameters():
            if "norm" in n and n.endswith("weight"):
                p.copy_(1 + 0.1 * torch.randn(p.shape, generator=g))
            elif p.dim() == 1:
                p.copy_(0.05 * torch.randn(p.shape, generator=g))
            else:  # O(1) activations: a parity error in absolute terms means the same at every depth
                p.copy_(torch.randn(p.shape, generator=g) * (0.7 if "embed" in n else p.shape[1] ** -0.5))
    return model


def make_llama_folder(path, causal_lm=False, layers=4, hidden=64, texts=PROMPTS):
    from transformers import LlamaConfig, LlamaForCausalLM, LlamaModel
    os.makedirs(path, exist_ok=True)
    V = make_tokenizer(os.path.join(path, "tokenizer.json"), LLAMA_SPECIALS, texts=texts)
    cfg = LlamaConfig(vocab_size=V, hidden_size=hidden, intermediate_size=96, num_hidden_layers=layers,
                      num_attention_heads=hidden // 16, num_key_value_heads=2, head_dim=16, rope_theta=500000.0,
                      rms_norm_eps=1e-5, attn_implementation="eager")
    torch.manual_seed(0)
    ref = _randomise((LlamaForCausalLM if causal_lm else LlamaModel)(cfg).eval())
    ref.save_pretrained(path)
    return ref


def make_clip_folder(path, hidden=32, texts=PROMPTS):
    from transformers import CLIPTextConfig, CLIPTextModel
    os.makedirs(path, exist_ok=True)
    # EOS (= pad) is the highest id, as in openai/clip-vit-large-patch14, whose eos_token_id 2 makes transformers
    # pool at argmax(input_ids): the first EOS
    V = make_tokenizer(os.path.join(path, "tokenizer.json"), ["<|startoftext|>", "<|endoftext|>"],
                       first_specials=False, texts=texts)
    cfg = CLIPTextConfig(vocab_size=V, hidden_size=hidden, intermediate_size=64, num_hidden_layers=2,
                         num_attention_heads=4, max_position_embeddings=77, hidden_act="quick_gelu",
                         eos_token_id=2, bos_token_id=0, pad_token_id=1, attn_implementation="eager")
    torch.manual_seed(1)
    ref = _randomise(CLIPTextModel(cfg).eval(), seed=1)
    ref.save_pretrained(path)
    return ref


def hf_tokens(path, texts, max_len, bos, eos=None, pad="<pad>"):
    """transformers' own tokenizer over the same file, with the post-processor a real tokenizer.json has."""
    import tokenizers
    from transformers import PreTrainedTokenizerFast
    tok = tokenizers.Tokenizer.from_file(os.path.join(path, "tokenizer.json"))
    single = f"{bos} $A" + (f" {eos}" if eos else "")
    tok.post_processor = tokenizers.processors.TemplateProcessing(
        single=single, special_tokens=[(t, tok.token_to_id(t)) for t in (bos, eos) if t])
    hf = PreTrainedTokenizerFast(tokenizer_object=tok, pad_token=pad)
    out = hf(texts, padding="max_length", truncation=True, max_length=max_len, return_tensors="pt")
    return out["input_ids"], out["attention_mask"]


@pytest.mark.parametrize("causal_lm", [False, True])
def test_llm_matches_transformers(tmp_path, causal_lm):
    ref = make_llama_folder(str(tmp_path), causal_lm)
    llm, tok = H.load_llm(str(tmp_path))
    assert len(llm.layers) == 2  # 4 layers, the last 2 skipped
    enc = H.TextEncoders(llm, tok, None, None)
    # crop_start = the template's tokens before the prompt, + BOS
    texts = [H.PROMPT_TEMPLATE_VIDEO.format(p.strip()) for p in PROMPTS]
    L = H.TEXT_LEN + enc.crop_start
    ids, mask = hf_tokens(str(tmp_path), texts, L, "<|begin_of_text|>")
    ours_ids, ours_mask = tok(texts, L)
    assert torch.equal(ids, ours_ids) and torch.equal(mask, ours_mask)
    prefix_ids = hf_tokens(str(tmp_path), [H.PROMPT_TEMPLATE_VIDEO.split("{}")[0]], 512, "<|begin_of_text|>")[1]
    assert enc.crop_start == prefix_ids.sum()
    assert mask.sum(1).tolist()[2] == L and mask.sum(1)[0] < L  # one padded row, one truncated row
    base = ref.model if causal_lm else ref
    with torch.no_grad():
        want = base(input_ids=ids, attention_mask=mask, output_hidden_states=True).hidden_states[-3]
        got = llm(ids, mask)
    valid = mask.bool()
    err = (got - want)[valid].abs().max().item()
    assert err <= 1e-5, err
    # what the DiT gets: the crop, 256 tokens
    with torch.no_grad():
        states = got[:, enc.crop_start:]
    assert states.shape == (3, H.TEXT_LEN, 64)


def test_clip_matches_transformers(tmp_path):
    ref = make_clip_folder(str(tmp_path))
    clip, tok = H.load_clip(str(tmp_path))
    ids, mask = hf_tokens(str(tmp_path), PROMPTS, 77, "<|startoftext|>", "<|endoftext|>", pad="<|endoftext|>")
    ours_ids, ours_mask = tok(PROMPTS, 77)
    assert torch.equal(ids, ours_ids) and torch.equal(mask, ours_mask)
    with torch.no_grad():
        want = ref(input_ids=ids, attention_mask=mask).pooler_output
        got = clip(ids, mask, tok.eos_id)
    err = (got - want).abs().max().item()
    assert err <= 1e-5, err
    # the openai/clip-vit-large-patch14 layout: text_model.* keys (older transformers), a position_ids buffer and
    # the vision half in the same file
    import glob
    from safetensors.torch import load_file, save_file
    f = glob.glob(str(tmp_path / "*.safetensors"))[0]
    sd = {"text_model." + k: v for k, v in load_file(f).items()}
    sd.update({"text_model.embeddings.position_ids": torch.arange(77)[None], "vision_model.post_layernorm.weight":
               torch.ones(4), "logit_scale": torch.tensor(1.0)})
    os.remove(f)
    save_file(sd, f)
    clip2, _ = H.load_clip(str(tmp_path))
    with torch.no_grad():
        assert torch.equal(clip2(ids, mask, tok.eos_id), got)


def test_text_encoders_folder(tmp_path):
    ref = make_llama_folder(str(tmp_path / "text_encoder"))
    make_clip_folder(str(tmp_path / "text_encoder_2"))
    te = H.load_text_encoders(str(tmp_path))
    states, mask, pooled = te.encode(PROMPTS[:2])
    assert states.shape == (2, H.TEXT_LEN, 64) and mask.shape == (2, H.TEXT_LEN) and pooled.shape == (2, 32)
    # prompt 0: its words + <|eot_id|> are the valid tokens after the crop; prompt 1 is stripped first
    assert mask.sum(1).tolist() == [len(PROMPTS[0].split()) + 1, 3]
    ids, m = hf_tokens(str(tmp_path / "text_encoder"), [H.PROMPT_TEMPLATE_VIDEO.format("a dog")],
                       H.TEXT_LEN + te.crop_start, "<|begin_of_text|>")
    with torch.no_grad():
        want = ref(input_ids=ids, attention_mask=m, output_hidden_states=True).hidden_states[-3][:, te.crop_start:]
    assert (states[1, :3] - want[0, :3]).abs().max() <= 1e-5


def test_llava_folder_layout(tmp_path):
    """A whole llava-llama-3 folder (xtuner's LlavaForConditionalGeneration): the language model's keys are taken
    (language_model.model.*, or model.language_model.* as transformers 5 writes them), the rest dropped."""
    import glob
    from safetensors.torch import load_file, save_file
    make_llama_folder(str(tmp_path / "plain"))
    llm, tok = H.load_llm(str(tmp_path / "plain"))
    sd = load_file(glob.glob(str(tmp_path / "plain" / "*.safetensors"))[0])
    cfg = json.load(open(tmp_path / "plain" / "config.json"))
    ids, mask = tok([H.PROMPT_TEMPLATE_VIDEO.format("a red cat")], 120)
    with torch.no_grad():
        want = llm(ids, mask)
    for prefix in ("language_model.model.", "model.language_model."):
        d = tmp_path / prefix.replace(".", "_")
        d.mkdir()
        out = {prefix + k: v for k, v in sd.items()}
        out.update({"language_model.lm_head.weight": torch.zeros(4, 4), "vision_tower.x.weight": torch.zeros(2),
                    "multi_modal_projector.linear_1.weight": torch.zeros(2)})
        save_file(out, str(d / "model.safetensors"))
        (d / "config.json").write_text(json.dumps({"architectures": ["LlavaForConditionalGeneration"],
                                                   "text_config": cfg}))
        os.link(tmp_path / "plain" / "tokenizer.json", d / "tokenizer.json")
        got, _ = H.load_llm(str(d))
        with torch.no_grad():
            assert torch.equal(got(ids, mask), want)
