"""Wan 2.1 image-to-video / first-last-frame, Wan 2.2 TI2V-5B and the A14B experts, and the CLIP ViT-H/14 vision
tower. The DiTs against diffusers' WanTransformer3DModel and the CLIP tower against transformers' CLIPVisionModel
(independent implementations, given OUR weights through diffusers' own key conversion / a key map written here);
full-size keys and shapes against fixtures dumped from the official code (tests/fixtures/make_wan_i2v_keys.py)."""
import dataclasses
import json
import os

import pytest
import torch
import torch.nn.functional as F
from safetensors.torch import save_file

import train_wan as W

FIX = os.path.join(os.path.dirname(__file__), "fixtures")

# diffusers splits the image tokens off as `context length - 512`, so the tiny models keep text_len 512
TINY = dict(dim=64, ffn_dim=128, num_heads=2, num_layers=2, text_dim=32, text_len=512)
TINY_CFGS = {
    "i2v": W.WanConfig(**TINY, in_dim=36, out_dim=16, model_type="i2v", img_dim=48),
    "flf2v": W.WanConfig(**TINY, in_dim=36, out_dim=16, model_type="flf2v", img_dim=48),
    "ti2v": W.WanConfig(**TINY, in_dim=48, out_dim=48, model_type="ti2v"),
    "i2v-A14B": W.WanConfig(**TINY, in_dim=36, out_dim=16, model_type="i2v"),  # Wan 2.2 expert: y, no CLIP
}


def tiny(kind, seed=0):
    """Every parameter random and O(1)-effect (upstream init zeroes the head, emb_pos and biases; a parity test must
    not let a zero hide a bug)."""
    torch.manual_seed(seed)
    m = W.WanModel(TINY_CFGS[kind])
    m.init_weights()
    with torch.no_grad():
        for p in m.parameters():
            p.add_(torch.randn_like(p) * 0.05)
    return m.eval()


def inputs(cfg, B=2, F_=3, H=6, Wd=10, seed=1, ctx_len=7):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(B, cfg.out_dim, F_, H, Wd, generator=g)
    y = torch.randn(B, cfg.in_dim - cfg.out_dim, F_, H, Wd, generator=g) if cfg.in_dim != cfg.out_dim else None
    ctx = torch.randn(B, ctx_len, cfg.text_dim, generator=g)  # shorter than 512: the model zero-pads
    n = W.clip_tokens(cfg)
    clip = torch.randn(B, n, cfg.img_dim, generator=g) if n else None
    return x, torch.tensor([999.0, 17.5][:B]), ctx, y, clip


def diffusers_twin(model):
    from diffusers import WanTransformer3DModel
    from diffusers.loaders.single_file_utils import convert_wan_transformer_to_diffusers
    c = model.cfg
    extra = {}
    if c.img_dim:
        extra = dict(image_dim=c.img_dim, added_kv_proj_dim=c.dim)
        if c.model_type == "flf2v":
            extra["pos_embed_seq_len"] = 514
    ref = WanTransformer3DModel(patch_size=c.patch_size, num_attention_heads=c.num_heads,
                                attention_head_dim=c.dim // c.num_heads, in_channels=c.in_dim,
                                out_channels=c.out_dim, text_dim=c.text_dim, freq_dim=c.freq_dim,
                                ffn_dim=c.ffn_dim, num_layers=c.num_layers, eps=c.eps, **extra)
    sd = convert_wan_transformer_to_diffusers({k: v.clone() for k, v in model.state_dict().items()})
    if "img_emb.emb_pos" in sd:  # diffusers' single-file conversion leaves it; its own script renames it so (§1.9)
        sd["condition_embedder.image_embedder.pos_embed"] = sd.pop("img_emb.emb_pos")
    ref.load_state_dict(sd, strict=True)
    return ref.eval()


def run_ref(ref, x, t, ctx, y, clip):
    full = torch.cat([x, y], 1) if y is not None else x
    ctx = F.pad(ctx, (0, 0, 0, 512 - ctx.shape[1]))  # diffusers' pipeline pads to 512; its model does not
    if clip is not None and clip.shape[1] == 514:
        clip = clip.reshape(-1, 257, clip.shape[2])  # (2B, 257, d), first/last interleaved: what upstream takes
    with torch.no_grad():
        return ref(full, t, ctx, encoder_hidden_states_image=clip, return_dict=False)[0]


def test_official_negative_prompt_per_model():
    """--sample_negative official = what upstream samples each model with: Wan 2.1 I2V-14B's config prefixes the shared
    negative prompt with "镜头晃动，" (wan/configs/wan_i2v_14B.py:11), FLF2V-14B (a deepcopy of that config) adds
    "镜头切换，" in front (wan/configs/__init__.py:16-18); the Wan 2.2 configs and every t2v model keep the shared one."""
    shared = W.NEGATIVE_PROMPT
    assert shared.startswith("色调艳丽，过曝，静态，") and shared.endswith("背景人很多，倒着走")
    assert W.official_negative(TINY_CFGS["i2v"]) == "镜头晃动，" + shared
    assert W.official_negative(TINY_CFGS["flf2v"]) == "镜头切换，镜头晃动，" + shared
    for kind in ("ti2v", "i2v-A14B"):  # Wan 2.2: wan_ti2v_5B.py / wan_i2v_A14B.py leave it as it is
        assert W.official_negative(TINY_CFGS[kind]) == shared
    for preset in ("1.3B", "14B", "t2v-A14B", "ti2v-5B", "i2v-A14B"):
        assert W.official_negative(W.DIT_PRESETS[preset]) == shared
    assert W.official_negative(W.DIT_PRESETS["i2v-14B"]) == "镜头晃动，" + shared
    assert W.official_negative(W.DIT_PRESETS["flf2v-14B"]) == "镜头切换，镜头晃动，" + shared


@pytest.mark.parametrize("kind", ["i2v", "flf2v", "i2v-A14B"])
def test_image_to_video_matches_diffusers(kind):
    model = tiny(kind)
    ref = diffusers_twin(model)
    x, t, ctx, y, clip = inputs(model.cfg)
    with torch.no_grad():
        ours = model(x, t, ctx, y=y, clip_fea=clip)
    theirs = run_ref(ref, x, t, ctx, y, clip)
    assert ours.shape == x.shape
    err = (ours - theirs).abs().max().item()
    print(f"{kind} vs diffusers: max abs err {err:.2e}")
    assert err <= 1e-5, err


def test_flf2v_clip_tokens_are_first_then_last_frame():
    # emb_pos tells the two frames apart: swapping them must change the output (so the order is meaningful), and
    # our (B, 514) is upstream's (2B, 257) interleaved per sample: the diffusers twin above is fed exactly that
    model = tiny("flf2v")
    x, t, ctx, y, clip = inputs(model.cfg)
    swapped = torch.cat([clip[:, 257:], clip[:, :257]], 1)
    with torch.no_grad():
        assert not torch.allclose(model(x, t, ctx, y, clip), model(x, t, ctx, y, swapped), atol=1e-4)
    assert torch.equal(clip.view(-1, 257, clip.shape[2])[1], clip[0, 257:])


def test_ti2v_per_token_timestep_matches_diffusers():
    model = tiny("ti2v")
    ref = diffusers_twin(model)
    x, t, ctx, _, _ = inputs(model.cfg)
    f, h, w = x.shape[2], x.shape[3] // 2, x.shape[4] // 2
    tt = W.per_token_t(t, f, h, w, clean_first=True)  # (B, L): the clean first frame's tokens at t = 0
    assert tt.shape == (2, f * h * w) and tt[:, : h * w].eq(0).all() and tt[1, h * w:].eq(17.5).all()
    with torch.no_grad():
        ours = model(x, tt, ctx)
    theirs = run_ref(ref, x, tt, ctx, None, None)
    err = (ours - theirs).abs().max().item()
    print(f"ti2v per-token t vs diffusers: max abs err {err:.2e}")
    assert err <= 1e-5, err
    # one t per latent frame (B, f) is the per-token t that repeats it, grouped (the cheap form for training)
    with torch.no_grad():
        per_frame = model(x, W.per_token_t(t, f, 1, 1, clean_first=True), ctx)
    err_f = (per_frame - ours).abs().max().item()
    print(f"ti2v per-frame t vs per-token t: max abs err {err_f:.2e}")
    assert err_f <= 1e-6, err_f
    # one t for every token is the Wan 2.1 forward (upstream: the same math)
    with torch.no_grad():
        a, b = model(x, t, ctx), model(x, W.per_token_t(t, f, h, w), ctx)
    assert (a - b).abs().max().item() <= 1e-5


def test_input_checks():
    m = tiny("i2v")
    x, t, ctx, y, clip = inputs(m.cfg)
    with pytest.raises(ValueError, match="needs y"):
        m(x, t, ctx, clip_fea=clip)
    with pytest.raises(ValueError, match="clip_fea"):
        m(x, t, ctx, y=y)
    with pytest.raises(ValueError, match="one per token"):
        tiny("ti2v")(torch.randn(1, 48, 1, 4, 4), torch.zeros(1, 5), ctx[:1])


def test_i2v_mask_layout_81_frames():
    # upstream's recipe, literally (image2video.py / first_last_frame2video.py; spec §1.2)
    F_, h, w = 81, 3, 5
    for last in (False, True):
        msk = torch.ones(1, F_, h, w)
        if last:
            msk[:, 1:-1] = 0
        else:
            msk[:, 1:] = 0
        msk = torch.cat([torch.repeat_interleave(msk[:, 0:1], repeats=4, dim=1), msk[:, 1:]], dim=1)
        msk = msk.view(1, msk.shape[1] // 4, 4, h, w).transpose(1, 2)[0]
        ours = W.i2v_mask(F_, h, w, last=last)
        assert ours.shape == (4, 21, h, w)
        assert torch.equal(ours, msk)
    assert W.i2v_mask(F_, h, w, last=True)[:, 20, 0, 0].tolist() == [0, 0, 0, 1]


# ---- full size, on the meta device, against the official code's key/shape dumps (spec §1.1 parameter counts)

FULL = [("i2v-14B", "wan21_i2v_14B", 16_394_878_784), ("flf2v-14B", "wan21_flf2v_14B", 16_395_536_704),
        ("ti2v-5B", "wan22_ti2v_5B", 4_999_787_712), ("t2v-A14B", "wan22_t2v_A14B", 14_288_491_584),
        ("i2v-A14B", "wan22_i2v_A14B", 14_288_901_184)]
OFFICIAL_TYPE = {"i2v-14B": "i2v", "flf2v-14B": "flf2v", "ti2v-5B": "ti2v", "t2v-A14B": "t2v", "i2v-A14B": "i2v"}


def _fixture(name):
    with open(os.path.join(FIX, f"{name}_keys.json")) as f:
        return json.load(f)


@pytest.mark.parametrize("preset,fixture,n_params", FULL)
def test_full_size_keys_shapes_and_counts(preset, fixture, n_params):
    with torch.device("meta"):
        m = W.WanModel(W.DIT_PRESETS[preset])
    shapes = {k: list(v.shape) for k, v in m.state_dict().items()}
    want = _fixture(fixture)
    assert sorted(shapes) == sorted(want), set(shapes) ^ set(want)
    bad = {k: (shapes[k], want[k]) for k in want if shapes[k] != want[k]}
    assert not bad, bad
    assert sum(p.numel() for p in m.parameters()) == n_params


@pytest.mark.parametrize("preset,fixture,n_params", FULL)
def test_config_read_off_the_official_weights(preset, fixture, n_params):
    # the Wan 2.1 I2V-14B and the Wan 2.2 I2V-A14B expert have the same config.json ("i2v", in_dim 36): the weights
    # (img_emb.* or not) decide; a file without config.json gives the same config from its shapes alone
    sd = {k: torch.empty(v, device="meta") for k, v in _fixture(fixture).items()}
    c = W.DIT_PRESETS[preset]
    official = dict(_class_name="WanModel", model_type=OFFICIAL_TYPE[preset], dim=c.dim, ffn_dim=c.ffn_dim,
                    num_heads=c.num_heads, num_layers=c.num_layers, in_dim=c.in_dim, out_dim=c.out_dim, text_len=512,
                    freq_dim=256, eps=1e-6)
    assert W.dit_config_from(official, sd) == c
    assert W.dit_config_from(None, sd) == c


def test_real_size_presets_refuse_random_init():
    from common.args import UserError
    for preset in ("i2v-14B", "flf2v-14B", "ti2v-5B", "t2v-A14B", "i2v-A14B"):
        args = W.Args(preset=preset, encoders="toy", data="somewhere")
        with pytest.raises(UserError, match="released weights"):
            W.check_args(args)


# ---- loading: every layout for the new model types


def _official_folder(root, m, model_type):
    c = m.cfg
    root.mkdir()
    (root / "config.json").write_text(json.dumps(dict(
        _class_name="WanModel", model_type=model_type, dim=c.dim, ffn_dim=c.ffn_dim, num_heads=c.num_heads,
        num_layers=c.num_layers, in_dim=c.in_dim, out_dim=c.out_dim, text_len=c.text_len, freq_dim=c.freq_dim,
        eps=c.eps, text_dim=c.text_dim)))
    save_file({k: v.contiguous() for k, v in m.state_dict().items()}, str(root / "diffusion_pytorch_model.safetensors"))
    return root


def _same(a, b):
    x, t, ctx, y, clip = inputs(a.cfg)
    with torch.no_grad():
        return torch.equal(a(x, t, ctx, y, clip), b(x, t, ctx, y, clip))


@pytest.mark.parametrize("kind", ["i2v", "flf2v", "ti2v", "i2v-A14B"])
def test_load_official_folder_and_single_file(tmp_path, kind):
    m = tiny(kind)
    mt = "i2v" if kind == "i2v-A14B" else kind
    loaded = W.load_dit(str(_official_folder(tmp_path / "official", m, mt)))
    assert loaded.cfg == m.cfg and _same(m, loaded)
    f = tmp_path / "comfy.safetensors"  # ComfyUI's repackaged layout: no config, a prefix
    save_file({"model.diffusion_model." + k: v.contiguous() for k, v in m.state_dict().items()}, str(f))
    cfg = W.read_dit_config(str(f))  # head_dim 128 is assumed without a config: compare the rest
    assert dataclasses.replace(cfg, num_heads=m.cfg.num_heads, text_len=m.cfg.text_len) == m.cfg


def test_load_diffusers_i2v_folder(tmp_path):
    for kind in ("i2v", "flf2v"):
        m = tiny(kind)
        ref = diffusers_twin(m)
        ref.save_pretrained(str(tmp_path / kind / "transformer"))
        loaded = W.load_dit(str(tmp_path / kind))
        assert loaded.cfg == m.cfg
        assert _same(m, loaded)


def test_wrong_type_is_refused(tmp_path):
    m = tiny("i2v")
    cfg_dir = _official_folder(tmp_path / "a", m, "t2v")  # 36 channels in, but says t2v
    with pytest.raises(ValueError, match="t2v"):
        W.load_dit(str(cfg_dir))
    cfg_dir = _official_folder(tmp_path / "b", tiny("i2v-A14B"), "flf2v")  # flf2v without img_emb
    with pytest.raises(ValueError, match="flf2v"):
        W.load_dit(str(cfg_dir))


# ---- bf16 on CPU


@pytest.mark.parametrize("kind", ["i2v", "flf2v", "ti2v"])
def test_bf16_forward_on_cpu(kind):
    m = tiny(kind)
    x, t, ctx, y, clip = inputs(m.cfg)
    if kind == "ti2v":
        t = W.per_token_t(t, x.shape[2], x.shape[3] // 2, x.shape[4] // 2, clean_first=True)
    with torch.no_grad():
        ref = m(x, t, ctx, y, clip)
        mb = tiny(kind).to(torch.bfloat16)
        out = mb(x.bfloat16(), t, ctx.bfloat16(), None if y is None else y.bfloat16(),
                 None if clip is None else clip.bfloat16())
    assert out.dtype == torch.float32 and torch.isfinite(out).all()
    rel = ((out - ref).norm() / ref.norm()).item()
    print(f"{kind} bf16 vs fp32: relative error {rel:.3f}")
    assert rel < 0.1, rel


# ---- CLIP ViT-H/14 vision tower


def hf_tiny_clip(seed=0):
    from transformers import CLIPVisionConfig, CLIPVisionModel
    torch.manual_seed(seed)
    hc = CLIPVisionConfig(hidden_size=64, intermediate_size=128, num_hidden_layers=3, num_attention_heads=4,
                          image_size=56, patch_size=14, hidden_act="gelu", layer_norm_eps=1e-5)
    ref = CLIPVisionModel(hc).eval()
    with torch.no_grad():
        for name, p in ref.named_parameters():  # non-trivial norms and biases too
            p.add_(torch.randn_like(p) * (0.1 if p.dim() == 1 else 0.02))
    return ref


def to_open_clip(ref):
    """transformers CLIPVisionModel weights -> the open-clip keys of Wan's .pth (`visual.*`), plus the unused rest of
    the file (post_norm, head, a text tower, log_scale) that load_clip must ignore."""
    sd = {k.removeprefix("vision_model."): v for k, v in ref.state_dict().items()}
    out = {"visual.patch_embedding.weight": sd["embeddings.patch_embedding.weight"],
           "visual.cls_embedding": sd["embeddings.class_embedding"].view(1, 1, -1),
           "visual.pos_embedding": sd["embeddings.position_embedding.weight"][None],
           "visual.pre_norm.weight": sd["pre_layrnorm.weight"], "visual.pre_norm.bias": sd["pre_layrnorm.bias"],
           "visual.post_norm.weight": sd["post_layernorm.weight"], "visual.post_norm.bias": sd["post_layernorm.bias"],
           "visual.head": torch.randn(64, 32), "log_scale": torch.tensor(4.6),
           "textual.token_embedding.weight": torch.randn(10, 8)}
    for i in range(ref.config.num_hidden_layers):
        a, b = f"encoder.layers.{i}.", f"visual.transformer.{i}."
        for n in ("weight", "bias"):
            out[b + "attn.to_qkv." + n] = torch.cat([sd[a + f"self_attn.{p}_proj.{n}"] for p in "qkv"])
            out[b + "attn.proj." + n] = sd[a + "self_attn.out_proj." + n]
            out[b + "norm1." + n] = sd[a + "layer_norm1." + n]
            out[b + "norm2." + n] = sd[a + "layer_norm2." + n]
            out[b + "mlp.0." + n] = sd[a + "mlp.fc1." + n]
            out[b + "mlp.2." + n] = sd[a + "mlp.fc2." + n]
    return {k: v.clone().contiguous() for k, v in out.items()}


def test_clip_vision_matches_transformers(tmp_path):
    from transformers.image_utils import OPENAI_CLIP_MEAN, OPENAI_CLIP_STD
    ref = hf_tiny_clip()
    path = tmp_path / W.CLIP_FILE
    torch.save(to_open_clip(ref), str(path))
    enc = W.load_clip(str(tmp_path), num_heads=4)  # the folder; the tiny tower's heads are not 1280 / 80
    assert len(enc.model.transformer) == 2  # block 3 of 3 is in the file but never run
    g = torch.Generator().manual_seed(3)
    images = torch.rand(2, 3, 40, 70, generator=g) * 2 - 1  # any size, in [-1, 1]
    # upstream's preprocessing, from the spec: bicubic resize of the whole image (no crop), [0, 1], CLIP mean/std
    px = F.interpolate(images, size=(56, 56), mode="bicubic", align_corners=False) * 0.5 + 0.5
    px = (px - torch.tensor(OPENAI_CLIP_MEAN).view(1, 3, 1, 1)) / torch.tensor(OPENAI_CLIP_STD).view(1, 3, 1, 1)
    with torch.no_grad():
        theirs = ref(pixel_values=px, output_hidden_states=True).hidden_states[-2]  # after block 2 of 3
    ours = enc.encode_image(images)
    assert ours.shape == (2, 17, 64)
    err = (ours - theirs).abs().max().item()
    print(f"CLIP vision vs transformers: max abs err {err:.2e}")
    assert err <= 1e-5, err


def test_clip_full_size_keys_and_count():
    want = _fixture("clip_vit_h_14_visual")  # the official visual tower, all 32 blocks, post_norm, head
    sd = {k.removeprefix("visual."): torch.empty(v, device="meta") for k, v in want.items()}
    cfg = W.clip_config_from(sd)
    assert cfg == W.CLIPConfig()
    with torch.device("meta"):
        m = W.CLIPVision(cfg)
    ours = {"visual." + k: list(v.shape) for k, v in m.state_dict().items()}
    unused = {k for k in want if k.startswith(("visual.transformer.31.", "visual.post_norm.")) or k == "visual.head"}
    assert len(unused) == 12 + 2 + 1
    assert sorted(ours) == sorted(set(want) - unused)
    assert all(ours[k] == want[k] for k in ours)
    n_unused = sum(torch.Size(want[k]).numel() for k in unused)
    assert sum(p.numel() for p in m.parameters()) + n_unused == 632_076_800  # spec §4.4: the visual tower


def test_a14b_root_folder_names_the_experts(tmp_path):
    m = tiny("i2v-A14B")
    for e in ("high_noise_model", "low_noise_model"):
        _official_folder(tmp_path / e, m, "i2v")
    with pytest.raises(FileNotFoundError, match="high_noise_model or .*low_noise_model"):
        W.load_dit(str(tmp_path))
    assert _same(m, W.load_dit(str(tmp_path / "low_noise_model")))
