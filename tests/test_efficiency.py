"""benchmarks/efficiency.py --quick runs every stage (fills, candidates, report) and writes its tables and numbers."""

import json
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.slow
def test_quick_efficiency_study_writes_its_tables(tmp_path):
    results = tmp_path / "results"
    subprocess.run([sys.executable, str(ROOT / "benchmarks" / "efficiency.py"), "--quick", "--work_dir",
                    str(tmp_path / "work"), "--results_dir", str(results)], check=True, cwd=ROOT, capture_output=True,
                   text=True, timeout=600)
    summary = json.loads((results / "efficiency_quick.json").read_text())
    # one fill per toy and (loss, N): the anchored form at N = 10 and 20 (the quick candidates'), Diffusion-DPO's
    assert sorted(summary["fill_seconds"]) == sorted(f"{toy}/{fill}" for toy in ("colour", "flow") for fill in
                                                     ("inversion_dpo_x0/N10", "inversion_dpo_x0/N20",
                                                      "diffusion_dpo/N10"))
    assert summary["cold_runs"] == []  # every run trained from a warm cache
    # the seconds come from one timing per configuration and toy (the quick study's 3 configurations each; a quick
    # run reads each configuration's candidate run instead of training a timing run apart)
    assert summary["timing_rounds"] == 1 and len(summary["timing"]) == 6
    for toy in ("colour", "flow"):
        rows = summary["report"][toy]
        roles = {role for row in rows.values() for role in row["roles"]}
        assert {"Diffusion-DPO", "all steps", "chosen"} <= roles
        assert "diffusion_dpo" in rows and "inversion_dpo_x0, all N = 10 steps" in rows
        for name, row in rows.items():
            assert [point["step"] for point in row["curve"]] == [1, 2]
            assert [point["pairs"] for point in row["curve"]] == [8, 16]
            assert row["seconds"] > 0 and row["fill_seconds"] > 0 and row["heldout_loss"] > 0
            assert name == "diffusion_dpo" or {"goal", "break_even"} <= set(row)
    markdown = (results / "efficiency_quick.md").read_text()
    for heading in ("1. Cache fills", "2. Candidates", "3. Report", "The goal", "End to end"):
        assert heading in markdown
    # which anchored candidate is chosen: in a quick run every effect is 0, so the fastest, which the load decides
    assert "| colour | inversion_dpo_x0, " in markdown
    assert "| flow | diffusion_dpo | " in markdown
    assert (results / "efficiency_quick.png").stat().st_size > 0
