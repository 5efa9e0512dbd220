"""benchmarks/trainer_gpu.py (issue 22's GPU table) on tiny models on the CPU: a row per run with the table's fields,
and a row for a run that fails, with its error and phase. benchmarks/full_models.py builds the real shapes."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "benchmarks"))


@pytest.mark.slow
def test_the_table_writes_a_row_per_run_and_a_row_for_a_failure(tmp_path):
    results = tmp_path / "rows.jsonl"
    env = {**os.environ, "PATH": f"{Path(sys.executable).parent}:{os.environ['PATH']}"}  # accelerate for the recipes

    def table(*flags):
        subprocess.run([sys.executable, str(ROOT / "benchmarks" / "trainer_gpu.py"), "--tiny", "--work_dir",
                        str(tmp_path / "work"), "--results", str(results), *flags],
                       check=True, cwd=ROOT, env=env, capture_output=True, text=True, timeout=900)

    table("--rows", "sdxl_full", "--steps", "2")
    table("--rows", "sd3_lora", "--timeout", "1", "--steps", "1")  # killed at once: a failure row, written all the same
    ok, failed = [json.loads(line) for line in results.read_text().splitlines()]
    for row in (ok, failed):
        assert {"run", "device", "peak_reserved_bytes", "peak_allocated_bytes", "seconds_per_step", "mfu",
                "error"} <= set(row)
    assert ok["run"] == "sdxl_full" and ok["error"] is None and ok["device"] == "cpu"
    assert ok["seconds_per_step"] > 0 and ok["budget_bytes"] > 0
    assert ok["peak_reserved_bytes"] is None and ok["mfu"] is None  # unknown on a CPU, not guessed
    assert {p["phase"] for p in ok["phases"]} >= {"model load", "reference load", "inversion", "loss pass",
                                                   "backward", "optimiser step"}
    assert "sdxl.sh" in ok["command"] and ok["profile"]["step"] == 2 and ok["profile"]["top"]
    assert failed["run"] == "sd3_lora" and failed["error"] == "timed out" and failed["phase"]


def test_the_full_sized_models_have_the_real_parameter_counts():
    import full_models

    expected = {  # millions: the released models' published counts (SDXL UNet 2.6B, FLUX.1 12B, T5-XXL encoder 4.7B)
        "sdxl": {"unet": 2567, "text_encoder": 123, "text_encoder_2": 695, "vae": 84},
        "sd3": {"text_encoder": 124, "text_encoder_2": 695, "text_encoder_3": 4762, "vae": 84},
        "flux": {"transformer": 11901, "text_encoder": 123, "text_encoder_2": 4762, "vae": 84},
    }
    for kind, counts in expected.items():
        with torch.device("meta"):  # shapes only, no memory
            pipeline = full_models.build_full_pipeline(kind)
        for name, millions in counts.items():
            count = sum(p.numel() for p in getattr(pipeline, name).parameters())
            assert round(count / 1e6) == millions, (kind, name, count)
