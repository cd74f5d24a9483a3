"""Loading: a tiny file in the official single-file layout (DiT under model.diffusion_model., VAE under vae., the
architecture in the header's JSON config, bf16 weights, extra statistics) through load_dit / load_vae; a diffusers
DiT folder; the T5 Hugging Face folder (sharded) through load_text_encoder."""
import json
import os

import pytest
import torch
from safetensors.torch import save_file

import train_ltx as L
from tests.test_ltx_dit import randomise, to_diffusers
from tests.test_ltx_t5 import make_spiece, tiny_t5
from tests.test_ltx_vae import TINY, tiny_vae

# a header "transformer" section as the official files write it (the original kwargs; some we ignore)
HEADER_DIT = dict(_class_name="Transformer3DModel", num_layers=3, num_attention_heads=2, attention_head_dim=8,
                  cross_attention_dim=16, caption_channels=12, in_channels=8, out_channels=8,
                  activation_fn="gelu-approximate", attention_bias=True, adaptive_norm="single_scale_shift",
                  standardization_norm="rms_norm", qk_norm="rms_norm", positional_embedding_type="rope",
                  positional_embedding_theta=10000.0, positional_embedding_max_pos=[20, 2048, 2048],
                  timestep_scale_multiplier=1000, causal_temporal_positioning=True, num_embeds_ada_norm=1000,
                  project_to_2d_pos=True)
HEADER_VAE = dict(_class_name="CausalVideoAutoencoder", dims=3, in_channels=3, out_channels=3, norm_layer="pixel_norm",
                  latent_log_var="uniform", use_quant_conv=False, causal_decoder=False, timestep_conditioning=True,
                  scaling_factor=1.0, **TINY)


def make_single_file(path, seed=0):
    """-> (dit, vae) written to `path` in the official layout, bf16, with the header config."""
    cfg = L.dit_config_from(HEADER_DIT)
    torch.manual_seed(seed)
    dit = randomise(L.Transformer3DModel(cfg), seed).eval()
    vae = tiny_vae(seed)
    sd = {L.DIT_PREFIX + k: v.to(torch.bfloat16) for k, v in dit.state_dict().items()}
    sd.update({L.VAE_PREFIX + k: v.to(torch.bfloat16) for k, v in vae.state_dict().items()})
    # statistics the files carry but nothing uses
    sd["vae.per_channel_statistics.mean-of-stds"] = torch.ones(8, dtype=torch.bfloat16)
    sd["vae.per_channel_statistics.channel"] = torch.arange(8, dtype=torch.bfloat16)
    meta = {"config": json.dumps({"transformer": HEADER_DIT, "vae": HEADER_VAE,
                                  "scheduler": {"_class_name": "RectifiedFlowScheduler",
                                                "sampler": "LinearQuadratic"}})}
    save_file({k: v.contiguous() for k, v in sd.items()}, path, metadata=meta)
    return dit, vae


def _bf16_copy(model):
    m = type(model)(model.cfg)
    m.load_state_dict({k: v.to(torch.bfloat16).float() for k, v in model.state_dict().items()})
    return m.eval()


def test_single_file_dit(tmp_path):
    path = str(tmp_path / "ltxv-tiny.safetensors")
    dit, _ = make_single_file(path)
    model = L.load_dit(path)
    assert model.cfg.num_layers == 3 and model.cfg.causal_temporal_positioning  # read from the header
    assert all(p.dtype == torch.float32 for p in model.parameters())  # bf16 in the file, fp32 asked
    want = _bf16_copy(dit)
    g = torch.Generator().manual_seed(0)
    x, ctx = torch.randn(2, 8, 2, 3, 4, generator=g), torch.randn(2, 5, 12, generator=g)
    mask = torch.tensor([[1, 1, 1, 0, 0], [1, 1, 1, 1, 1]])
    with torch.no_grad():
        assert torch.equal(model(x, torch.tensor([300.0, 700.0]), ctx, mask, frame_rate=24.0),
                           want(x, torch.tensor([300.0, 700.0]), ctx, mask, frame_rate=24.0))
    assert L.load_dit(path, dtype=torch.bfloat16).proj_out.weight.dtype == torch.bfloat16


def test_fp8_release_file_upcasts_exactly(tmp_path):
    # ltxv-*-fp8.safetensors: the 2-D attn / ff weights of the blocks stored as plain float8_e4m3fn (same keys, no
    # scales: upstream loads them strictly into the bf16 model), the rest bf16. The upcast must give exactly them.
    path = str(tmp_path / "ltxv-tiny-fp8.safetensors")
    make_single_file(path)
    from safetensors import safe_open
    from safetensors.torch import load_file
    with safe_open(path, "pt") as f:
        meta = f.metadata()
    sd = load_file(path)
    fp8 = [k for k in sd if k.startswith(L.DIT_PREFIX + "transformer_blocks.") and ("attn" in k or ".ff." in k)
           and k.endswith("weight") and sd[k].ndim == 2]
    assert fp8
    sd.update({k: sd[k].to(torch.float8_e4m3fn) for k in fp8})
    save_file(sd, path, metadata=meta)
    assert all(torch.equal(sd[k].to(torch.bfloat16).float(), sd[k].float()) for k in fp8)  # e4m3 fits in bf16
    for dt in (torch.float32, torch.bfloat16):
        got = L.load_dit(path, dtype=dt).state_dict()
        for k in fp8:
            assert got[k[len(L.DIT_PREFIX):]].dtype == dt and torch.equal(got[k[len(L.DIT_PREFIX):]], sd[k].to(dt))


def test_single_file_vae(tmp_path):
    path = str(tmp_path / "ltxv-tiny.safetensors")
    _, vae = make_single_file(path)
    model = L.load_vae(path)
    want = _bf16_copy(vae)
    video = torch.rand(1, 3, 9, 32, 64, generator=torch.Generator().manual_seed(0)) * 2 - 1
    z = model.encode(video)
    assert torch.equal(z, want.encode(video))
    assert torch.equal(model.decode(z), want.decode(z))
    # the checkpoint's own decoder.timestep_scale_multiplier (640 here, not 1000) is the one used
    assert model.decoder.timestep_scale_multiplier.item() == 640.0


def test_header_config_is_required_and_checked(tmp_path):
    path = str(tmp_path / "bare.safetensors")
    save_file({"model.diffusion_model.proj_out.weight": torch.zeros(8, 16)}, path)
    with pytest.raises(ValueError, match="header"):
        L.load_dit(path)
    with pytest.raises(ValueError, match="rope"):
        L.dit_config_from({**HEADER_DIT, "positional_embedding_type": "sincos"})
    with pytest.raises(ValueError, match="0.9.0"):
        L.vae_config_from({"_class_name": "CausalVideoAutoencoder", "dims": 3, "blocks": []})
    with pytest.raises(ValueError, match="0.9.1"):
        L.CausalVideoAutoencoder(L.VAEConfig(**{**TINY, "decoder_blocks": [["res_x", {"num_layers": 1,
                                                                                       "inject_noise": True}]]}))


def test_diffusers_dit_folder(tmp_path):
    path = str(tmp_path / "ltxv-tiny.safetensors")
    dit, _ = make_single_file(path)
    folder = tmp_path / "diffusers" / "transformer"
    folder.mkdir(parents=True)
    save_file({k: v.contiguous() for k, v in to_diffusers(dit.state_dict()).items()},
              str(folder / "diffusion_pytorch_model.safetensors"))
    with open(folder / "config.json", "w") as f:
        json.dump(dict(_class_name="LTXVideoTransformer3DModel", in_channels=8, out_channels=8, patch_size=1,
                       patch_size_t=1, num_attention_heads=2, attention_head_dim=8, cross_attention_dim=16,
                       num_layers=3, caption_channels=12, qk_norm="rms_norm_across_heads",
                       activation_fn="gelu-approximate"), f)
    model = L.load_dit(str(tmp_path / "diffusers"))
    assert all(torch.equal(a, b) for a, b in zip(model.state_dict().values(), dit.state_dict().values()))


def test_text_encoder_hf_folder(tmp_path):
    from transformers import T5Config, T5EncoderModel
    t5 = tiny_t5()
    c = t5.cfg
    ref = T5EncoderModel(T5Config(vocab_size=c.vocab_size, d_model=c.d_model, d_kv=c.d_kv, d_ff=c.d_ff,
                                  num_layers=c.num_layers, num_heads=c.num_heads, feed_forward_proj="gated-gelu",
                                  dropout_rate=0.0)).eval()
    ref.load_state_dict({**t5.state_dict(), "encoder.embed_tokens.weight": t5.state_dict()["shared.weight"]})
    root = tmp_path / "PixArt-XL-2-1024-MS"
    ref.save_pretrained(str(root / "text_encoder"), max_shard_size="20KB")  # shards + model.safetensors.index.json
    assert os.path.exists(root / "text_encoder" / "model.safetensors.index.json")
    (root / "tokenizer").mkdir()
    make_spiece(str(root / "tokenizer"))
    te = L.load_text_encoder(str(root), dtype=torch.float32)
    ctx, mask = te.encode(["a red fox jumps over the lazy dog", "dawn"])
    ids, m = te.tokenizer(["a red fox jumps over the lazy dog", "dawn"])
    with torch.no_grad():
        want = ref(input_ids=ids, attention_mask=m).last_hidden_state
    assert torch.equal(mask, m)
    assert (ctx - want).abs().max() <= 1e-5
    assert ctx.shape == (2, L.TEXT_LEN, c.d_model)


def test_distilled_header_allows_only_its_timesteps(tmp_path):
    """A distilled release's header lists `allowed_inference_steps`, and upstream's pipeline asserts that every
    timestep is one of them (rounded to 4 places): sampling with another schedule is refused before any work, one
    line naming both lists; the distilled schedule passes, and so does any schedule for a file without the list."""
    from common.args import UserError
    allowed = [1.0, 0.9937, 0.9875, 0.9812, 0.975, 0.9094, 0.725, 0.4219]
    f = tmp_path / "ltxv-2b-0.9.8-distilled.safetensors"
    save_file({"x": torch.zeros(1)}, f, metadata={"config": json.dumps({"allowed_inference_steps": allowed})})
    cfg = L.DIT_PRESETS["tiny"]
    args = L.Args(preset="tiny", ckpt_dir=str(f), sample_prompts="a", height=64, width=64, frames=9,
                  sample_stg_blocks="1")
    assert L.allowed_timesteps(args) == allowed
    with pytest.raises(UserError, match=r"allows only the timesteps \[1.0, 0.9937.*would take \[0\.9"):
        L.check_sample_config(args, cfg)
    L.check_sample_config(L.Args(**{**args.__dict__, "sample_schedule": "distilled"}), cfg)  # its own: allowed
    plain = tmp_path / "dev.safetensors"
    save_file({"x": torch.zeros(1)}, plain, metadata={"config": json.dumps({})})
    assert L.allowed_timesteps(L.Args(**{**args.__dict__, "ckpt_dir": str(plain)})) is None
    L.check_sample_config(L.Args(**{**args.__dict__, "ckpt_dir": str(plain)}), cfg)


def test_ckpt_dir_prefers_the_presets_file_to_the_diffusers_folders(tmp_path):
    """The Hugging Face repo Lightricks/LTX-Video holds the ltxv-*.safetensors releases next to transformer/ and
    vae/ (diffusers folders of 0.9.0): --preset 2B --ckpt_dir LTX-Video takes the 2B release file; --ckpt_file wins
    over both; the folders are --ckpt_dir's model only where no such file is there."""
    root = tmp_path / "LTX-Video"
    for d in ("transformer", "vae"):
        (root / d).mkdir(parents=True)
        (root / d / "config.json").write_text(json.dumps({"_class_name": "LTXVideoTransformer3DModel"}))
    release = root / L.CKPT_FILES["2B"]
    make_single_file(str(release))
    make_single_file(str(root / "ltxv-other.safetensors"))
    args = L.Args(preset="2B", ckpt_dir=str(root))
    assert L.ckpt_file(args) == str(release)
    assert L.dit_config(args).num_layers == 3  # the DiT comes from the file's header, not transformer/config.json
    assert L.ckpt_file(L.Args(preset="2B", ckpt_dir=str(root), ckpt_file="ltxv-other.safetensors")) == \
        str(root / "ltxv-other.safetensors")
    assert L.ckpt_file(L.Args(preset="13B", ckpt_dir=str(root))) == str(root)  # no 13B file: the folders
    os.remove(release)
    assert L.ckpt_file(args) == str(root)
