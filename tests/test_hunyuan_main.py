"""The real (non-toy) path of train_hunyuan.py's main(), in --dtype bf16 on CPU, through a tiny test-made folder in
upstream's ckpts/ layout (hunyuan-video-t2v-720p/transformers/mp_rank_00_model_states.pt, .../vae/pytorch_model.pt +
config.json, text_encoder/, text_encoder_2/): the VAE and both text encoders encode into the cache (--mode cache),
a full fine-tune trains and resumes, a LoRA trains on its export, --mode sample decodes through the VAE with and
without the LoRA, the LoRA starts a run (--init_lora) and merges into the base (--base_lora), bench runs. Plus the
flag checks: one clear line and exit code 2, before any work."""
import json
import os

import pytest
import torch

import train_hunyuan as H
from common.lora_file import write_lora
from tests import checks
from tests.procs import script_runner
from tests.test_hunyuan_dit import tiny_dit
from tests.test_hunyuan_text import make_clip_folder, make_llama_folder
from tests.test_hunyuan_vae import tiny_vae

# 32x32 pixels, 5 frames at 24 fps -> latents 16 x 2 x 4 x 4 -> 8 video tokens
CLIP = ["--height", "32", "--width", "32", "--frames", "5", "--fps", "24", "--log_every", "1", "--warmup_steps", "1",
        "--global_batch", "4", "--micro_batch", "2", "--dtype", "bf16", "--lr", "1e-3"]


def make_official_folder(root):
    from data.toy import BACKGROUNDS, COLORS, DIRECTIONS, SHAPES
    words = [" ".join([*COLORS, *SHAPES, *DIRECTIONS, *BACKGROUNDS, "a", "moving", "on", "background"])]
    model = os.path.join(root, "hunyuan-video-t2v-720p")
    os.makedirs(os.path.join(model, "transformers"))
    os.makedirs(os.path.join(model, "vae"))
    dit = tiny_dit()  # text widths 32 (the Llama) and 24 (CLIP)
    torch.save({"module": dit.state_dict()}, os.path.join(model, "transformers", H.DIT_FILE))
    vae = tiny_vae()
    torch.save(vae.state_dict(), os.path.join(model, "vae", H.VAE_FILE))
    c = vae.cfg
    with open(os.path.join(model, "vae", "config.json"), "w") as f:
        json.dump(dict(_class_name="AutoencoderKLCausal3D", block_out_channels=list(c.block_out_channels),
                       layers_per_block=c.layers_per_block, latent_channels=16, norm_num_groups=c.norm_num_groups,
                       scaling_factor=c.scaling_factor), f)
    make_llama_folder(os.path.join(root, "text_encoder"), layers=3, hidden=32, texts=words)
    make_clip_folder(os.path.join(root, "text_encoder_2"), hidden=24, texts=words)
    return root


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    return checks.official_folder(tmp_path_factory, "ckpts", make_official_folder)


hy = script_runner("train_hunyuan.py")


def test_cache_train_resume_sample_export_lora_in_bf16(folder, tmp_path):
    common = ["--ckpt_dir", folder["ckpt"], "--data", folder["data"], "--cache_dir", folder["cache"], *CLIP]
    t, meta = checks.check_cache(hy, common, folder["cache"])
    # 16 latent channels, 2 latent frames of 4x4; the caption's valid Llama tokens (its words + <|eot_id|>), CLIP pooled
    assert t["latents"].shape == (16, 2, 4, 4) and t["text.pooled"].shape == (24,)
    assert t["text.states"].shape[1] == 32 and t["text.states"].shape[0] == len(meta["caption"].split()) + 1

    # full fine-tune, 4 steps with a checkpoint at 2; then the same run to 6 with --resume 1
    out = tmp_path / "full"
    checks.check_train_from_cache(hy, common, out, "--caption_dropout", "0.5")
    sd = H.read_dit_checkpoint(str(out / "model.safetensors"))[1]
    assert sd["double_blocks.0.img_attn_qkv.weight"].dtype == torch.bfloat16 and "guidance_in.mlp.0.weight" in sd
    checks.check_resume_to_6(hy, common, out, 5, "--caption_dropout", "0.5")  # step-4 sample: 5 frames of 32x32

    # LoRA on the fine-tuned DiT, bf16 base
    lora = tmp_path / "lora"
    lsd = checks.check_lora_on_export(hy, common, lora, str(out / "model.safetensors"), H.read_lora)
    assert all(k.startswith(("double_blocks.", "single_blocks.")) for k in lsd)

    # --mode sample with and without the LoRA: the LoRA must change the video
    s = checks.sample_flags(["--ckpt_dir", folder["ckpt"]], str(out / "model.safetensors"), folder["cache"], 5)
    checks.check_lora_changes_the_sample(hy, s, tmp_path, lora / "lora.safetensors", 5, 24)

    # --init_lora / --base_lora with that LoRA, on the same base
    checks.check_init_and_base_lora(hy, [*common, "--dit_path", str(out / "model.safetensors")], tmp_path,
                                    lora / "lora.safetensors", H.read_lora)


def test_bench_in_bf16(folder):
    checks.check_bench_in_bf16(hy, folder["ckpt"], CLIP, 2 * 8)


@pytest.mark.parametrize("flags, says", [
    (["--height", "30"], "--height 30 --width 32: both must be positive multiples of 16"),
    (["--lora_rank", "-1"], "--lora_rank -1 must be >= 0"),
    (["--preset", "7B"], "--preset '7B': expected one of 13B, tiny, toy"),
    (["--preset", "13B", "--ckpt_dir", ""], "--mode train needs --ckpt_dir"),
    (["--frames", "6"], "--frames 6: must be 1 + 4k"),
    (["--global_batch", "3"], "--global_batch 3 must be a multiple of --micro_batch x processes = 2 x 1"),
    (["--sp", "0"], "--sp 0 must be >= 1"),
    (["--sp", "2"], "--sp 2 must divide the number of processes (1)"),
    (["--timestep_sampling", "shift"], "--timestep_sampling shift with --shift 1 is plain uniform: give --shift N "
     "(musubi's `shift` is --timestep_sampling logit_normal --shift N here)"),
    (["--mode", "sample", "--sample_prompts", "a", "--init_lora", "LORA"], "--init_lora starts a training run's "
     "adapter from a file; to sample with one use --lora"),
    (["--init_lora", "LORA", "--lora_rank", "8"], "--init_lora LORA: rank 4, alpha 4.0, targets img_attn_proj,"),
    (["--init_lora", "LORA", "--lora_alpha", "8"], "leave --lora_rank, --lora_alpha and --lora_targets out or give "
     "the file's"),
    (["--base_lora", "x=LORA"], "--base_lora x=LORA: x= names a part of the model: this model has no parts"),
    (["--base_lora", "LORA,nowhere.safetensors:0.5"], "--base_lora nowhere.safetensors: no such file"),
    (["--mode", "bench", "--base_lora", "LORA"], "--base_lora merges a LoRA into the base of a training or sampling "
     "run"),
])
def test_user_errors_are_one_line_before_any_work(folder, tmp_path, flags, says):
    base = ["--ckpt_dir", folder["ckpt"], "--data", folder["data"], "--out_dir", str(tmp_path / "o"), *CLIP]
    lora = str(tmp_path / "lora.safetensors")  # LORA: a rank-4 LoRA (alpha 4) that fits the folder's DiT
    write_lora(lora, checks.random_lora(H.add_lora(tiny_dit(), 4, 4.0)), 4.0)
    checks.check_user_error(hy, [*base, *[f.replace("LORA", lora) for f in flags]], says.replace("LORA", lora),
                            tmp_path / "o")


def test_shift_sampling_with_a_shift_passes_the_checks():
    from common.args import parse
    H.check_args(parse(H.Args, ["--mode", "bench", "--preset", "tiny", "--timestep_sampling", "shift", "--shift", "3"]))


def test_other_layouts_are_one_line_before_any_work(tmp_path):
    """A diffusers-format DiT (--dit_path) or LoRA (--lora) stops in check_args, before the process group, the
    cache or any weights: one line naming the layout, exit 2, no run folder."""
    from safetensors.torch import save_file
    dit = tiny_dit()
    sd = dit.state_dict()
    diffusers = {"x_embedder.proj.weight": sd["img_in.proj.weight"],
                 "transformer_blocks.0.attn.to_q.weight": sd["double_blocks.0.img_attn_qkv.weight"][:64]}
    save_file({k: v.contiguous() for k, v in diffusers.items()}, str(tmp_path / "diffusers.safetensors"))
    out = tmp_path / "o"
    checks.check_user_error(hy, ["--mode", "bench", "--dit_path", tmp_path / "diffusers.safetensors", "--out_dir",
                                 out], "diffusers-format HunyuanVideo transformer", out)
    save_file({k: v.contiguous() for k, v in sd.items()}, str(tmp_path / "dit.safetensors"))
    save_file({"transformer.transformer_blocks.0.attn.to_q.lora_A.weight": torch.zeros(4, 64),
               "transformer.transformer_blocks.0.attn.to_q.lora_B.weight": torch.zeros(64, 4)},
              str(tmp_path / "lora.safetensors"))
    checks.check_user_error(hy, ["--mode", "sample", "--encoders", "toy", "--dit_path", tmp_path / "dit.safetensors",
                                 "--lora", tmp_path / "lora.safetensors", "--sample_prompts", "a", "--out_dir", out],
                            "diffusers-format LoRA (transformer_blocks.N.attn.to_q...): not supported", out)


def test_one_frame_samples_use_the_image_template(folder, tmp_path):
    """Official inference encodes the prompt and the negative prompt of a 1-frame video with the image template
    (hyvideo/inference.py:662, data_type "image"), of a longer one with the video template. The empty prompt of
    caption dropout is training's and stays on the video template; with video samples the text cache is the file
    it has always been (the key over [texts, settings])."""
    import hashlib
    prompt = "a blue square moving up"
    te = H.load_text_encoders(folder["ckpt"])

    def want(text, template):
        states, mask, pooled = H.TextEncoders(te.llm, te.llm_tok, te.clip, te.clip_tok, template).encode([text])
        return states[0, :int(mask.sum())], pooled[0]

    def sample(frames):
        cache = tmp_path / f"cache{frames}"
        hy("--mode", "sample", "--ckpt_dir", folder["ckpt"], "--sample_prompts", prompt, "--sample_steps", "1",
           "--sample_guidance", "2", "--caption_dropout", "0.5", "--height", "32", "--width", "32", "--frames",
           str(frames), "--dtype", "bf16", "--cache_dir", str(cache), "--out_dir", str(tmp_path / f"s{frames}"))
        assert (tmp_path / f"s{frames}" / "samples" / "step_00000000_0.mp4").exists()
        return {f.name: torch.load(f) for f in cache.glob("texts-*.pt")}

    def check(cached, text, template):
        states, pooled = want(text, template)
        assert cached[text]["states"].shape == states.shape
        assert torch.allclose(cached[text]["states"], states, atol=1e-5)
        assert torch.allclose(cached[text]["pooled"], pooled, atol=1e-5)

    # 5 frames: one file, everything on the video template, under the key it always had
    settings = H.encoder_settings(H.Args(ckpt_dir=folder["ckpt"]), None, torch.device("cpu"))
    key = hashlib.sha1(json.dumps([[prompt, H.NEGATIVE_PROMPT, ""], settings]).encode()).hexdigest()[:16]
    files = sample(5)
    assert list(files) == [f"texts-{key}.pt"]
    for text in (prompt, H.NEGATIVE_PROMPT, ""):
        check(files[f"texts-{key}.pt"], text, H.PROMPT_TEMPLATE_VIDEO)

    # 1 frame: the sample texts on the image template in their own file; the empty prompt still on the video one
    files = sample(1)
    assert len(files) == 2, list(files)
    image = next(f for f in files.values() if prompt in f)
    video = next(f for f in files.values() if prompt not in f)
    assert sorted(image) == sorted([prompt, H.NEGATIVE_PROMPT]) and list(video) == [""]
    check(image, prompt, H.PROMPT_TEMPLATE_IMAGE)
    check(image, H.NEGATIVE_PROMPT, H.PROMPT_TEMPLATE_IMAGE)
    check(video, "", H.PROMPT_TEMPLATE_VIDEO)
    states_v, _ = want(prompt, H.PROMPT_TEMPLATE_VIDEO)  # the templates differ in what the prompt's tokens see
    assert not torch.allclose(image[prompt]["states"], states_v, atol=1e-3)
