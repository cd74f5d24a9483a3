"""A full fine-tune's export (export_weights): its header config is one upstream's loaders build the right models
from (every key of an official header, with the same values, for the tiny config), from an official single file
(with a complete or a sparse header) and from a diffusers folder, and our loaders read the export back."""
import json

import torch
from safetensors import safe_open
from safetensors.torch import save_file

import train_ltx as L
from tests.procs import gloo_world_of_one
from tests.test_ltx_loading import HEADER_DIT, HEADER_VAE, make_single_file

SCHEDULER = {"_class_name": "RectifiedFlowScheduler", "sampler": "LinearQuadratic"}  # make_single_file's


def export(base, tmp_path):
    """-> (the exported file, the DiT that was exported): the base's DiT as a full fine-tune's export of it."""
    model = L.load_dit(base)
    out = str(tmp_path / "model.safetensors")
    with gloo_world_of_one():
        L.export_weights(model, L.Args(preset="tiny", ckpt_dir=str(base)), model.cfg, out)
    return out, model


def assert_has(section, official, skip=()):
    """Every key of the official section is in `section` with the official value."""
    missing = {k: v for k, v in official.items() if k not in skip and section.get(k, "<absent>") != v}
    assert not missing, {k: (section.get(k, "<absent>"), v) for k, v in missing.items()}


def assert_loads_back(out, model, base_vae):
    dit, vae = L.load_dit(out), L.load_vae(out)
    assert dit.cfg == model.cfg
    assert all(torch.equal(a, b.to(torch.bfloat16).float())
               for a, b in zip(dit.state_dict().values(), model.state_dict().values()))
    assert vae.cfg == base_vae.cfg
    assert all(torch.equal(a, b) for a, b in zip(vae.state_dict().values(), base_vae.state_dict().values()))


def test_export_of_an_official_file_keeps_its_header(tmp_path):
    base = str(tmp_path / "ltxv-tiny.safetensors")
    make_single_file(base)
    out, model = export(base, tmp_path)
    cfg = L.header_config(out)
    assert_has(cfg["transformer"], HEADER_DIT)
    assert cfg["scheduler"] == SCHEDULER  # the base's own sections, as they are
    # the VAE's too, completed with what our loader took for the keys the fixture leaves out (upstream's defaults
    # differ: patch_size 1, and normalize_latent_channels, spatial_padding_mode have defaults as ours)
    assert_has(cfg["vae"], {**HEADER_VAE, "patch_size": 4, "spatial_padding_mode": "zeros"})
    assert "qk_norm_eps" not in cfg["transformer"]  # not an upstream key (its eps is fixed at 1e-5)
    assert_loads_back(out, model, L.load_vae(base))


def test_export_of_a_sparse_header_is_complete(tmp_path):
    """A base whose header names only the sizes (as test_ltx_main's fixture): the export still spells out what
    upstream's Transformer3DModel.from_config defaults to otherwise (geglu, layer_norm, no q/k norm, ...)."""
    full = str(tmp_path / "full.safetensors")
    make_single_file(full)
    with safe_open(full, "pt") as f:
        sd = {k: f.get_tensor(k) for k in f.keys()}
    sizes = {k: HEADER_DIT[k] for k in ("num_layers", "num_attention_heads", "attention_head_dim",
                                        "cross_attention_dim", "caption_channels", "in_channels", "out_channels")}
    base = str(tmp_path / "ltxv-sparse.safetensors")
    save_file(sd, base, metadata={"config": json.dumps({"transformer": sizes, "vae": HEADER_VAE})})
    out, model = export(base, tmp_path)
    cfg = L.header_config(out)
    # the sparse header says nothing about causal_temporal_positioning: 2B-like (not 48 layers) -> False, written
    assert_has(cfg["transformer"], {**HEADER_DIT, "causal_temporal_positioning": False})
    assert_loads_back(out, model, L.load_vae(base))


def test_export_of_a_diffusers_folder_has_upstreams_vae_section(tmp_path):
    from tests.test_ltx_dit import diffusers_twin as dit_twin
    from tests.test_ltx_dit import randomise
    from tests.test_ltx_vae import diffusers_twin as vae_twin
    from tests.test_ltx_vae import tiny_vae
    dit = randomise(L.Transformer3DModel(L.dit_config_from(HEADER_DIT)), 3).eval()
    vae = tiny_vae(4)
    root = tmp_path / "LTX-Video-diffusers"
    dit_twin(dit).save_pretrained(str(root / "transformer"))
    vae_twin(vae).save_pretrained(str(root / "vae"))
    out, model = export(root, tmp_path)
    cfg = L.header_config(out)
    # a diffusers config has no causal flag: 3 layers -> False (test_ltx_extra), written as such
    assert_has(cfg["transformer"], HEADER_DIT, skip=("causal_temporal_positioning",))
    assert cfg["transformer"]["causal_temporal_positioning"] is False
    # the keys upstream's CausalVideoAutoencoder.from_config reads (dims has no default; norm_layer would be
    # group_norm and use_quant_conv True), with the official values
    assert_has(cfg["vae"], {**HEADER_VAE, "normalize_latent_channels": False, "spatial_padding_mode": "zeros"})
    # upstream's inference reads "scheduler" from the file: what our sampler uses for a diffusers folder
    assert cfg["scheduler"]["_class_name"] == "RectifiedFlowScheduler"
    assert cfg["scheduler"]["sampler"] == "LinearQuadratic" and cfg["scheduler"]["shifting"] is None
    assert L.sample_schedule(L.Args(ckpt_dir=out)) == L.sample_schedule(L.Args(ckpt_dir=str(root)))
    assert_loads_back(out, model, L.load_vae(str(root)))
