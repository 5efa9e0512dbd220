"""benchmarks/step_bench.py runs every schedule and writes the JSON lines its README table is made from."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "benchmarks"))


@pytest.fixture
def one_thread():
    # the in-process steps are tiny: on shared cores two threads mostly wait for each other (FLOPs do not change)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def run_step_bench(out, *flags, check=True):
    # one thread per process: the step's own work is tiny, and two threads on shared cores mostly wait for each other
    env = {**os.environ, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}
    done = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "step_bench.py"), "--steps", "1",
                           "--json", str(out), *flags], check=check, cwd=ROOT, capture_output=True, text=True,
                          timeout=600, env=env)
    return done if not check else [json.loads(line) for line in out.read_text().splitlines()]


@pytest.mark.slow
def test_step_bench_writes_one_json_line_per_configuration(tmp_path):
    # --stop_when_fits: N = 4 runs, so N = 3 is never tried
    rows = run_step_bench(tmp_path / "steps.jsonl", "--inversion_steps", "4", "3", "--stop_when_fits")
    assert [(row["mode"], row["N"]) for row in rows] == [("released", 4), ("uncached", 4), ("cached", 4)]
    for row in rows:
        assert {"mode", "N", "seconds_per_step", "peak_memory_bytes", "unet_calls", "device"} <= set(row)
        assert (row["loss_type"], row["loss_timesteps"]) == ("inversion_dpo", None)  # the README tables' form
        assert row["seconds_per_step"] > 0 and row["peak_memory_bytes"] > 0 and row["flops_per_step"] > 0
    calls = {(row["mode"], row["N"]): row["unet_calls"] for row in rows}
    # released: N inversion calls + one policy call holding every step; uncached (K = 1): N inversion calls, then
    # N policy calls without and N with gradient; cached: no inversion
    assert calls[("released", 4)] == 4 + 1
    assert calls[("uncached", 4)] == 4 + 4 + 4
    assert calls[("cached", 4)] == 4 + 4


@pytest.mark.parametrize("mode", ["released", "uncached", "cached"])
def test_flop_counts_are_linear_in_n_and_leave_out_recomputation(tmp_path, mode, one_thread):
    # step_bench counts FLOPs on a step at N' = 2 and scales them by N / N': check that against a direct count. With
    # gradient checkpointing, model FLOPs must equal the FLOPs of the same step without it (counted independently),
    # and the executed FLOPs exceed them by the recomputed forward passes.
    from step_bench import Bench

    bench = Bench("tiny", mode, cache_dir=str(tmp_path), gradient_checkpointing=True)
    if mode == "cached":
        bench.fill(2)
        bench.fill(4)
        bench.reference_unet = None  # a warm cache must not need the reference
    model_2, executed_2 = bench.count_flops(2)
    model_4, executed_4 = bench.count_flops(4)
    assert (model_4, executed_4) == (2 * model_2, 2 * executed_2)
    bench.unwrapped.disable_gradient_checkpointing()
    plain_model, plain_executed = bench.count_flops(2)
    assert plain_model == plain_executed == model_2
    assert model_2 < executed_2 < 2 * model_2


@pytest.mark.slow
def test_step_bench_measures_diffusion_dpo_and_the_anchored_form_at_m_steps(tmp_path):
    # Diffusion-DPO's step (mode noising) against the anchored form with a warm cache, at every step and at M = 2
    # stratified steps with loss guidance 1: the rows of issue 20, on the tiny model
    (noising,) = run_step_bench(tmp_path / "dpo.jsonl", "--loss_type", "diffusion_dpo")
    assert {key: noising[key] for key in ("mode", "N", "loss_type", "loss_timesteps", "loss_timestep_sampling",
                                          "loss_guidance_scale", "trajectory_chunk_size")} == {
        "mode": "noising", "N": None, "loss_type": "diffusion_dpo", "loss_timesteps": None,
        "loss_timestep_sampling": None, "loss_guidance_scale": None, "trajectory_chunk_size": None}
    assert noising["unet_calls"] == 1 + 1  # the policy and the frozen reference, each once on the winner and loser
    assert noising["seconds_per_step"] > 0 and noising["flops_per_step"] > 0
    anchored = ["--loss_type", "inversion_dpo_x0", "--modes", "cached", "--inversion_steps", "4"]
    (m_steps,) = run_step_bench(tmp_path / "m.jsonl", *anchored, "--loss_timesteps", "2",
                                "--loss_timestep_sampling", "stratified", "--loss_guidance_scale", "1")
    (every,) = run_step_bench(tmp_path / "all.jsonl", *anchored)
    assert {key: m_steps[key] for key in ("mode", "N", "loss_type", "loss_timesteps", "loss_timestep_sampling",
                                          "loss_guidance_scale", "trajectory_chunk_size", "flops_counted_at_N")} == {
        "mode": "cached", "N": 4, "loss_type": "inversion_dpo_x0", "loss_timesteps": 2,
        "loss_timestep_sampling": "stratified", "loss_guidance_scale": 1.0, "trajectory_chunk_size": 1,
        "flops_counted_at_N": 4}  # M steps: counted at the real N, not scaled from N' = 2
    assert (every["loss_type"], every["loss_timesteps"], every["loss_timestep_sampling"],
            every["loss_guidance_scale"]) == ("inversion_dpo_x0", None, None, 2.0)
    # warm cache, K = 1: the policy alone (the reference's errors come from the cache), at the 2 drawn steps without
    # gradient and then with it; every step: at all 4
    assert m_steps["unet_calls"] == 2 + 2
    assert every["unet_calls"] == 4 + 4
    assert m_steps["flops_per_step"] < every["flops_per_step"]
    # 2 of the 4 steps, one pass per point instead of guidance's two: a quarter
    assert m_steps["flops_per_step"] * 4 == every["flops_per_step"]
    # per pair, M = 2 at K = 1 is 2 forwards and 2 forward-backwards of the policy; Diffusion-DPO one forward-backward
    # and one reference forward: exactly twice its FLOPs
    assert m_steps["flops_per_step"] == 2 * noising["flops_per_step"]


def test_step_bench_refuses_modes_that_do_not_apply(tmp_path):
    done = run_step_bench(tmp_path / "x.jsonl", "--loss_type", "diffusion_dpo", "--modes", "cached", check=False)
    assert done.returncode == 2 and "use --modes noising" in done.stderr
    done = run_step_bench(tmp_path / "x.jsonl", "--loss_type", "inversion_dpo_x0", "--modes", "released", check=False)
    assert done.returncode == 2 and "--modes uncached --chunk 0" in done.stderr
    # the trainer's own checks run before any model is built
    done = run_step_bench(tmp_path / "x.jsonl", "--loss_type", "inversion_dpo_x0", "--inversion_steps", "4",
                          "--loss_timesteps", "5", check=False)
    assert done.returncode == 2 and "--loss_timesteps 5 must be from 1" in done.stderr
    assert not (tmp_path / "x.jsonl").exists()


def test_anchored_flops_are_linear_in_n_but_not_at_m_steps(tmp_path, one_thread):
    # Every step evaluated, the anchored form's uncached FLOPs (inversion, the reference's N error calls, the policy)
    # are linear in N, so counting at N' = 2 and scaling holds; at M steps the cached step costs the same at every N
    # and the uncached one grows only by the inversion's part, which is why step_bench counts those at the real N.
    from step_bench import Bench, warmup_steps

    bench = Bench("tiny", "uncached", loss_type="inversion_dpo_x0")
    model_2, executed_2 = bench.count_flops(2)
    assert bench.count_flops(4) == (2 * model_2, 2 * executed_2)
    cached = Bench("tiny", "cached", cache_dir=str(tmp_path), loss_type="inversion_dpo_x0", loss_timesteps=2,
                   loss_timestep_sampling="stratified", loss_guidance_scale=1)
    for n in (2, 4):
        cached.fill(n)
    cached.reference_unet = None  # a warm cache must not need the reference
    assert cached.count_flops(2) == cached.count_flops(4)
    assert warmup_steps(80, "inversion_dpo", None) == 2 and warmup_steps(80, "inversion_dpo_x0", 4) == 80
    assert warmup_steps(None, "diffusion_dpo", None) is None


def test_step_bench_imports_without_the_data_stack():
    # The step benchmark runs on GPU images that lack datasets and pyarrow: the trainer imports data.py in main().
    code = ("import sys; sys.modules['datasets'] = None; sys.modules['pyarrow'] = None; "
            "sys.path.insert(0, 'benchmarks'); import step_bench, train_inversion_dpo")
    subprocess.run([sys.executable, "-c", code], check=True, cwd=ROOT, capture_output=True, text=True, timeout=120)


@pytest.mark.parametrize("config", ["tiny_sd3", "tiny_flux"])
def test_step_bench_runs_the_flow_transformers(tmp_path, config, one_thread):
    # the SD3- and FLUX-sized configurations are these code paths with the real models' shapes (GPU only)
    from step_bench import Bench

    bench = Bench(config, "cached", cache_dir=str(tmp_path), gradient_checkpointing=True)
    bench.fill(2)
    bench.reference_unet = None  # a warm cache must not need the reference
    calls = {"count": 0}
    bench.unwrapped.register_forward_hook(lambda *_: calls.__setitem__("count", calls["count"] + 1))
    before = [p.detach().clone() for p in bench.unwrapped.parameters()]
    model_flops, executed_flops = bench.count_flops(2)
    assert calls["count"] == 2 + 2  # K = 1: the 2 policy calls without gradient, then the 2 with
    assert 0 < model_flops < executed_flops  # gradient checkpointing recomputes the forward passes
    assert any(not torch.equal(a, b) for a, b in zip(before, bench.unwrapped.parameters()))


def test_a_failed_configuration_row_says_what_failed_and_where():
    from step_bench import failure_row

    oom = ("PHASE model and optimiser built\nPHASE FLOP-counting warm-up step at N = 2\nTraceback (most recent call last):\n"
           "torch.OutOfMemoryError: CUDA out of memory. Tried to allocate 50.00 MiB. GPU 0 has a total capacity of "
           "79.18 GiB of which 46.19 MiB is free.\n")
    row = failure_row("cached", 10, oom)
    assert row["error"] == "out of memory" and row["phase"] == "FLOP-counting warm-up step at N = 2"
    assert row["oom_detail"].startswith("torch.OutOfMemoryError: CUDA out of memory. Tried to allocate 50.00 MiB")
    other = failure_row("uncached", 4, "PHASE timed steps at N = 4\nRuntimeError: shapes differ\n  more context\n")
    assert other == {"mode": "uncached", "N": 4, "error": "RuntimeError: shapes differ", "phase": "timed steps at N = 4"}
