"""train_inversion_dpo.py end to end on the tiny models: forked from a process that imported the libraries once
(`launch`), and launched as a user launches it (accelerate, torchrun, sdxl.sh) where the launch itself is tested."""

import json
import os
import shutil
import signal
import subprocess
import sys
import time
import warnings
from pathlib import Path

import pytest
import torch
from PIL import Image
from safetensors.torch import load_file

import forked_runs

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = str(ROOT / "train_inversion_dpo.py")
ENV = {**os.environ, "HF_HUB_OFFLINE": "1", "PYTHONUNBUFFERED": "1", "TOKENIZERS_PARALLELISM": "false",
       "OMP_NUM_THREADS": "1"}


@pytest.fixture(scope="session")
def pairs_dir(tmp_path_factory):
    """8 pairs: a red winner and a blue loser of another size, each pair with its own caption, as a jsonl manifest."""
    folder = tmp_path_factory.mktemp("pairs")
    rows = []
    for i in range(8):
        Image.new("RGB", (64, 64), (220, 30 + i, 30)).save(folder / f"winner{i}.png")
        Image.new("RGB", (80, 64), (30, 30 + i, 220)).save(folder / f"loser{i}.png")
        rows.append({"caption": f"shape number {i}", "chosen": f"winner{i}.png", "rejected": f"loser{i}.png"})
    (folder / "pairs.jsonl").write_text("".join(json.dumps(row) + "\n" for row in rows))
    return folder


def base_args(model, pairs_dir, output_dir, *extra):
    return ["--pretrained_model_name_or_path", model, "--dataset_name", str(pairs_dir / "pairs.jsonl"),
            "--output_dir", str(output_dir), "--resolution", "64", "--num_inference_steps", "3",
            "--train_batch_size", "2", "--max_train_steps", "2", "--learning_rate", "1e-5", "--beta_dpo", "50",
            "--adam_weight_decay", "0", "--report_to", "none", "--seed", "0", *extra]


# What `accelerate launch --cpu --num_processes 1 --mixed_precision no --dynamo_backend no` sets for its process
ONE_PROCESS_ENV = {"ACCELERATE_USE_CPU": "True", "ACCELERATE_MIXED_PRECISION": "no", "ACCELERATE_DYNAMO_BACKEND": "NO",
                   "ACCELERATE_DYNAMO_MODE": "default", "ACCELERATE_DYNAMO_USE_FULLGRAPH": "False",
                   "ACCELERATE_DYNAMO_USE_REGIONAL_COMPILATION": "False"}
def launch(args, processes=1, check=True, extra_env=None, timeout=600, launcher=None, cold=False):
    """Run the trainer: by default forked from a process that imported the libraries once (forked_runs.py: the
    environment `accelerate launch` gives one CPU process, or torchrun's variables for several), which the tests
    cannot tell from a launch but for the seconds. `cold` (or `extra_env`, which the libraries may read at import):
    launched as a user launches it, with accelerate (one process) or torchrun (several), killed with every process it
    started on timeout. `launcher`: the command before `args` instead."""
    if launcher is None and not cold and not extra_env:
        env = ONE_PROCESS_ENV if processes == 1 else {"ACCELERATE_USE_CPU": "true"}
        result = forked_runs.shared("tests", ENV, cwd=ROOT).run([SCRIPT, *args], env=env, processes=processes,
                                                                 timeout=timeout)
    else:
        result = _launch_cold(args, processes, extra_env, timeout, launcher)
    if check and result.returncode != 0:
        raise AssertionError(f"training failed ({result.returncode}):\n{result.stdout[-3000:]}\n{result.stderr[-6000:]}")
    return result


def _launch_cold(args, processes, extra_env, timeout, launcher):
    if launcher is not None:
        command, env = [*launcher, *args], {**ENV, **(extra_env or {})}
    elif processes == 1:
        command = [sys.executable, "-m", "accelerate.commands.launch", "--cpu", "--num_processes", "1",
                   "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no", SCRIPT, *args]
        env = {**ENV, **(extra_env or {})}
    else:
        command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node",
                   str(processes), SCRIPT, *args]
        env = {**ENV, "ACCELERATE_USE_CPU": "true"}
    process = subprocess.Popen(command, cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        stdout, stderr = process.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        forked_runs.kill_tree(process.pid)
        stdout, stderr = process.communicate()
        raise subprocess.TimeoutExpired(command, timeout, stdout, stderr) from None
    return subprocess.CompletedProcess(command, process.returncode, stdout, stderr)


def unet_weights(folder):
    return load_file(str(Path(folder) / "unet" / "diffusion_pytorch_model.safetensors"))


def changed(before, after):
    return [name for name in before if not torch.equal(before[name], after[name])]


def read_metrics(output_dir):
    return [json.loads(line) for line in (Path(output_dir) / "metrics.jsonl").read_text().splitlines()]


@pytest.mark.parametrize("loss_type", ["inversion_dpo", "inversion_dpo_official"])
def test_paper_forms_with_an_identical_fp32_reference_do_not_move_and_warn(tiny_sdxl_path, pairs_dir, tmp_path,
                                                                            loss_type):
    result = launch(base_args(tiny_sdxl_path, pairs_dir, tmp_path, "--loss_type", loss_type))
    assert changed(unet_weights(tiny_sdxl_path), unet_weights(tmp_path)) == []
    assert "The gradient norm is exactly 0 and the loss is log 2" in result.stderr
    assert "Such a run moves only once something else makes the two differ" in result.stderr
    metrics = read_metrics(tmp_path)
    assert [m["grad_norm"] for m in metrics] == [0.0, 0.0]
    assert all(m["zero_gradient"] == 1.0 and abs(m["loss"] - 0.6931472) < 1e-6 for m in metrics)


@pytest.mark.parametrize("loss_type", ["inversion_dpo_exact", "diffusion_dpo", "sft"])
def test_loss_types_that_move_from_the_reference_change_the_weights(tiny_sdxl_path, pairs_dir, tmp_path, loss_type):
    result = launch(base_args(tiny_sdxl_path, pairs_dir, tmp_path, "--loss_type", loss_type))
    assert "gradient norm is exactly 0" not in result.stderr
    assert len(changed(unet_weights(tiny_sdxl_path), unet_weights(tmp_path))) > 10
    metrics = read_metrics(tmp_path)
    assert len(metrics) == 2 and metrics[0]["grad_norm"] > 0
    expected_keys = {"step", "loss", "grad_norm", "lr", "zero_gradient"}
    if loss_type != "sft":
        expected_keys |= {"margin", "implicit_accuracy", "score_w", "score_l"}
    assert expected_keys <= set(metrics[0])
    config = json.loads((tmp_path / "training_config.json").read_text())
    assert config["loss_type"] == loss_type


def test_checkpoints_validation_and_output_layout(tiny_sdxl_path, pairs_dir, tmp_path):
    from diffusers import UNet2DConditionModel

    launch(base_args(tiny_sdxl_path, pairs_dir, tmp_path, "--loss_type", "inversion_dpo_exact",
                     "--max_train_steps", "3", "--checkpointing_steps", "1", "--checkpoints_total_limit", "2",
                     "--validation_prompts", "a red square", "a blue square", "--validation_steps", "3",
                     "--validation_num_inference_steps", "2", "--trajectory_chunk_size", "2"))
    assert sorted(p.name for p in tmp_path.glob("checkpoint-*")) == ["checkpoint-2", "checkpoint-3"]
    assert not list(tmp_path.glob(".incomplete-*"))
    grid = Image.open(tmp_path / "validation" / "step-000003.png")
    assert grid.size == (64 * 2, 64 * 2)  # prompts x seeds
    rows = read_metrics(tmp_path)
    assert [m["step"] for m in rows] == [1, 2, 3]
    # each step's own seconds, without checkpoint saves or validation: disjoint parts of the run's elapsed time;
    # peak memory is the CUDA allocator's, unknown (null) on a CPU
    assert all(m["seconds_per_step"] > 0 for m in rows)
    assert sum(m["seconds_per_step"] for m in rows) < rows[-1]["elapsed_s"]
    assert all(m["peak_memory_allocated_gib"] is None and m["peak_memory_reserved_gib"] is None for m in rows)
    # the phase log: the setup, every phase of the first two steps, then each phase the first time it runs
    phases = [json.loads(line) for line in (tmp_path / "memory_phases.jsonl").read_text().splitlines()]
    step_phases = ["encoding", "inversion", "loss pass", "backward", "optimiser step"]
    assert [(p["step"], p["phase"]) for p in phases] == (
        [(None, "model load"), (None, "reference load")] + [(1, name) for name in step_phases]
        + [(1, "checkpoint save")] + [(2, name) for name in step_phases] + [(2, "checkpoint save"), (3, "validation")])
    assert all(p["seconds"] >= 0 and p["peak_allocated_gib"] is None for p in phases)  # no CUDA memory on a CPU
    assert sum(p["seconds"] for p in phases if p["step"] == 1 and p["phase"] in step_phases) \
        <= rows[0]["seconds_per_step"]
    # the final UNet and every checkpoint load as the notebook loads them
    final = UNet2DConditionModel.from_pretrained(str(tmp_path), subfolder="unet")
    checkpoint = UNet2DConditionModel.from_pretrained(str(tmp_path / "checkpoint-3"), subfolder="unet")
    for (name, a), b in zip(final.state_dict().items(), checkpoint.state_dict().values()):
        assert torch.equal(a, b), name


def test_lora_trains_adapters_only_and_saves_a_loadable_file(tiny_sdxl_path, pairs_dir, tmp_path):
    from diffusers import StableDiffusionXLPipeline

    launch(base_args(tiny_sdxl_path, pairs_dir, tmp_path, "--loss_type", "inversion_dpo_exact", "--use_lora",
                     "--rank", "4", "--learning_rate", "1e-3", "--checkpointing_steps", "2"))
    for folder in (tmp_path, tmp_path / "checkpoint-2"):
        state = load_file(str(folder / "pytorch_lora_weights.safetensors"))
        assert state and all(key.startswith("unet.") for key in state)
        assert any("lora_B" in key and value.abs().sum() > 0 for key, value in state.items())  # it moved off zero
    assert not (tmp_path / "unet").exists()
    pipe = StableDiffusionXLPipeline.from_pretrained(tiny_sdxl_path)
    image = dict(prompt="a red square", height=64, width=64, num_inference_steps=2, output_type="pt")
    before = pipe(**image, generator=torch.Generator().manual_seed(0)).images
    pipe.load_lora_weights(str(tmp_path))
    after = pipe(**image, generator=torch.Generator().manual_seed(0)).images
    assert not torch.equal(before, after)


def test_lora_with_the_paper_form_is_stuck_at_zero_and_says_so(tiny_sdxl_path, pairs_dir, tmp_path):
    result = launch(base_args(tiny_sdxl_path, pairs_dir, tmp_path, "--loss_type", "inversion_dpo", "--use_lora",
                                    "--max_train_steps", "1"))
    assert "a LoRA adapter that starts at zero" in result.stderr
    state = load_file(str(tmp_path / "pytorch_lora_weights.safetensors"))
    assert all(value.abs().sum() == 0 for key, value in state.items() if "lora_B" in key)


def test_init_perturbation_breaks_the_paper_forms_tie(tiny_sdxl_path, pairs_dir, tmp_path):
    # a LoRA adapter whose B starts random: the paper form has a gradient from the first step
    result = launch(base_args(tiny_sdxl_path, pairs_dir, tmp_path, "--loss_type", "inversion_dpo", "--use_lora",
                              "--init_perturbation", "1e-3", "--max_train_steps", "1"))
    assert "gradient norm is exactly 0" not in result.stderr
    assert read_metrics(tmp_path)[0]["grad_norm"] > 0


def test_perturb_adds_noise_scaled_by_each_tensors_rms():
    from training import perturb

    weights = [torch.randn(30, 20) * 3, torch.zeros(5, 4)]
    originals = [w.clone() for w in weights]
    perturb(weights, 1e-3, seed=7)
    generator = torch.Generator().manual_seed(7)  # the formula written out: w + s * rms(w) * n, or s * n for zeros
    noise = [torch.randn(w.shape, generator=generator) for w in originals]
    torch.testing.assert_close(weights[0], originals[0] + 1e-3 * originals[0].pow(2).mean().sqrt() * noise[0])
    torch.testing.assert_close(weights[1], 1e-3 * noise[1])


@pytest.mark.slow
@pytest.mark.parametrize("lora", [False, True], ids=["full", "lora"])
def test_compiled_run_trains_exactly_like_the_plain_one(tiny_sdxl_path, pairs_dir, tmp_path, lora):
    # The eager backend traces the policy and the reference (full: a separate compiled UNet; LoRA: the same module
    # with its adapters off) through dynamo without generating code, so the two runs must agree bit for bit, and
    # the saved weights have the plain module's keys.
    args = ["--loss_type", "inversion_dpo_exact"]
    args += ["--use_lora", "--rank", "4", "--learning_rate", "1e-3"] if lora else ["--learning_rate", "1e-4"]
    launch(base_args(tiny_sdxl_path, pairs_dir, tmp_path / "plain", *args))
    result = launch(base_args(tiny_sdxl_path, pairs_dir, tmp_path / "compiled", *args, "--torch_compile",
                              "--torch_compile_backend", "eager"), extra_env={"TORCH_LOGS": "recompiles"})
    # dynamo traced the UNet: the no-gradient and gradient passes (and, for LoRA, the adapters switched off for the
    # reference) are guard failures it recompiles for
    assert "Recompiling function" in result.stderr
    if lora:
        assert "_disable_adapters" in result.stderr
        plain = load_file(str(tmp_path / "plain" / "pytorch_lora_weights.safetensors"))
        compiled = load_file(str(tmp_path / "compiled" / "pytorch_lora_weights.safetensors"))
        assert all(key.startswith("unet.") for key in compiled)
    else:
        plain, compiled = unet_weights(tmp_path / "plain"), unet_weights(tmp_path / "compiled")
        assert sorted(compiled) == sorted(unet_weights(tiny_sdxl_path))
        assert changed(unet_weights(tiny_sdxl_path), compiled)
    assert sorted(plain) == sorted(compiled)
    assert changed(plain, compiled) == []
    assert any(value.abs().sum() > 0 for key, value in compiled.items() if "lora_B" in key or not lora)


def test_sd1_model_trains_through_the_same_code(tiny_sd_path, pairs_dir, tmp_path):
    launch(base_args(tiny_sd_path, pairs_dir, tmp_path, "--loss_type", "inversion_dpo_exact", "--save_pipeline"))
    assert len(changed(unet_weights(tiny_sd_path), unet_weights(tmp_path))) > 10
    from diffusers import StableDiffusionPipeline

    StableDiffusionPipeline.from_pretrained(str(tmp_path))  # --save_pipeline wrote a whole pipeline


@pytest.mark.slow
def test_killed_and_resumed_run_ends_with_the_uninterrupted_weights(tiny_sdxl_path, pairs_dir, tmp_path):
    # diffusion_dpo draws noise and timesteps, random crops and flips draw too: resume must restore every RNG and
    # the data position (step 3 of 4 per epoch, then across the epoch boundary).
    args = ["--loss_type", "diffusion_dpo", "--train_batch_size", "2", "--max_train_steps", "6",
            "--checkpointing_steps", "3", "--random_crop", "--learning_rate", "1e-4"]
    full, interrupted = tmp_path / "full", tmp_path / "interrupted"
    launch(base_args(tiny_sdxl_path, pairs_dir, full, *args))

    command = [sys.executable, SCRIPT, *base_args(tiny_sdxl_path, pairs_dir, interrupted, *args)]
    process = subprocess.Popen(command, cwd=ROOT, env=ENV, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    marker = interrupted / "checkpoint-3" / "checkpoint_complete.json"
    while not marker.exists() and process.poll() is None:
        time.sleep(0.02)
    process.send_signal(signal.SIGKILL)
    assert process.wait() == -signal.SIGKILL, "the run finished before it could be killed after its checkpoint"
    assert marker.exists() and not (interrupted / "unet").exists()
    # a save killed half-way: a checkpoint folder without its completion marker must never be picked up
    (interrupted / "checkpoint-5" / "unet").mkdir(parents=True)
    result = launch(base_args(tiny_sdxl_path, pairs_dir, interrupted, *args, "--resume_from_checkpoint", "latest"))
    assert "ignoring" in result.stderr and "checkpoint-5" in result.stderr
    assert "resuming from" in result.stderr and "checkpoint-3" in result.stderr

    expected, resumed = unet_weights(full), unet_weights(interrupted)
    assert changed(unet_weights(tiny_sdxl_path), expected)
    for name in expected:
        torch.testing.assert_close(resumed[name], expected[name], rtol=0, atol=0, msg=name)
    steps = [m["step"] for m in read_metrics(interrupted)]
    assert steps[-3:] == [4, 5, 6]


@pytest.mark.slow
def test_the_anchored_forms_default_beta_scales_with_kappa_and_is_kept_on_resume(tiny_sdxl_path, pairs_dir, tmp_path):
    def args(output, kappa, steps, *extra):
        flags = base_args(tiny_sdxl_path, pairs_dir, output, "--loss_type", "inversion_dpo_x0", "--relative_beta",
                          str(kappa), "--max_train_steps", str(steps), "--checkpointing_steps", "1", *extra)
        at = flags.index("--beta_dpo")
        return flags[:at] + flags[at + 2:]  # no --beta_dpo: the rule

    first = launch(args(tmp_path / "a", 40, 1))
    assert "--relative_beta 40 / R" in first.stderr
    beta = read_metrics(tmp_path / "a")[0]["beta"]
    # the same first batch with twice the kappa: exactly twice the beta (beta = kappa / R, R from the reference)
    launch(args(tmp_path / "b", 80, 1))
    assert read_metrics(tmp_path / "b")[0]["beta"] == pytest.approx(2 * beta, rel=1e-6)
    # resumed at step 1: step 2 (another batch, whose R differs) keeps the run's beta
    resumed = launch(args(tmp_path / "a", 40, 2, "--resume_from_checkpoint", "latest"))
    assert "/ R" not in resumed.stderr
    assert [m["beta"] for m in read_metrics(tmp_path / "a")] == [beta, beta]
    # an explicit --beta_dpo wins
    launch(base_args(tiny_sdxl_path, pairs_dir, tmp_path / "c", "--loss_type", "inversion_dpo_x0",
                     "--max_train_steps", "1"))
    assert read_metrics(tmp_path / "c")[0]["beta"] == 50.0


def test_noised_anchor_points_train_and_refuse_a_cache(tiny_sdxl_path, pairs_dir, tmp_path, capsys):
    from train_inversion_dpo import parse_args

    points = "noised"
    launch(base_args(tiny_sdxl_path, pairs_dir, tmp_path, "--anchor_points", points))
    assert changed(unet_weights(tiny_sdxl_path), unet_weights(tmp_path))
    assert all(row["loss"] > 0 for row in read_metrics(tmp_path))
    for extra, message in ((["--inversion_cache_dir", str(tmp_path / "cache")], "drop --inversion_cache_dir"),
                           (["--loss_type", "inversion_dpo_exact"], "inversion_dpo_x0 only")):
        with pytest.raises(SystemExit):
            parse_args(["--pretrained_model_name_or_path", "unused", "--dataset_name", "unused",
                        "--anchor_points", points, *extra])
        assert message in capsys.readouterr().err


@pytest.mark.slow
def test_each_row_counts_the_steps_model_flops_and_its_mfu_without_recomputation(tiny_sdxl_path, pairs_dir, tmp_path):
    # model FLOPs leave out the forward passes that gradient checkpointing recomputes: the same with and without it
    runs = {}
    for name, extra in (("plain", []), ("checkpointed", ["--gradient_checkpointing"])):
        launch(base_args(tiny_sdxl_path, pairs_dir, tmp_path / name, "--peak_tflops", "0.5", *extra))
        runs[name] = read_metrics(tmp_path / name)
    flops = runs["plain"][0]["flops_per_step"]
    assert flops > 0 and [row["flops_per_step"] for row in runs["checkpointed"]] == [flops, flops]
    for row in runs["plain"] + runs["checkpointed"]:  # mfu = FLOPs / seconds / peak, the peak given in TFLOP/s
        assert row["mfu"] == pytest.approx(row["flops_per_step"] / row["seconds_per_step"] / 0.5e12, rel=1e-9)
    # without a peak (a CPU has none in the table) nothing is counted: the mfu is unknown, null
    launch(base_args(tiny_sdxl_path, pairs_dir, tmp_path / "nopeak", "--max_train_steps", "1"))
    row = read_metrics(tmp_path / "nopeak")[0]
    assert row["mfu"] is None and row["flops_per_step"] is None


def test_profile_step_writes_the_profilers_table_and_its_summary(tiny_sdxl_path, pairs_dir, tmp_path):
    launch(base_args(tiny_sdxl_path, pairs_dir, tmp_path, "--profile_step", "2"))
    assert not (tmp_path / "profile_step_1.json").exists()
    summary = json.loads((tmp_path / "profile_step_2.json").read_text())
    assert summary["step"] == 2 and summary["device"] == "cpu" and summary["self_time_ms"] > 0
    assert sum(summary["shares"].values()) == pytest.approx(1.0) and summary["shares"]["matmul"] > 0
    assert "Self CPU" in (tmp_path / "profile_step_2.txt").read_text()


def expected_peak(stdout):
    """(MiB, fits) from --memory_budget's "expected peak" line."""
    line = next(line for line in stdout.splitlines() if "expected peak" in line)
    value, unit = line.split()[2:4]
    return float(value) * (1024 if unit == "GiB" else 1), "(fits)" in line


@pytest.mark.slow
def test_memory_budget_prints_the_parts_and_exits_and_auto_takes_the_largest_chunk_that_fits(
        tiny_sdxl_path, pairs_dir, tmp_path):
    budget = ["--num_inference_steps", "6", "--memory_budget"]
    result = launch(base_args(tiny_sdxl_path, pairs_dir, tmp_path / "budget", *budget, "--memory_limit_gib", "1"))
    for part in ("policy weights", "gradients (float32)", "optimiser state (adamw)", "reference copy",
                 "text encoders and VAE", "activations (8 images in one graph)", "expected peak"):
        assert part in result.stdout
    # it exits before the reference loads, without training
    phases = (tmp_path / "budget" / "memory_phases.jsonl").read_text()
    assert "reference load" not in phases and not (tmp_path / "budget" / "metrics.jsonl").exists()
    # a limit between the budgets of chunks 3 and 4: auto takes 3, and says which flags would fit a lower one
    peaks = {k: expected_peak(launch(base_args(tiny_sdxl_path, pairs_dir, tmp_path / f"k{k}", *budget,
                                               "--trajectory_chunk_size", str(k))).stdout)[0] for k in (3, 4)}
    limit = (peaks[3] + peaks[4]) / 2 / 1024
    auto = launch(base_args(tiny_sdxl_path, pairs_dir, tmp_path / "auto", "--num_inference_steps", "6",
                            "--trajectory_chunk_size", "auto", "--memory_limit_gib", str(limit),
                            "--max_train_steps", "1"))
    assert "--trajectory_chunk_size auto: 3 " in auto.stderr
    assert json.loads((tmp_path / "auto" / "training_config.json").read_text())["trajectory_chunk_size"] == "auto"
    over = launch(base_args(tiny_sdxl_path, pairs_dir, tmp_path / "over", *budget, "--memory_limit_gib",
                            str(peaks[3] / 1024 / 2)))
    assert expected_peak(over.stdout)[1] is False and "flags that would bring it under the limit" in over.stdout
    assert "--use_lora" in over.stdout


@pytest.mark.slow
def test_two_processes_match_one_process_with_the_same_global_batch(tiny_sdxl_path, pairs_dir, tmp_path):
    # Adam's normalised update turns gradient elements at rounding level into full +-lr steps whose sign depends on
    # how the batch was split; a large epsilon makes the update proportional to the gradient, so the comparison
    # measures gradient synchronisation rather than the sign of rounding noise.
    args = ["--loss_type", "inversion_dpo_exact", "--max_train_steps", "2", "--learning_rate", "1e-3",
            "--adam_epsilon", "1.0", "--checkpointing_steps", "100"]
    one, two = tmp_path / "one", tmp_path / "two"
    launch(base_args(tiny_sdxl_path, pairs_dir, one, *args, "--train_batch_size", "2"))
    try:
        launch(base_args(tiny_sdxl_path, pairs_dir, two, *args, "--train_batch_size", "1"), processes=2, timeout=240,
               cold=True)  # torchrun itself: the launch users make
    except subprocess.TimeoutExpired as hang:
        # Before end_processes() a process could hang at exit (a GIL deadlock in the process group's destructor,
        # about one run in three on a loaded CPU). Should a run still stall, it is retried once and its last output
        # is kept as a warning, so that the gradient check below still decides the test.
        warnings.warn(f"two-process run stalled for {hang.timeout} s; retried. Its last output:\n"
                      f"{(hang.stderr or '')[-3000:]}")
        shutil.rmtree(two, ignore_errors=True)
        launch(base_args(tiny_sdxl_path, pairs_dir, two, *args, "--train_batch_size", "1"), processes=2, timeout=240,
               cold=True)  # torchrun itself: the launch users make
    base, single, double = unet_weights(tiny_sdxl_path), unet_weights(one), unet_weights(two)
    assert max((single[name] - base[name]).abs().max() for name in base) > 1e-5
    for name in single:
        torch.testing.assert_close(double[name], single[name], rtol=0, atol=1e-6, msg=name)
    # the processes really shared the batch: each saw one pair per step, and both logged the same averaged numbers
    assert read_metrics(one)[0]["grad_norm"] == pytest.approx(read_metrics(two)[0]["grad_norm"], rel=1e-5)


@pytest.mark.slow
@pytest.mark.parametrize("points", ["inversion", "standardised"])
def test_filled_float32_cache_trains_exactly_like_no_cache(tiny_sdxl_path, pairs_dir, tmp_path, points):
    args = ["--loss_type", "inversion_dpo_exact" if points == "inversion" else "inversion_dpo_x0", "--learning_rate",
            "1e-4", "--anchor_points", points]
    cache = ["--inversion_cache_dir", str(tmp_path / "cache"), "--inversion_cache_dtype", "float32"]
    uncached_run = launch(base_args(tiny_sdxl_path, pairs_dir, tmp_path / "uncached", *args))
    assert "loading the reference UNet" in uncached_run.stderr
    launch(base_args(tiny_sdxl_path, pairs_dir, tmp_path / "fill", *args, *cache, "--fill_inversion_cache"))
    # 8 pairs, winner and loser, an encoding and a trajectory each
    assert len(list((tmp_path / "cache").rglob("*.safetensors"))) == 32
    assert not (tmp_path / "fill" / "unet").exists()  # filling trains nothing
    cached_run = launch(base_args(tiny_sdxl_path, pairs_dir, tmp_path / "cached", *args, *cache))
    assert "loading the reference UNet" not in cached_run.stderr  # every trajectory was on disk
    metrics = read_metrics(tmp_path / "cached")
    for kind in ("cache", "encoding_cache"):  # 2 steps x 2 pairs x 2 images, no VAE or text encoder either
        assert metrics[-1][f"{kind}_misses"] == 0 and metrics[-1][f"{kind}_hits"] == 8
    uncached, cached = unet_weights(tmp_path / "uncached"), unet_weights(tmp_path / "cached")
    assert changed(unet_weights(tiny_sdxl_path), cached)
    assert changed(uncached, cached) == []


def test_diffusion_dpo_from_cached_encodings_trains_exactly_like_computing_them(tiny_sdxl_path, pairs_dir, tmp_path):
    """The fair opponent: Diffusion-DPO reads latents and caption embeddings from the cache (its maths unchanged)."""
    args = ["--loss_type", "diffusion_dpo", "--learning_rate", "1e-4", "--inversion_cache_dir", str(tmp_path / "cache")]
    launch(base_args(tiny_sdxl_path, pairs_dir, tmp_path / "cold", *args))
    launch(base_args(tiny_sdxl_path, pairs_dir, tmp_path / "warm", *args))
    cold, warm = read_metrics(tmp_path / "cold")[-1], read_metrics(tmp_path / "warm")[-1]
    assert (cold["encoding_cache_misses"], warm["encoding_cache_misses"], warm["encoding_cache_hits"]) == (8, 0, 8)
    assert cold["cache_hits"] == cold["cache_misses"] == 0  # no trajectories for a noising form
    assert len(list((tmp_path / "cache").rglob("*.safetensors"))) == 8  # the images of the 2 steps' pairs
    assert changed(unet_weights(tmp_path / "cold"), unet_weights(tmp_path / "warm")) == []
    assert changed(unet_weights(tiny_sdxl_path), unet_weights(tmp_path / "warm"))


def sdxl_sh(env, *flags):
    command = ["bash", str(ROOT / "sdxl.sh"), "--report_to", "none", *flags]
    return subprocess.run(command, cwd=ROOT, env={**ENV, "ACCELERATE_ARGS": "--cpu --num_processes 1", **env},
                          capture_output=True, text=True, timeout=600)


def test_sdxl_sh_runs_the_released_recipe_with_overrides(tiny_sdxl_path, pairs_dir, tmp_path):
    env = {"MODEL_NAME": tiny_sdxl_path, "VAE": "", "VARIANT": "", "DATASET_NAME": str(pairs_dir / "pairs.jsonl"),
           "OUTPUT_DIR": str(tmp_path), "RESOLUTION": "64", "NUM_INFERENCE_STEPS": "3", "MAX_TRAIN_STEPS": "2",
           "LR_WARMUP_STEPS": "0"}
    result = sdxl_sh(env, "--learning_rate", "1e-5", "--dataloader_num_workers", "0", "--cache_dir", str(tmp_path))
    assert result.returncode == 0, result.stderr[-4000:]
    config = json.loads((tmp_path / "training_config.json").read_text())
    expected = dict(mixed_precision="bf16", use_adafactor=True, scale_lr=True, gradient_checkpointing=True,
                    beta_dpo=None, relative_beta=40.0, inversion_guidance_scale=2.0,
                    lr_scheduler="constant_with_warmup", checkpointing_steps=200, loss_type="inversion_dpo_x0",
                    sdxl=True, learning_rate=1e-5, num_inference_steps=3, resolution=64, loss_timesteps=1,
                    loss_timestep_sampling="stratified")
    assert {key: config[key] for key in expected} == expected  # one loss step per block of about 10: 1 of 3
    betas = {row["beta"] for row in read_metrics(tmp_path)}  # the rule's beta, set once from the first batch
    assert len(betas) == 1 and 0 < betas.pop() < float("inf")
    assert (tmp_path / "unet" / "diffusion_pytorch_model.safetensors").exists()


def test_sdxl_sh_stops_at_once_when_the_dataset_is_gone(tiny_sdxl_path, tmp_path):
    env = {"MODEL_NAME": tiny_sdxl_path, "VAE": "", "VARIANT": "", "OUTPUT_DIR": str(tmp_path)}
    result = sdxl_sh(env)  # the default dataset, yuvalkirstain/pickapic_v2, offline here as it is gone from the hub
    assert result.returncode != 0
    assert "pickapic_v2" in result.stderr and 'docs/data.md ("Preference data")' in result.stderr
    assert "Loading weights" not in result.stderr  # no model was loaded first


# ---------------------------------------------------------------------------------------------------------------
# Bad configuration: fails before any model loads, naming the flag
# ---------------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("extra, message", [
    (["--resolution", "60"], "--resolution 60 must be a positive multiple of 8"),
    (["--num_inference_steps", "0"], "--num_inference_steps 0 must be from 1 to 1000"),
    (["--num_inference_steps", "1001"], "--num_inference_steps 1001 must be from 1 to 1000"),
    (["--rank", "4"], "--rank given without --use_lora"),
    (["--lora_alpha", "4", "--lora_target_modules", "to_q"], "--lora_alpha, --lora_target_modules given without"),
    (["--loss_type", "ipo"], "argument --loss_type: invalid choice: 'ipo'"),
    (["--trajectory_chunk_size", "0"], "give a whole number of steps, at least 1, or auto"),
    (["--trajectory_chunk_size", "some"], "give a whole number of steps, at least 1, or auto"),
    (["--memory_limit_gib", "0"], "--memory_limit_gib must be positive"),
    (["--peak_tflops", "-1"], "--peak_tflops must be positive"),
    (["--profile_step", "0"], "--profile_step counts optimiser steps from 1"),
    (["--loss_timesteps", "81"], "--loss_timesteps 81 must be from 1 to --num_inference_steps (80)"),
    (["--fill_inversion_cache"], "--fill_inversion_cache needs --inversion_cache_dir"),
    (["--loss_timestep_sampling", "weighted"], "draws the steps of --loss_timesteps M; give --loss_timesteps too"),
    (["--loss_type", "sft", "--loss_timesteps", "2"], "--loss_type sft draws one noise level per pair itself"),
    (["--loss_type", "inversion_dpo", "--loss_guidance_scale", "1"], "drop --loss_guidance_scale or use"),
    (["--torch_compile_mode", "max-autotune"], "--torch_compile_mode given without --torch_compile"),
    (["--torch_compile", "--torch_compile_backend", "eager", "--torch_compile_mode", "max-autotune"],
     "--torch_compile_mode applies to the inductor backend only"),
])
def test_bad_configuration_names_the_flag(extra, message, capsys):
    from train_inversion_dpo import parse_args

    with pytest.raises(SystemExit):
        parse_args(["--pretrained_model_name_or_path", "unused", "--dataset_name", "unused", *extra])
    assert message in capsys.readouterr().err


def test_missing_dataset_flag_is_named(capsys):
    from train_inversion_dpo import parse_args

    with pytest.raises(SystemExit):
        parse_args(["--pretrained_model_name_or_path", "unused"])
    assert "no dataset: give --dataset_name" in capsys.readouterr().err


def test_out_of_memory_names_the_flags_that_reduce_memory(tiny_sdxl_path, pairs_dir, tmp_path, monkeypatch):
    import train_inversion_dpo
    import training

    def out_of_memory(*args, **kwargs):
        raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 20.00 GiB")

    monkeypatch.setattr(training, "policy_errors", out_of_memory)  # in the loss pass
    args = train_inversion_dpo.parse_args(base_args(tiny_sdxl_path, pairs_dir, tmp_path))
    with pytest.raises(SystemExit) as error:
        train_inversion_dpo.main(args)
    assert "out of memory at step 1 (phase loss pass)" in str(error.value)
    assert "--trajectory_chunk_size" in str(error.value) and "--gradient_checkpointing" in str(error.value)


def test_a_run_ends_with_a_model_card_and_pushes_to_the_hub_when_asked(tiny_sdxl_path, pairs_dir, tmp_path,
                                                                          monkeypatch):
    import huggingface_hub

    import train_inversion_dpo

    calls = []
    monkeypatch.setattr(huggingface_hub, "create_repo", lambda name, **kw: calls.append(("create", name, kw)) or
                        type("Repo", (), {"repo_id": f"someone/{name}"})())
    monkeypatch.setattr(huggingface_hub, "upload_folder", lambda **kw: calls.append(("upload", kw)))
    args = train_inversion_dpo.parse_args(base_args(
        tiny_sdxl_path, pairs_dir, tmp_path / "run", "--push_to_hub", "--hub_model_id", "my-dpo",
        "--validation_prompts", "a red square", "--validation_steps", "2", "--validation_num_inference_steps", "2"))
    train_inversion_dpo.main(args)
    assert calls[0][:2] == ("create", "my-dpo")
    upload = calls[1][1]
    assert calls[1][0] == "upload" and upload["repo_id"] == "someone/my-dpo"
    assert upload["folder_path"] == str(tmp_path / "run") and "checkpoint-*" in upload["ignore_patterns"]
    card = (tmp_path / "run" / "README.md").read_text()
    last = read_metrics(tmp_path / "run")[-1]
    for text in (tiny_sdxl_path, "inversion_dpo_x0", "| optimiser steps | 2 |", "| beta | 50 |", "pairs.jsonl",
                 f"loss {last['loss']:.4g}", "validation/step-000002.png", "UNet2DConditionModel.from_pretrained", 'subfolder="unet"'):
        assert text in card, text
    # a LoRA run's card loads the adapters onto the base pipeline
    lora = train_inversion_dpo.parse_args(base_args(tiny_sdxl_path, pairs_dir, tmp_path / "run", "--use_lora"))
    lora_card = train_inversion_dpo.model_card(lora, "sdxl", tmp_path / "run")
    assert "pipe.load_lora_weights" in lora_card and "- lora" in lora_card and "LoRA rank | 8" in lora_card


def test_hub_flags_are_checked():
    from train_inversion_dpo import parse_args

    common = ["--pretrained_model_name_or_path", "unused", "--dataset_name", "unused"]
    with pytest.raises(SystemExit):
        parse_args([*common, "--hub_model_id", "x"])  # without --push_to_hub
    with pytest.raises(SystemExit):
        parse_args([*common, "--push_to_hub", "--hub_token", "t", "--report_to", "wandb"])  # would log the token
