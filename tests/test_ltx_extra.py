"""train_ltx.py, the rest of issue 8: --compile keeps the math and the keys (the toy runner of test_ltx_train.py);
a diffusers-format folder (save_pretrained) through load_dit / load_vae and as --ckpt_dir of main(); the distilled
checkpoints' sampling schedule (--sample_schedule distilled), to the model and through --mode sample in bf16."""
import json
import os

import pytest
import torch

import train_ltx as L
from tests import checks
from tests.procs import losses, script_runner
from tests.test_ltx_train import run

# ltx.md section 6.2, "2B/13B 0.9.8-distilled": pass 1 t=[1.0,0.9937,0.9875,0.9812,0.9750,0.9094,0.7250], CFG 1, STG 0
SPEC_DISTILLED = [1.0, 0.9937, 0.9875, 0.9812, 0.9750, 0.9094, 0.7250]


# slow (inductor's CPU compile): the default run keeps Wan's (--ac 2 --ac_interval 2), the same parallelize path
@pytest.mark.slow
def test_compile_and_activation_checkpointing_keep_the_math_and_the_keys(toy, tmp_path):
    """--compile 1 --ac 1 give the plain run's losses (within 1e-4) and the export has the official keys only."""
    keys = checks.check_compile_and_ac_keep_the_math(run, toy, tmp_path)
    a, b = losses(tmp_path / "plain"), losses(tmp_path / "fast")
    print("compile+ac vs plain, loss diff per step:", {s: abs(a[s] - b[s]) for s in (1, 2)})
    assert "model.diffusion_model.transformer_blocks.0.attn1.to_q.weight" in keys


# ---- a diffusers-format folder (transformer/ + vae/, as save_pretrained writes them and Lightricks/LTX-Video ships
# for 0.9.5+) through load_dit / load_vae: the same outputs as diffusers' models and as our own official layout

def _official_file(path, dit, vae):
    """dit + vae in the official single-file layout (fp32), the header config from their own configs."""
    import dataclasses

    from safetensors.torch import save_file
    sd = {L.DIT_PREFIX + k: v.contiguous() for k, v in dit.state_dict().items()}
    sd.update({L.VAE_PREFIX + k: v.contiguous() for k, v in vae.state_dict().items()})
    header = {"transformer": dataclasses.asdict(dit.cfg), "vae": dataclasses.asdict(vae.cfg)}
    save_file(sd, path, metadata={"config": json.dumps(header)})


def test_diffusers_folder_save_pretrained(tmp_path):
    from tests.test_ltx_dit import diffusers_twin as dit_twin
    from tests.test_ltx_dit import pipeline_coords, tiny_dit
    from tests.test_ltx_vae import diffusers_twin as vae_twin
    from tests.test_ltx_vae import tiny_vae
    dit = tiny_dit(seed=4, causal_temporal_positioning=False)  # a diffusers config has no causal flag: False
    vae = tiny_vae(seed=5)
    ref_dit, ref_vae = dit_twin(dit), vae_twin(vae)
    root = tmp_path / "LTX-Video-diffusers"
    ref_dit.save_pretrained(str(root / "transformer"))
    ref_vae.save_pretrained(str(root / "vae"), max_shard_size="20KB")  # shards + index.json
    assert len(list((root / "vae").glob("diffusion_pytorch_model-*.safetensors"))) > 1
    single = str(tmp_path / "ltxv-tiny.safetensors")
    _official_file(single, dit, vae)

    # the VAE: encode and the timestep-conditioned decode, at a non-square size with 2 latent frames
    ours, official = L.load_vae(str(root)), L.load_vae(single)
    assert ours.cfg == official.cfg
    g = torch.Generator().manual_seed(1)
    video = torch.rand(2, 3, 9, 64, 96, generator=g) * 2 - 1
    with torch.no_grad():
        z = ours.encode(video)
        mean, std = ref_vae.latents_mean.view(1, -1, 1, 1, 1), ref_vae.latents_std.view(1, -1, 1, 1, 1)
        z_ref = (ref_vae.encode(video).latent_dist.mode() - mean) / std
        out = ours.decode(z, timestep=0.05, clamp=False)
        out_ref = ref_vae.decode(z * std + mean, temb=torch.tensor([0.05, 0.05]), return_dict=False)[0]
        err_enc, err_dec = (z - z_ref).abs().max().item(), (out - out_ref).abs().max().item()
        assert torch.equal(z, official.encode(video))
        assert torch.equal(out, official.decode(z, timestep=0.05, clamp=False))
    print(f"diffusers VAE folder: encode err {err_enc:.2e}, decode err {err_dec:.2e}")
    assert err_enc <= 1e-5 and err_dec <= 1e-5, (err_enc, err_dec)

    # the DiT: per-token timesteps, unequal text masks, a non-square grid
    ours, official = L.load_dit(str(root)), L.load_dit(single)
    assert ours.cfg == official.cfg
    B, f, h, w, Lt = 2, 3, 4, 6, 7
    x = torch.randn(B, 8, f, h, w, generator=g)
    t = torch.rand(B, f * h * w, generator=g) * 1000
    ctx = torch.randn(B, Lt, 12, generator=g)
    mask = torch.ones(B, Lt)
    mask[0, 5:], mask[1, 2:] = 0, 0
    with torch.no_grad():
        v = ours(x, t, ctx, mask, frame_rate=24.0)
        coords = pipeline_coords(B, f, h, w, 24.0, False)
        v_ref = ref_dit(x.flatten(2).transpose(1, 2), ctx, t, mask, video_coords=coords,
                        return_dict=False)[0].transpose(1, 2).reshape(v.shape)
        assert torch.equal(v, official(x, t, ctx, mask, frame_rate=24.0))
    err = (v - v_ref).abs().max().item()
    print(f"diffusers DiT folder: err {err:.2e}")
    assert err <= 1e-5 and v.abs().mean() > 0.1, err


# ---- distilled sampling

def test_distilled_schedule_is_the_specs_and_the_model_sees_it():
    assert L.sampling_sigmas(40, "distilled", 5000, "SD3", 0.1).tolist() == torch.tensor(SPEC_DISTILLED).tolist()
    seen = []

    class Spy(torch.nn.Module):  # records the timesteps and the batch (guidance would double it)
        transformer_blocks = []

        def forward(self, x, t, ctx, mask, frame_rate, keyframe=None):
            seen.append((t.shape[0], t.unique().tolist()))
            return torch.zeros_like(x)
    x = torch.randn(1, 8, 2, 1, 1)
    ctx = (torch.randn(1, 3, 4), torch.ones(1, 3))
    L.sample_euler(Spy(), x, ctx, ctx, guidance=1.0, stg=None, sampler="distilled")
    assert [b for b, _ in seen] == [1] * 7  # one forward a step: no CFG, no STG batch
    assert all(len(u) == 1 for _, u in seen)  # one timestep for every token
    want = torch.tensor([t * 1000 for t in torch.tensor(SPEC_DISTILLED).tolist()])  # 1000 t, in fp32
    assert torch.equal(torch.tensor([u[0] for _, u in seen]), want)


def _diffusers_folder(root):
    """Lightricks/LTX-Video's diffusers layout: transformer/ + vae/ (save_pretrained) + text_encoder/ + tokenizer/,
    from test_ltx_main's tiny official file (then removed, so nothing else can be read)."""
    from tests.test_ltx_dit import diffusers_twin as dit_twin
    from tests.test_ltx_main import make_official
    from tests.test_ltx_vae import diffusers_twin as vae_twin
    make_official(root)
    single = os.path.join(root, "ltxv-tiny.safetensors")
    dit_twin(L.load_dit(single)).save_pretrained(os.path.join(root, "transformer"))
    vae_twin(L.load_vae(single)).save_pretrained(os.path.join(root, "vae"))
    os.remove(single)


ltx = script_runner("train_ltx.py")


def test_diffusers_folder_as_ckpt_dir_and_distilled_sampling_in_bf16(tmp_path_factory, tmp_path):
    """--ckpt_dir a diffusers folder: cache (its VAE and T5) -> 1 training step -> export (the official layout, the
    VAE under its official names) -> --mode sample --sample_schedule distilled in bf16 through the diffusers DiT."""
    f = checks.official_folder(tmp_path_factory, "LTX-Video-diffusers", _diffusers_folder)
    common = ["--ckpt_dir", f["ckpt"], "--data", f["data"], "--cache_dir", f["cache"], "--height", "32", "--width",
              "32", "--frames", "9", "--fps", "16", "--global_batch", "2", "--micro_batch", "2", "--dtype", "bf16",
              "--warmup_steps", "1", "--log_every", "1"]
    ltx(*common, "--out_dir", str(tmp_path / "full"), "--max_steps", "1")
    exported = str(tmp_path / "full" / "model.safetensors")
    vae, base = L.load_vae(exported), L.load_vae(f["ckpt"])
    assert vae.cfg == base.cfg
    assert all(torch.equal(a, b) for a, b in zip(vae.state_dict().values(), base.state_dict().values()))

    p = ltx("--mode", "sample", *common, "--out_dir", str(tmp_path / "s"), "--sample_prompts",
            "a blue square moving up", "--sample_schedule", "distilled")
    line = next(x for x in p.stdout.splitlines() if x.startswith("sample schedule: "))
    used = json.loads(line[len("sample schedule: "):])
    n = len(SPEC_DISTILLED)
    assert used == {"pass": 1, "size": [32, 32], "timesteps": SPEC_DISTILLED, "guidance": [1.0] * n, "stg": [None] * n,
                    "stg_blocks": [], "cfg_star": False, "stochastic": False}, used
    from data.video import read_clip
    v = read_clip(str(tmp_path / "s" / "samples" / "step_00000000_0.mp4"), 0, 9, 16, (32, 32))
    assert v.shape == (3, 9, 32, 32) and v.float().std() > 0


def test_stochastic_sampling_renoises_between_steps():
    """x0 = x - t v re-noised to the next t with fresh (seeded) noise; the last step lands on x0; without renoise
    it is the plain Euler step."""
    class Lin(torch.nn.Module):  # v = x / 2: a velocity that depends on x, so the two samplers part
        transformer_blocks = []

        def forward(self, x, t, ctx, mask, frame_rate, keyframe=None):
            return x / 2
    x = torch.randn(1, 8, 2, 1, 1, generator=torch.Generator().manual_seed(0))
    ctx = (torch.randn(1, 3, 4), torch.ones(1, 3))
    kw = dict(guidance=1.0, stg=None, sampler="distilled")
    det = L.sample_euler(Lin(), x, ctx, **kw)
    a = L.sample_euler(Lin(), x, ctx, renoise=torch.Generator().manual_seed(1), **kw)
    b = L.sample_euler(Lin(), x, ctx, renoise=torch.Generator().manual_seed(1), **kw)
    assert torch.equal(a, b) and not torch.allclose(a, det)
    # by hand: the same steps
    g, y, ts = torch.Generator().manual_seed(1), x.clone(), SPEC_DISTILLED + [0.0]
    for t, tn in zip(ts[:-1], ts[1:]):
        x0 = y - t * (y / 2)
        y = (1 - tn) * x0 + tn * torch.randn(y.shape, generator=g) if tn > 0 else x0
    assert torch.allclose(a, y, atol=1e-6)
