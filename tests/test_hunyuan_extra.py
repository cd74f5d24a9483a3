"""The VAE's temporal tiling (issue 9): against diffusers' AutoencoderKLHunyuanVideo frame-wise path, which tiles time
as upstream's temporal_tiled_encode / _decode do (same tile + 1 frame, dropped first frame, linear blend, crop), at
small tiles on the tiny VAE; and with tiling off, the exact untiled path. --vae_tiling (on by default, as upstream's
--vae-tiling): tiles exactly for clips larger than a tile, through build_encoders."""
import json
import os

import pytest
import torch

import train_hunyuan as H
from tests.test_hunyuan_vae import diffusers_twin, tiny_vae


def framewise_twin(model, frames, stride, spatial=None):
    """diffusers' VAE with our weights, tiling time in chunks of `frames` every `stride` (its frame-wise path), and
    space as well when spatial = (tile, stride) is given."""
    ref = diffusers_twin(model)
    ref.use_framewise_encoding = ref.use_framewise_decoding = True
    ref.tile_sample_min_num_frames, ref.tile_sample_stride_num_frames = frames, stride
    if spatial:
        ref.enable_tiling(tile_sample_min_height=spatial[0], tile_sample_min_width=spatial[0],
                          tile_sample_stride_height=spatial[1], tile_sample_stride_width=spatial[1])
    return ref


@pytest.mark.parametrize("frames,stride,T", [(16, 12, 33), (8, 4, 21)])
def test_temporal_tiling_matches_diffusers(frames, stride, T):
    # (16, 12) is diffusers' default; upstream's (64, 48) has the same shape, four times longer
    model = tiny_vae()
    ref = framewise_twin(model, frames, stride)
    model.temporal_tiling = (frames, stride)
    g = torch.Generator().manual_seed(4)
    video = torch.rand(1, 3, T, 16, 16, generator=g) * 2 - 1
    with torch.no_grad():
        lat = model.encode(video)
        want = ref.encode(video).latent_dist.mean * H.VAE_SCALE
        assert lat.shape == want.shape == (1, 16, (T - 1) // 4 + 1, 2, 2)
        err = (lat - want).abs().max().item()
        assert err <= 1e-5, err
        z = torch.randn(lat.shape, generator=g)
        out = model.decode(z)
        ref_out = ref.decode(z / H.VAE_SCALE).sample.clamp(-1, 1)
        assert out.shape == (1, 3, T, 16, 16)
        err = (out - ref_out).abs().max().item()
        assert err <= 1e-5, err
        model.temporal_tiling = None  # tiled is not untiled: the GroupNorms see one chunk at a time
        assert (model.encode(video) - lat).abs().max() > 1e-4
        assert (model.decode(z) - out).abs().max() > 1e-4


def test_temporal_and_spatial_tiling_together_match_diffusers():
    model = tiny_vae()
    ref = framewise_twin(model, 8, 4, spatial=(32, 24))
    model.tiling, model.temporal_tiling = (32, 24), (8, 4)
    g = torch.Generator().manual_seed(5)
    video = torch.rand(1, 3, 13, 40, 32, generator=g) * 2 - 1
    with torch.no_grad():
        lat = model.encode(video)
        err = (lat - ref.encode(video).latent_dist.mean * H.VAE_SCALE).abs().max().item()
        assert lat.shape == (1, 16, 4, 5, 4) and err <= 1e-5, err
        z = torch.randn(lat.shape, generator=g)
        err = (model.decode(z) - ref.decode(z / H.VAE_SCALE).sample.clamp(-1, 1)).abs().max().item()
        assert err <= 1e-5, err


def test_tiling_off_is_the_untiled_path():
    model = tiny_vae()
    g = torch.Generator().manual_seed(6)
    video = torch.rand(1, 3, 21, 16, 16, generator=g) * 2 - 1
    z = torch.randn(1, 16, 6, 2, 2, generator=g)
    with torch.no_grad():
        plain_lat = model.quant_conv(model.encoder(video)).chunk(2, dim=1)[0] * H.VAE_SCALE
        plain_out = model.decoder(model.post_quant_conv(z / H.VAE_SCALE)).clamp(-1, 1)
        assert model.tiling is None and model.temporal_tiling is None  # off on a bare HunyuanVAE
        assert torch.equal(model.encode(video), plain_lat) and torch.equal(model.decode(z), plain_out)
        model.temporal_tiling = (64, 48)  # on, but the clip is shorter than a tile: still the untiled path
        assert torch.equal(model.encode(video), plain_lat) and torch.equal(model.decode(z), plain_out)


def test_temporal_tiles_line_up():
    # with fn the identity (1 + n frames -> 1 + n), the blends mix equal frames: the tiling must give x back, which
    # checks the tile starts, the dropped first frames and the crops (21 frames: tiles at 0, 6, 12, 18)
    x = torch.randn(1, 2, 21, 3, 3)
    assert torch.allclose(H._tiled_time(lambda v: v.clone(), x, 8, 6, 1), x, atol=1e-6)
    assert H.VAE_TEMPORAL_TILING == (64, 48)  # upstream's tile_sample_min_tsize 64, overlap factor 0.25


def test_vae_tiling_flag_sets_both_and_changes_the_cache_key():
    # --vae_tiling 1 (the default) is upstream's enable_tiling (space and time); a cache encoded the other way is not
    # reused
    from common.args import parse
    cfg, cpu = H.DIT_PRESETS["13B"], torch.device("cpu")
    on = H.encoder_settings(parse(H.Args, ["--vae_tiling", "1"]), cfg, cpu)["vae_tiling"]
    off = H.encoder_settings(parse(H.Args, ["--vae_tiling", "0"]), cfg, cpu)["vae_tiling"]
    assert on == (H.VAE_TILING, H.VAE_TEMPORAL_TILING) and off is False
    assert H.encoder_settings(parse(H.Args, []), cfg, cpu)["vae_tiling"] == on


def test_tiles_exactly_above_upstreams_thresholds():
    # upstream's encode: temporal if T > 64, spatial if H or W > 256; _decode: t > 16, h or w > 32 (its
    # tile_sample_min_tsize 64, tile_sample_min_size 256, tile_latent_min_tsize 16, tile_latent_min_size 32)
    vae = H.HunyuanVAE.__new__(H.HunyuanVAE)  # the decision reads only the two settings
    vae.tiling, vae.temporal_tiling = H.VAE_TILING, H.VAE_TEMPORAL_TILING
    for (T, h, w), want in [((61, 256, 256), (False, False)), ((65, 256, 256), (False, True)),
                            ((61, 264, 256), (True, False)), ((61, 256, 264), (True, False)),
                            ((129, 544, 960), (True, True)), ((1, 256, 248), (False, False))]:
        assert vae.tiles((1, 3, T, h, w)) == want, (T, h, w)
        assert vae.tiles((1, 16, 1 + (T - 1) // 4, h // 8, w // 8), latent=True) == want, (T, h, w)  # its latents
    vae.tiling = vae.temporal_tiling = None  # --vae_tiling 0: never
    assert vae.tiles((1, 3, 129, 544, 960)) == (False, False)
    assert vae.tiles((1, 16, 33, 68, 120), latent=True) == (False, False)


def write_vae_folder(root):
    """upstream's ckpts/ layout around the tiny VAE, all that build_encoders(text=False) reads (the DiT file is an
    empty placeholder: official_paths only looks for it)."""
    model = os.path.join(root, "hunyuan-video-t2v-720p")
    os.makedirs(os.path.join(model, "transformers"))
    os.makedirs(os.path.join(model, "vae"))
    open(os.path.join(model, "transformers", H.DIT_FILE), "w").close()
    vae = tiny_vae()
    torch.save(vae.state_dict(), os.path.join(model, "vae", H.VAE_FILE))
    c = vae.cfg
    with open(os.path.join(model, "vae", "config.json"), "w") as f:
        json.dump(dict(block_out_channels=list(c.block_out_channels), layers_per_block=c.layers_per_block,
                       latent_channels=16, norm_num_groups=c.norm_num_groups), f)
    return vae


@pytest.mark.parametrize("flag", [[], ["--vae_tiling", "0"]])
def test_build_encoders_tiles_only_clips_above_a_tile(tmp_path, monkeypatch, flag):
    """Through build_encoders (what --mode cache and the samples run), at small tiles (32 px every 24, 8 frames every
    4: the thresholds scale with them): a clip within one tile goes through whole and equals the untiled VAE bit for
    bit; a larger one runs the tiled paths (counted) and equals the VAE tiled by hand; with --vae_tiling 0 it goes
    through whole too. (The default is --vae_tiling 1: test_vae_tiling_flag_sets_both_and_changes_the_cache_key.)"""
    from common.args import parse
    monkeypatch.setattr(H, "VAE_TILING", (32, 24))
    monkeypatch.setattr(H, "VAE_TEMPORAL_TILING", (8, 4))
    calls = {"space": 0, "time": 0}

    def counted(kind, fn):
        def run(*a):
            calls[kind] += 1
            return fn(*a)
        return run
    monkeypatch.setattr(H, "_tiled", counted("space", H._tiled))
    monkeypatch.setattr(H, "_tiled_time", counted("time", H._tiled_time))
    ref = write_vae_folder(str(tmp_path))
    args = parse(H.Args, ["--ckpt_dir", str(tmp_path), *flag])
    enc, dec, _ = H.build_encoders(args, H.DIT_PRESETS["tiny"], torch.device("cpu"), text=False)
    g = torch.Generator().manual_seed(7)
    small, large = (torch.rand(1, 3, T, h, w, generator=g) * 2 - 1 for T, h, w in ((5, 32, 24), (9, 40, 24)))
    with torch.no_grad():
        z = enc(small)
        assert torch.equal(z, ref.encode(small)) and torch.equal(dec(z), ref.decode(z))  # whole, exact
        assert calls == {"space": 0, "time": 0}
        z = enc(large)
        if flag:  # --vae_tiling 0
            assert calls == {"space": 0, "time": 0} and torch.equal(z, ref.encode(large))
            return
        # one temporal tiling, each of its chunks (frames 0, 4, 8 of 9) tiled in space
        assert calls == {"space": 3, "time": 1}, calls
        dec(z)  # likewise: latent frames 0, 1, 2 of 3, a chunk of 2 every 1
        assert calls == {"space": 6, "time": 2}, calls
        ref.tiling, ref.temporal_tiling = (32, 24), (8, 4)
        assert torch.equal(z, ref.encode(large))
