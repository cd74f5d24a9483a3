"""The real (non-toy) path of train_ltx.py's main(), in --dtype bf16 on CPU, through a tiny test-made file in the
official single-file layout (DiT + VAE + header config) and a T5 Hugging Face folder: the VAE and T5 encode into the
cache (--mode cache), a full fine-tune trains, resumes and exports the official layout, a LoRA trains on it,
--mode sample decodes through the VAE with and without the LoRA and with an image as the first frame, bench runs.
Plus the flag checks a new user meets first: one clear line and exit code 2, before any work."""
import json
import os

import pytest
import torch
from safetensors.torch import save_file

import train_ltx as L
from tests import checks
from tests.procs import script_runner
from tests.test_ltx_dit import randomise
from tests.test_ltx_t5 import tiny_t5
from tests.test_ltx_vae import TINY, tiny_vae

# 32x32 pixels, 9 frames at 16 fps -> latents 8 x 2 x 1 x 1
CLIP = ["--height", "32", "--width", "32", "--frames", "9", "--fps", "16", "--log_every", "1", "--warmup_steps", "1",
        "--global_batch", "4", "--micro_batch", "2", "--dtype", "bf16", "--lr", "1e-3", "--sample_stg_blocks", "1"]
TOY_WORDS = "a red green blue yellow circle square triangle moving left right up down on gray black white background"


def make_official(root, seed=0):
    """<root>/ltxv-tiny.safetensors (DiT under model.diffusion_model., VAE under vae., header config, bf16) and
    <root>/text_encoder/ + <root>/tokenizer/spiece.model (the Lightricks/LTX-Video folder layout)."""
    import sentencepiece as spm
    from transformers import T5Config, T5EncoderModel
    os.makedirs(os.path.join(root, "tokenizer"), exist_ok=True)
    corpus = os.path.join(root, "corpus.txt")
    words = TOY_WORDS.split()
    with open(corpus, "w") as f:
        for i in range(200):
            f.write(" ".join(words[(i * 5 + j) % len(words)] for j in range(8)) + "\n")
    spm.SentencePieceTrainer.train(input=corpus, model_prefix=os.path.join(root, "tokenizer", "spiece"), vocab_size=60,
                                   pad_id=0, eos_id=1, unk_id=2, bos_id=-1, hard_vocab_limit=False, minloglevel=2)
    t5 = tiny_t5(seed)
    c = t5.cfg
    ref = T5EncoderModel(T5Config(vocab_size=c.vocab_size, d_model=c.d_model, d_kv=c.d_kv, d_ff=c.d_ff,
                                  num_layers=c.num_layers, num_heads=c.num_heads, feed_forward_proj="gated-gelu"))
    ref.load_state_dict({**t5.state_dict(), "encoder.embed_tokens.weight": t5.state_dict()["shared.weight"]})
    ref.save_pretrained(os.path.join(root, "text_encoder"))
    head = dict(num_layers=2, num_attention_heads=2, attention_head_dim=16, cross_attention_dim=32,
                caption_channels=c.d_model, in_channels=8, out_channels=8, causal_temporal_positioning=True,
                positional_embedding_type="rope", adaptive_norm="single_scale_shift", qk_norm="rms_norm")
    torch.manual_seed(seed)
    dit = randomise(L.Transformer3DModel(L.dit_config_from(head)), seed + 1)
    vae = tiny_vae(seed + 2)
    sd = {L.DIT_PREFIX + k: v.to(torch.bfloat16) for k, v in dit.state_dict().items()}
    sd.update({L.VAE_PREFIX + k: v.to(torch.bfloat16) for k, v in vae.state_dict().items()})
    vae_head = dict(_class_name="CausalVideoAutoencoder", dims=3, norm_layer="pixel_norm", latent_log_var="uniform",
                    use_quant_conv=False, causal_decoder=False, timestep_conditioning=True, **TINY)
    meta = {"config": json.dumps({"transformer": head, "vae": vae_head,
                                  "scheduler": {"sampler": "LinearQuadratic", "shifting": None}})}
    save_file({k: v.contiguous() for k, v in sd.items()}, os.path.join(root, "ltxv-tiny.safetensors"), metadata=meta)
    return root


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    return checks.official_folder(tmp_path_factory, "LTX-Video", make_official)


ltx = script_runner("train_ltx.py")


def test_cache_train_resume_sample_export_lora_in_bf16(folder, tmp_path):
    common = ["--ckpt_dir", folder["ckpt"], "--ckpt_file", "ltxv-tiny.safetensors", "--data", folder["data"],
              "--cache_dir", folder["cache"], "--first_frame_p", "0.5", "--last_frame_p", "0.5", "--keyframe_p", "0.3",
              "--prefix_p", "0.3", *CLIP]
    t, meta = checks.check_cache(ltx, common, folder["cache"])
    assert t["latents"].shape == (8, 2, 1, 1) and t["text"].shape[1] == 32 and 2 <= t["text"].shape[0] <= 40
    # --last_frame_p: the clip's last frame encoded alone by the VAE (an image latent), beside the clip's latents
    assert t["latents.last"].shape == (8, 1, 1, 1) and meta["settings"]["keyframe"] == "last+frames"
    assert not torch.equal(t["latents.last"][:, 0], t["latents"][:, -1])
    # --keyframe_p: each latent-frame boundary's pixel frame alone (9 frames: frame 8, the last)
    assert t["latents.frames"].shape == (8, 1, 1, 1) and torch.equal(t["latents.frames"], t["latents.last"])

    # full fine-tune, 4 steps with a checkpoint at 2; then the same run to 6 with --resume 1
    out = tmp_path / "full"
    checks.check_train_from_cache(ltx, common, out)
    # the export is the official single file: the DiT (bf16) + the unchanged VAE + the header config
    exported = str(out / "model.safetensors")
    cfg = L.header_config(exported)
    assert cfg["transformer"]["num_layers"] == 2 and cfg["vae"]["encoder_blocks"] == TINY["encoder_blocks"]
    dit = L.load_dit(exported)
    assert dit.cfg.causal_temporal_positioning and dit.cfg.caption_channels == 32
    base_vae, vae = L.load_vae(os.path.join(folder["ckpt"], "ltxv-tiny.safetensors")), L.load_vae(exported)
    assert all(torch.equal(a, b) for a, b in zip(base_vae.state_dict().values(), vae.state_dict().values()))
    checks.check_resume_to_6(ltx, common, out, 9)

    # LoRA on the fine-tuned DiT, bf16 base
    lora = tmp_path / "lora"
    from common.lora_file import read_lora
    checks.check_lora_on_export(ltx, common, lora, exported, read_lora)

    # --mode sample with and without the LoRA, and image-to-video
    s = checks.sample_flags(["--ckpt_dir", folder["ckpt"], "--ckpt_file", "ltxv-tiny.safetensors"], exported,
                            folder["cache"], 9, "--fps", "16", "--sample_stg_blocks", "1")
    a, _ = checks.check_lora_changes_the_sample(ltx, s, tmp_path, lora / "lora.safetensors", 9, 16)

    # --init_lora / --base_lora with that LoRA, on the same base
    checks.check_init_and_base_lora(ltx, [*common, "--dit_path", exported], tmp_path, lora / "lora.safetensors",
                                    L.read_lora)

    # image-to-video, on the sample flags above
    clip = os.path.join(folder["data"], sorted(f for f in os.listdir(folder["data"]) if f.endswith(".mp4"))[0])
    ltx(*s, "--out_dir", str(tmp_path / "s2"), "--sample_image", clip)  # image-to-video changes it too
    from data.video import read_clip
    c = read_clip(str(tmp_path / "s2" / "samples" / "step_00000000_0.mp4"), 0, 9, 16, (32, 32))
    assert (a - c).abs().float().mean() > 0.01
    # the image as read, without the official blur + CRF 29 round trip (condition_pixels): another sample
    ltx(*s, "--out_dir", str(tmp_path / "s2raw"), "--sample_image", clip, "--sample_image_crf", "0")
    raw = read_clip(str(tmp_path / "s2raw" / "samples" / "step_00000000_0.mp4"), 0, 9, 16, (32, 32))
    assert (raw - c).abs().float().mean() > 0.001
    ltx(*s, "--out_dir", str(tmp_path / "s3"), "--sample_image", clip, "--sample_last_image", clip)  # + a last frame
    d = read_clip(str(tmp_path / "s3" / "samples" / "step_00000000_0.mp4"), 0, 9, 16, (32, 32))
    assert (d - c).abs().float().mean() > 0.01
    ltx(*s, "--out_dir", str(tmp_path / "s4"), "--sample_image", clip, "--sample_last_image", clip,
        "--sample_keyframe_frame", "4")  # the keyframe at frame 4: another sample
    e = read_clip(str(tmp_path / "s4" / "samples" / "step_00000000_0.mp4"), 0, 9, 16, (32, 32))
    assert (e - d).abs().float().mean() > 0.01
    # --sample_keyframes image@frame: the same keyframe by the other flag gives the same sample; two keyframes another
    ltx(*s, "--out_dir", str(tmp_path / "s7"), "--sample_image", clip, "--sample_keyframes", f"{clip}@4")
    assert torch.equal(read_clip(str(tmp_path / "s7" / "samples" / "step_00000000_0.mp4"), 0, 9, 16, (32, 32)), e)
    ltx(*s, "--out_dir", str(tmp_path / "s8"), "--sample_image", clip, "--sample_keyframes", f"{clip}@4,{clip}@-1")
    k2 = read_clip(str(tmp_path / "s8" / "samples" / "step_00000000_0.mp4"), 0, 9, 16, (32, 32))
    assert (k2 - e).abs().float().mean() > 0.01 and (k2 - d).abs().float().mean() > 0.01
    # strengths below 1: another sample again
    ltx(*s, "--out_dir", str(tmp_path / "s9"), "--sample_image", clip, "--sample_image_strength", "0.5",
        "--sample_keyframes", f"{clip}@4:0.8,{clip}@-1")
    k3 = read_clip(str(tmp_path / "s9" / "samples" / "step_00000000_0.mp4"), 0, 9, 16, (32, 32))
    assert (k3 - k2).abs().float().mean() > 0.01
    # video extension: 17-frame samples continuing the clip's first 9 frames
    ltx(*s, "--out_dir", str(tmp_path / "s5"), "--sample_video", clip, "--sample_video_frames", "9",
        "--sample_frames", "17")
    f = read_clip(str(tmp_path / "s5" / "samples" / "step_00000000_0.mp4"), 0, 17, 16, (32, 32))
    ltx(*s, "--out_dir", str(tmp_path / "s6"), "--sample_frames", "17")  # the same without the prefix
    t2v = read_clip(str(tmp_path / "s6" / "samples" / "step_00000000_0.mp4"), 0, 17, 16, (32, 32))
    assert f.shape == t2v.shape == (3, 17, 32, 32) and (f - t2v).abs().float().mean() > 0.01


def sample_video(out):
    """The one sample of a --mode sample run in `out`: its frames (F, H, W, 3) uint8, read whole (no resize)."""
    import av
    with av.open(str(out / "samples" / "step_00000000_0.mp4")) as f:
        return torch.stack([torch.from_numpy(fr.to_ndarray(format="rgb24")) for fr in f.decode(video=0)])


def test_sample_configs_through_main(folder, tmp_path):
    """--sample_config: a .json of the official fields that says what the flags say gives the flags' sample; a
    multi-scale one samples its first pass at 2/3 of each side (floored to 32), doubles the latents with the
    upsampler (--sample_upscaler: a test-made ltxv-spatial-upscaler file), samples the second pass at twice the
    first from the tail of its schedule, and resizes the decoded video to the asked size."""
    from tests.test_ltx_multiscale import reference
    s = checks.sample_flags(["--ckpt_dir", folder["ckpt"], "--ckpt_file", "ltxv-tiny.safetensors"],
                            os.path.join(folder["ckpt"], "ltxv-tiny.safetensors"), folder["cache"], 9, "--fps", "16",
                            "--sample_stg_blocks", "1")
    ltx(*s, "--out_dir", str(tmp_path / "flags"))
    base = dict(pipeline_type="base", num_inference_steps=3, guidance_scale=3, stg_scale=1, rescaling_scale=0.7,
                skip_block_list=[1], decode_timestep=0.05, decode_noise_scale=0.025)  # the flags' defaults
    (tmp_path / "base.json").write_text(json.dumps(base))
    ltx(*s, "--out_dir", str(tmp_path / "base"), "--sample_config", str(tmp_path / "base.json"))
    assert torch.equal(sample_video(tmp_path / "flags"), sample_video(tmp_path / "base"))

    up = reference(dict(dims=3, spatial_upsample=True, temporal_upsample=False), in_channels=8, mid_channels=32)
    save_file({k: v.contiguous() for k, v in up.state_dict().items()}, tmp_path / "up.safetensors",
              metadata={"config": json.dumps(dict(in_channels=8, mid_channels=32, num_blocks_per_stage=2, dims=3,
                                                  spatial_upsample=True, temporal_upsample=False))})
    ms = dict(pipeline_type="multi-scale", downscale_factor=0.6666666, decode_timestep=0.05, decode_noise_scale=0.025,
              first_pass=dict(guidance_scale=[1, 3], stg_scale=[0, 1], rescaling_scale=[1, 0.7],
                              guidance_timesteps=[1.0, 0.9], skip_block_list=[[], [1]], num_inference_steps=4,
                              skip_final_inference_steps=1, cfg_star_rescale=True),
              second_pass=dict(guidance_scale=1, stg_scale=1, rescaling_scale=1, skip_block_list=[0],
                               num_inference_steps=4, skip_initial_inference_steps=2, tone_map_compression_ratio=0.6))
    (tmp_path / "ms.json").write_text(json.dumps(ms))
    p = ltx(*s, "--out_dir", str(tmp_path / "ms"), "--sample_config", str(tmp_path / "ms.json"),
            "--sample_upscaler", str(tmp_path / "up.safetensors"), "--height", "96", "--width", "64")
    plans = [json.loads(line.split("sample schedule: ", 1)[1]) for line in p.stdout.splitlines()
             if "sample schedule: " in line]
    lq = L.sampling_sigmas(4, "LinearQuadratic", 1).tolist()  # the header's scheduler: LinearQuadratic, no shift
    assert [q["pass"] for q in plans] == [1, 2] and [q["size"] for q in plans] == [[32, 32], [64, 64]]
    assert plans[0]["timesteps"] == [round(t, 6) for t in lq[:3]]
    assert plans[1]["timesteps"] == [round(t, 6) for t in lq[2:]]
    assert plans[0]["guidance"] == [1, 3, 3] and plans[0]["cfg_star"] and plans[1]["stg"] == [1, 1]
    v = sample_video(tmp_path / "ms")
    assert v.shape == (9, 96, 64, 3) and v.float().std() > 1


def test_reference_ic_lora_through_main(folder, tmp_path):
    """--reference 1 (IC-LoRA) on the real path: the VAE encodes each clip's reference (--reference_dir, the same
    names) into the cache beside its latents, a LoRA trains with it in front and a validation loss with it, and
    --sample_reference conditions a sample (a video or an image), which changes it."""
    import shutil
    refs = tmp_path / "refs"
    refs.mkdir()
    clips = sorted(f for f in os.listdir(folder["data"]) if f.endswith(".mp4"))
    for i, c in enumerate(clips):  # each clip's reference: the next clip (a pairing the model could learn)
        shutil.copy(os.path.join(folder["data"], clips[(i + 1) % len(clips)]), refs / c)
    common = ["--ckpt_dir", folder["ckpt"], "--ckpt_file", "ltxv-tiny.safetensors", "--data", folder["data"],
              "--cache_dir", str(tmp_path / "cache"), "--reference", "1", "--reference_dir", str(refs), *CLIP]
    t, meta = checks.check_cache(ltx, common, str(tmp_path / "cache"))
    assert t["reference"].shape == t["latents"].shape == (8, 2, 1, 1) and meta["reference"].startswith(str(refs))
    assert not torch.equal(t["reference"], t["latents"])
    out = tmp_path / "lora"
    p = ltx(*common, "--out_dir", str(out), "--lora_rank", "4", "--max_steps", "2", "--val_count", "2",
            "--val_every", "2")
    from common.log import read_log
    log = read_log(out)
    assert [r["step"] for r in log if "loss" in r] == [1, 2] and [r["step"] for r in log if "val_loss" in r] == [2]
    assert (out / "lora.safetensors").exists() and "encoding" not in p.stderr
    assert json.load(open(out / "run.json"))["fingerprint"]["reference"] is True
    s = checks.sample_flags(["--ckpt_dir", folder["ckpt"], "--ckpt_file", "ltxv-tiny.safetensors"],
                            os.path.join(folder["ckpt"], "ltxv-tiny.safetensors"), str(tmp_path / "cache"), 9,
                            "--fps", "16", "--sample_stg_blocks", "1")
    ltx(*s, "--out_dir", str(tmp_path / "plain"))
    ltx(*s, "--out_dir", str(tmp_path / "ref"), "--sample_reference", os.path.join(folder["data"], clips[0]))
    from data.video import write_video
    write_video(str(tmp_path / "still.mp4"), torch.rand(3, 1, 32, 32) * 2 - 1, 16)  # a one-frame video: an image
    ltx(*s, "--out_dir", str(tmp_path / "img"), "--sample_reference", str(tmp_path / "still.mp4"))
    a, b, c = (sample_video(tmp_path / d).float() for d in ("plain", "ref", "img"))
    assert (a - b).abs().mean() > 1 and (b - c).abs().mean() > 1 and (a - c).abs().mean() > 1
    # --mode bench --reference 1: IC-LoRA's doubled sequence, on random data
    p = ltx("--mode", "bench", "--preset", "tiny", "--bench_steps", "1", "--reference", "1", "--dtype", "bf16",
            "--out_dir", str(tmp_path / "bench"))
    res = json.loads(p.stdout.strip().splitlines()[-1])
    assert res["reference"] is True and res["loss"] == res["loss"] and res["tokens"] == 8  # 2 x 2 x 2, the target's


# slow: the default run keeps the same sampling against upstream's pipeline (tests/test_ltx_multiscale.py)
@pytest.mark.slow
def test_a_clip_later_in_the_samples_through_main(folder, tmp_path):
    """--sample_video_start 8: a 17-frame clip placed at frame 8 of 25-frame samples (extending it backwards), through
    the VAE and the sampler as the pipeline places it (tests/test_ltx_multiscale.py has the golden): the sample is
    another than with the clip at frame 0 or with none."""
    from data.video import read_clip, write_video
    g = torch.Generator().manual_seed(0)
    write_video(str(tmp_path / "clip.mp4"), torch.rand(3, 17, 32, 32, generator=g) * 2 - 1, 16)
    s = checks.sample_flags(["--ckpt_dir", folder["ckpt"], "--ckpt_file", "ltxv-tiny.safetensors"],
                            os.path.join(folder["ckpt"], "ltxv-tiny.safetensors"), folder["cache"], 9, "--fps", "16",
                            "--sample_stg_blocks", "1", "--sample_frames", "25")
    vid = ["--sample_video", str(tmp_path / "clip.mp4"), "--sample_video_frames", "17"]
    ltx(*s, *vid, "--out_dir", str(tmp_path / "late"), "--sample_video_start", "8")
    ltx(*s, *vid, "--out_dir", str(tmp_path / "first"))
    ltx(*s, "--out_dir", str(tmp_path / "none"))
    a, b, c = (read_clip(str(tmp_path / d / "samples" / "step_00000000_0.mp4"), 0, 25, 16, (32, 32))
               for d in ("late", "first", "none"))
    assert a.shape == (3, 25, 32, 32) and (a - b).abs().mean() > 0.01 and (a - c).abs().mean() > 0.01


def test_bench_in_bf16(folder):
    checks.check_bench_in_bf16(ltx, os.path.join(folder["ckpt"], "ltxv-tiny.safetensors"), CLIP, 2 * 2)


def test_a_sample_video_shorter_than_its_frames_is_one_line(folder, tmp_path):
    from data.video import write_video
    write_video(tmp_path / "short.mp4", torch.zeros(3, 5, 32, 32), fps=16)  # 5 frames: fewer than the 9 asked
    base = ["--ckpt_dir", folder["ckpt"], "--ckpt_file", "ltxv-tiny.safetensors", "--data", folder["data"],
            "--out_dir", str(tmp_path / "o"), *CLIP, "--sample_frames", "17"]
    checks.check_user_error(ltx, [*base, "--sample_video", str(tmp_path / "short.mp4"), "--sample_video_frames", "9"],
                            "short.mp4: 0.312s holds fewer than --sample_video_frames 9 frames at --fps 16",
                            tmp_path / "o")
    checks.check_user_error(ltx, [*base, "--sample_video", __file__], "not a readable video", tmp_path / "o")


def test_a_lora_of_another_model_is_one_line(folder, tmp_path):
    """--mode sample --lora with a LoRA of a deeper model (a block this 2-block DiT lacks): one line naming it."""
    from common import lora_file
    sd = {f"transformer_blocks.{b}.attn1.to_q.lora_{ab}.weight": torch.zeros(shape)
          for b in (0, 7) for ab, shape in (("A", (4, 64)), ("B", (64, 4)))}
    lora_file.write_lora(str(tmp_path / "deep.safetensors"), sd, 4.0)
    base = ["--ckpt_dir", folder["ckpt"], "--ckpt_file", "ltxv-tiny.safetensors", "--out_dir", str(tmp_path / "o"),
            *CLIP, "--mode", "sample", "--sample_prompts", "a", "--lora", str(tmp_path / "deep.safetensors")]
    checks.check_user_error(ltx, base, "adapters on modules this model does not have (no such Linear, or weight): "
                            "['transformer_blocks.7.attn1.to_q']", tmp_path / "o")


def test_init_and_base_lora_files_are_checked_in_one_line(folder, tmp_path):
    """--init_lora: a rank other than the file's, or a file with full-weight deltas (it trains adapters only);
    --base_lora: a missing file, a LoRA of a deeper model. Each one line before any work."""
    from common import lora_file
    def write(name, blocks, extra=None):
        sd = {f"transformer_blocks.{b}.attn1.to_q.lora_{ab}.weight": torch.zeros(shape)
              for b in blocks for ab, shape in (("A", (4, 32)), ("B", (32, 4)))}
        lora_file.write_lora(str(tmp_path / name), {**sd, **(extra or {})}, 4.0)
        return str(tmp_path / name)
    good, deep = write("good.safetensors", (0, 1)), write("deep.safetensors", (0, 7))
    delta = write("delta.safetensors", (0,), {"proj_out.diff_b": torch.zeros(8)})
    base = ["--ckpt_dir", folder["ckpt"], "--ckpt_file", "ltxv-tiny.safetensors", "--data", folder["data"],
            "--out_dir", str(tmp_path / "o"), *CLIP]
    for flags, says in [
            (["--init_lora", good, "--lora_rank", "8"], f"--init_lora {good}: rank 4, alpha 4.0, targets attn1.to_q; "
             "leave --lora_rank, --lora_alpha and --lora_targets out or give the file's"),
            (["--init_lora", delta], "cannot train as LoRA adapters: merge it into the base with --base_lora"),
            (["--base_lora", f"{tmp_path / 'nope.safetensors'}:0.5"], "nope.safetensors: no such file"),
            (["--base_lora", f"{good},{deep}"], "adapters on modules this model does not have (no such Linear, or "
             "weight): ['transformer_blocks.7.attn1.to_q']")]:
        checks.check_user_error(ltx, [*base, *flags], says, tmp_path / "o")


@pytest.mark.parametrize("flags, says", [
    (["--height", "48"], "--height 48 --width 32: both must be positive multiples of 32"),
    (["--frames", "5"], "--frames 5: must be 1 + 8k"),
    (["--preset", "7B"], "--preset '7B': expected one of 2B, 13B, tiny, toy"),
    (["--preset", "2B", "--ckpt_dir", ""], "--mode train needs --ckpt_dir"),
    (["--ckpt_file", "nope.safetensors"], "no nope.safetensors in it"),
    (["--timestep_sampling", "shift"], "expected one of shifted_logit_normal, logit_normal, uniform"),
    (["--global_batch", "3"], "--global_batch 3 must be a multiple of --micro_batch x processes = 2 x 1"),
    (["--sp", "0"], "--sp 0 must be >= 1"),
    (["--sp", "2"], "--sp 2 must divide the number of processes (1)"),
    (["--keyframe_p", "0.6", "--last_frame_p", "0.5"], "together at most 1"),
    (["--sample_video_frames", "8", "--sample_video", __file__], "--sample_video_frames 8: expected 1 + 8k frames"),
    (["--sample_keyframes", "nope.png@4"], "--sample_keyframes: nope.png: no such file"),
    (["--sample_keyframes", __file__ + "@x"], "expected image@frame[:strength],..."),
    (["--sample_keyframes", __file__ + "@4:1.5"], "@4:1.5: a strength in (0, 1]"),
    (["--sample_image_strength", "0"], "--sample_image_strength 0.0: expected a strength in (0, 1]"),
    (["--sample_image_crf", "52"], "--sample_image_crf 52: expected 0 (off) to 51 (libx264's CRF range)"),
    (["--sample_keyframes", __file__ + "@9"], "@9: expected -1 (the last frame) or a frame 1..8"),
    (["--sample_keyframe_frame", "9"], "--sample_keyframe_frame 9: expected -1 (the last frame) or a frame 1..8"),
    (["--reference_dir", os.path.dirname(__file__)], "--reference_dir names the references of --reference 1"),
    (["--sample_video_start", "8"], "--sample_video_start 8: expected a pixel frame 8m"),
    (["--sample_video", __file__, "--sample_video_start", "4", "--sample_frames", "17"],
     "--sample_video_start 4: expected a pixel frame 8m (a multiple of 8) where --sample_video's 9 frames fit"),
    (["--sample_reference", "nope.mp4"], "--sample_reference nope.mp4: no such file or folder"),
    (["--sample_reference", __file__], "not a readable video or image"),
    (["--sample_config", os.path.join(os.path.dirname(__file__), "fixtures", "stg_skip.json"), "--sample_prompts", "a"],
     "stg_mode 'attention_skip'; train_ltx.py implements attention_values"),
    (["--sample_config", "ltxv-99b"], "--sample_config 'ltxv-99b': expected one of ltxv-2b-0.9.6-dev,"),
    (["--sample_config", "ltxv-13b-0.9.8-dev", "--sample_prompts", "a", "--height", "64", "--width", "64"],
     "STG on block(s) [22, 27, 28, 35, 39]: the DiT has 2 blocks"),
    (["--sample_config", "ltxv-2b-0.9.8-distilled", "--sample_prompts", "a", "--height", "64", "--width", "64"],
     "is multi-scale: its latent upsampler"),
    (["--sample_config", "ltxv-2b-0.9.8-distilled", "--sample_prompts", "a"], "too small for the multi-scale"),
    (["--sample_config", "ltxv-2b-0.9.8-distilled", "--sample_schedule", "distilled"],
     "--sample_schedule distilled is the distilled configs' first pass"),
    (["--mode", "sample", "--init_lora", __file__], "--init_lora starts a training run's adapter from a file; to "
     "sample with one use --lora"),
    (["--base_lora", "x=" + __file__], f"--base_lora x={__file__}: x= names a part of the model: this model has no "
     "parts"),
    (["--mode", "bench", "--base_lora", __file__], "--base_lora merges a LoRA into the base of a training or "
     "sampling run"),
])
def test_user_errors_are_one_line_before_any_work(folder, tmp_path, flags, says):
    base = ["--ckpt_dir", folder["ckpt"], "--ckpt_file", "ltxv-tiny.safetensors", "--data", folder["data"],
            "--out_dir", str(tmp_path / "o"), *CLIP]
    checks.check_user_error(ltx, [*base, *flags], says, tmp_path / "o")
