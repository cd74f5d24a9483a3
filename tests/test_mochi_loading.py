"""Loading the official file layouts: dit.safetensors (fp32 on disk) read into fp32 or bf16 with the tensors upstream
keeps in fp32 left fp32, ComfyUI's prefixed single file, the architecture read off the shapes; encoder/decoder
.safetensors with the VAE's widths read off them; clear errors for files that are not these."""
import dataclasses

import pytest
import torch
from safetensors.torch import save_file

import train_mochi as M
from tests.checks import fp8_scaled
from tests.test_mochi_dit import inputs, tiny_dit
from tests.test_mochi_vae import tiny_vae


def save(sd, path, prefix=""):
    save_file({prefix + k: v.contiguous() for k, v in sd.items()}, str(path))


def test_dit_folder_fp32_round_trip(tmp_path):
    ref = tiny_dit()
    save(ref.state_dict(), tmp_path / M.DIT_FILE)
    m = M.load_dit(tmp_path)
    assert m.cfg == dataclasses.replace(ref.cfg, text_len=256)  # the file knows no text length: the release's
    x, y, mask = inputs(ref.cfg, 2, 2, 4, 6, [3, 9])
    sigma = torch.tensor([0.4, 0.9])
    with torch.no_grad():
        assert torch.equal(m(x, sigma, y, mask), ref(x, sigma, y, mask))


def test_dit_bf16_keeps_rope_and_qk_norms_fp32(tmp_path):
    ref = tiny_dit()
    save(ref.state_dict(), tmp_path / "mochi_preview_comfy.safetensors", prefix="model.diffusion_model.")
    m = M.load_dit(tmp_path / "mochi_preview_comfy.safetensors", dtype=torch.bfloat16)
    kept = {k for k, v in m.state_dict().items() if v.dtype == torch.float32}
    assert kept == {k for k in m.state_dict() if M.keep_fp32(k)}
    assert len(kept) == 1 + 4 * ref.cfg.depth  # pos_frequencies + 4 q/k norms per block
    assert torch.equal(m.pos_frequencies, ref.pos_frequencies)  # not rounded through bf16
    assert m.blocks[0].attn.qkv_x.weight.dtype == torch.bfloat16
    x, y, mask = inputs(ref.cfg, 1, 2, 4, 6, [5])
    with torch.no_grad():
        a, b = ref(x, torch.tensor([0.5]), y, mask), m(x, torch.tensor([0.5]), y, mask)
    assert b.dtype == torch.float32 and ((a - b).norm() / a.norm()) < 0.05


@pytest.mark.parametrize("prefix", ["", "model.diffusion_model."])
def test_comfyui_fp8_scaled_dit(tmp_path, prefix):
    """ComfyUI's mochi_preview_fp8_scaled.safetensors layout: fp8 block weights with fp32 scales, the marker; read
    dequantized (in fp32, then cast), the config off the same header."""
    ref = tiny_dit()
    tensors, want = fp8_scaled(ref.state_dict(), prefix)
    f = tmp_path / "mochi_preview_fp8_scaled.safetensors"
    save_file(tensors, str(f))
    assert not torch.equal(want["blocks.0.attn.qkv_x.weight"], ref.state_dict()["blocks.0.attn.qkv_x.weight"])
    got = M.load_dit(f).state_dict()
    assert set(got) == set(want) and all(torch.equal(got[k], want[k]) for k in want)
    cfg, sd = M.read_dit_checkpoint(f, torch.bfloat16)
    assert torch.equal(sd["blocks.1.mlp_x.w2.weight"], want["blocks.1.mlp_x.w2.weight"].to(torch.bfloat16))
    assert sd["pos_frequencies"].dtype == torch.float32  # kept fp32, as from the plain file
    assert cfg == M.read_dit_config(f) and cfg.depth == ref.cfg.depth
    M.check_args(M.Args(mode="bench", dit_path=str(f)))


def test_dit_wrong_file_is_named(tmp_path):
    sd = tiny_dit().state_dict()
    sd.pop("blocks.1.mlp_y.w1.weight")
    save(sd, tmp_path / M.DIT_FILE)
    with pytest.raises(KeyError, match="missing: \\[blocks.1.mlp_y.w1.weight\\]"):
        M.load_dit(tmp_path)
    save({"blocks.0.self_attn.q.weight": torch.zeros(2, 2)}, tmp_path / "wan.safetensors")
    with pytest.raises(KeyError, match="not a Mochi DiT"):
        M.load_dit(tmp_path / "wan.safetensors")


def test_vae_round_trip_and_config_from_files(tmp_path):
    ref = tiny_vae()
    save(ref.encoder.state_dict(), tmp_path / M.ENCODER_FILE)
    save(ref.decoder.state_dict(), tmp_path / M.DECODER_FILE)
    vae = M.load_vae(tmp_path)
    assert vae.cfg == M.VAE_PRESETS["tiny"]
    video = torch.rand(1, 3, 7, 16, 16, generator=torch.Generator().manual_seed(0)) * 2 - 1
    with torch.no_grad():
        z = vae.encode(video)
        assert torch.equal(z, ref.encode(video))
        assert torch.equal(vae.decode(z), ref.decode(z))
    dec_only = M.load_vae(tmp_path, encoder=False)
    assert dec_only.encoder is None and dec_only.decoder is not None
    (tmp_path / M.ENCODER_FILE).unlink()
    with pytest.raises(FileNotFoundError, match="encoder.safetensors"):
        M.load_vae(tmp_path)
