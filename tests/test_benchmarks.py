"""benchmarks/step_bench.py runs every schedule and writes the JSON lines its README table is made from."""

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "benchmarks"))


def test_step_bench_writes_one_json_line_per_configuration(tmp_path):
    out = tmp_path / "steps.jsonl"
    # --stop_when_fits: N = 4 runs, so N = 3 is never tried
    subprocess.run([sys.executable, str(ROOT / "benchmarks" / "step_bench.py"), "--inversion_steps", "4", "3",
                    "--stop_when_fits", "--steps", "1", "--json", str(out)], check=True, cwd=ROOT,
                   capture_output=True, text=True, timeout=600)
    rows = [json.loads(line) for line in out.read_text().splitlines()]
    assert [(row["mode"], row["N"]) for row in rows] == [("released", 4), ("uncached", 4), ("cached", 4)]
    for row in rows:
        assert {"mode", "N", "seconds_per_step", "peak_memory_bytes", "unet_calls", "device"} <= set(row)
        assert row["seconds_per_step"] > 0 and row["peak_memory_bytes"] > 0 and row["flops_per_step"] > 0
    calls = {(row["mode"], row["N"]): row["unet_calls"] for row in rows}
    # released: N inversion calls + one policy call holding every step; uncached (K = 1): N inversion calls, then
    # N policy calls without and N with gradient; cached: no inversion
    assert calls[("released", 4)] == 4 + 1
    assert calls[("uncached", 4)] == 4 + 4 + 4
    assert calls[("cached", 4)] == 4 + 4


@pytest.mark.parametrize("mode", ["released", "uncached", "cached"])
def test_flop_counts_are_linear_in_n_and_leave_out_recomputation(tmp_path, mode):
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


def test_step_bench_imports_without_the_data_stack():
    # The step benchmark runs on GPU images that lack datasets and pyarrow: the trainer imports data.py in main().
    code = ("import sys; sys.modules['datasets'] = None; sys.modules['pyarrow'] = None; "
            "sys.path.insert(0, 'benchmarks'); import step_bench, train_inversion_dpo")
    subprocess.run([sys.executable, "-c", code], check=True, cwd=ROOT, capture_output=True, text=True, timeout=120)


@pytest.mark.parametrize("config", ["tiny_sd3", "tiny_flux"])
def test_step_bench_runs_the_flow_transformers(tmp_path, config):
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
