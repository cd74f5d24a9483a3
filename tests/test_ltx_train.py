"""train_ltx.py as a user runs it (subprocesses, the toy preset): the loss falls on 1 and 2 processes and the two
agree (losses and gradient norms, with per-sample caption dropout, first-frame and video-prefix conditioning and
the per-step keyframes, last frame or another, in the draws), LoRA
trains only the adapters, an interrupted run resumes exactly, the run folder is never another run's, the validation
loss is fixed, --mode sample applies a LoRA, bench runs, AC keeps the math, --sp 2 on 2 processes = 1 process."""
import pytest

from tests import checks
from tests.procs import losses, toy_runner

# SMALL (tests/procs.py) -> 48 x 5 x 4 x 4 "latents" -> 80 tokens per clip; with first-frame conditioning, caption
# dropout, video-extension prefixes and the keyframes in the draws (seed 0: steps 1-4 and 9-10 the last frame, 5-8
# another frame j, from u = 0.96, 0.31, 0.56, 0.64: j = 4, 2, 3, 3)
EXTRA = ["--first_frame_p", "0.3", "--prefix_p", "0.2", "--caption_dropout", "0.2", "--last_frame_p", "0.5",
         "--keyframe_p", "0.3"]
run = toy_runner("train_ltx.py", *EXTRA)


def test_one_and_two_processes_agree_and_loss_falls(toy, tmp_path):
    """Same samples, noise, sigmas, dropout and conditioning on 1 and 2 processes: losses AND gradient norms agree
    per step (one process accumulates 2 micro-batches, two processes none: a wrong / accum shows in the norm)."""
    checks.check_one_and_two_processes_agree(run, toy, tmp_path, "--timestep_sampling", "uniform")


# slow: the default run keeps the reference through main() (tests/test_ltx_main.py) and the plain 1-vs-2 above
@pytest.mark.slow
def test_reference_one_and_two_processes_agree(toy, tmp_path):
    """--reference 1 (IC-LoRA) from a jsonl of pairs (each toy clip's reference: the next one): the references go
    through the cache and the batches with their samples, on 1 and on 2 processes alike (losses and gradient norms),
    and the loss falls."""
    import json
    import os
    d = toy["data"]
    clips = sorted(f for f in os.listdir(d) if f.endswith(".mp4"))
    rows = []
    for i, c in enumerate(clips):
        with open(os.path.join(d, c[:-4] + ".txt")) as f:
            caption = f.read().strip()
        rows.append({"path": os.path.join(d, c), "caption": caption,
                     "reference": os.path.join(d, clips[(i + 1) % len(clips)])})
    pairs = tmp_path / "pairs.jsonl"
    pairs.write_text("".join(json.dumps(r) + "\n" for r in rows))
    checks.check_one_and_two_processes_agree(run, {**toy, "data": str(pairs)}, tmp_path, "--reference", "1",
                                             "--timestep_sampling", "uniform")


# slow: the default run keeps Wan's (the same LoRA layers' freezing in every script's build_dit)
@pytest.mark.slow
def test_lora_trains_only_the_adapters(toy, tmp_path):
    # the from-scratch toy DiT has a zero output layer: fine-tune a briefly trained one, loaded from its own export
    sd = checks.check_lora_trains_only_the_adapters(run, toy, tmp_path)
    assert all(k.startswith("diffusion_model.transformer_blocks.") for k in sd)
    assert {k.split(".", 3)[3].rsplit(".lora_", 1)[0].rsplit(".alpha", 1)[0] for k in sd} == \
        {f"{a}.{m}" for a in ("attn1", "attn2") for m in ("to_q", "to_k", "to_v", "to_out.0")}


def test_interrupted_run_resumes_exactly(toy, tmp_path):
    """SIGTERM in the middle of an accumulated step (8 micro-batches a step): the step in flight is dropped, the last
    whole step is checkpointed (EMA included), and --resume 1 continues bit for bit as the uninterrupted run."""
    checks.check_interrupted_run_resumes_exactly(run, toy, tmp_path)


# slow: the default run keeps Wan's (common/run.py, the same check in every script)
@pytest.mark.slow
def test_run_folder_is_never_another_runs(toy, tmp_path):
    checks.check_run_folder_is_never_another_runs(run, toy, tmp_path, ["--first_frame_p", "0.5"],
                                                  ["first_frame_p was 0.3, now 0.5"])


def test_validation_loss_is_fixed_and_logged(toy, tmp_path):
    checks.check_validation_loss_is_fixed(run, toy, tmp_path)  # lr 0: fixed clips, sigmas and noise, same number


# slow: the default run samples with and without a LoRA in tests/test_ltx_main.py, and benches there too
@pytest.mark.slow
def test_sample_mode_with_lora_and_bench_with_ac(toy, tmp_path):
    checks.check_sample_mode_with_lora(run, toy, tmp_path, "--sample_stg", "1", "--sample_stg_blocks", "2")
    checks.check_bench(run, toy, tmp_path / "b")
    run(toy, tmp_path / "ac", "--max_steps", "2", "--ac", "1")
    a, b = losses(tmp_path / "base"), losses(tmp_path / "ac")
    assert all(abs(a[s] - b[s]) <= 1e-5 * max(1.0, abs(a[s])) for s in (1, 2)), (a, b)


# slow: the default run keeps Wan's through main() and this model's split against whole (tests/test_ltx_sp.py)
@pytest.mark.slow
def test_sequence_parallel_equals_one_process(toy, tmp_path):
    """--sp 2 on 2 processes = 1 process, per step (losses and gradient norms), at 12 x 12 pixels: 3 x 3 x 5 = 45
    tokens a clip, odd, so the split pads a token and masks it in attention; first-frame conditioning (per-token t,
    sharded with the tokens) and caption dropout are in the draws (EXTRA)."""
    checks.check_sequence_parallel_agrees(run, toy, tmp_path, "--timestep_sampling", "uniform", "--height", "12",
                                          "--width", "12")
