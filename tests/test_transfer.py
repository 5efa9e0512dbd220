"""benchmarks/transfer.py: its rows, its wrong-way count and its tables, on made-up run records (the study itself
takes half an hour; its smoke run is `python benchmarks/transfer.py --quick`)."""

import json
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "benchmarks"))

import transfer  # noqa: E402
from alignment import name_of  # noqa: E402


class FakeStudy:
    steps, curve, samples, seeds, batch = 4, [2, 4], 256, [0, 1, 2], 8


def records_for(config, task, rates_for, rates_against):
    spec = {k: v for k, v in config.items() if k != "name"}
    records = {}
    for seed, (rate_for, rate_against) in enumerate(zip(rates_for, rates_against)):
        for direction, rate in (("for", rate_for), ("against", rate_against)):
            metrics = {str(s): {"elapsed_s": float(s), "score_w": 0.1, "score_l": 0.3, "saturated": 0.5, "beta": 40.0}
                       for s in FakeStudy.curve}
            measures = {f"rate:{s}:0:256": {"rate": rate} for s in FakeStudy.curve}
            measures["final"] = {"heldout_loss": 0.1 + seed, "heldout_implicit_accuracy": 0.75}
            records[name_of({**spec, "task": task, "seed": seed, "direction": direction})] = {
                "metrics": metrics, "measures": measures}
    return records


def test_rows_carry_the_issues_fields_and_the_effect_is_for_minus_against(tmp_path):
    config = transfer.RECOMMENDED[0]
    records = records_for(config, "count", [0.9, 0.8, 0.7], [0.1, 0.2, 0.5])
    base = {"count": {"rate": 0.5, "heldout_loss": 0.12}}
    row = transfer.summarise(FakeStudy, records, config, "count", base)
    for key in ("property", "configuration", "effect", "interval", "for_rate", "against_rate", "base_rate",
                "heldout_loss"):
        assert key in row
    assert row["configuration"].startswith(config["loss"])
    assert row["effects"] == pytest.approx([80.0, 60.0, 20.0])
    assert row["effect"] == pytest.approx(160 / 3)
    # 95% t-interval, 2 degrees of freedom: 4.303 * sd / sqrt(3), sd of (80, 60, 20) = 30.55
    assert row["interval"] == pytest.approx(4.303 * 30.5505 / 3 ** 0.5, rel=1e-4)
    assert row["heldout_loss"] == pytest.approx(1.1)  # mean over the six runs: (0.1 + 1.1 + 2.1) x 2 / 6
    assert row["base_rate"] == 50.0
    transfer.write([row], FakeStudy, tmp_path / "transfer", "title")
    assert json.loads((tmp_path / "transfer.json").read_text())[0]["property"] == "count"
    assert "| 90/80/70 | 10/20/50 | 0, 0 |" in (tmp_path / "transfer.md").read_text()


def test_wrong_way_counts_sides_beyond_two_binomial_standard_errors_of_the_base():
    # base 50%, 256 samples: 2 standard errors = 6.25 points
    row = {"base_rate": 50.0, "for_rate": [90.0, 44.0, 43.0], "against_rate": [10.0, 56.0, 57.0]}
    assert transfer.wrong_way(row) == {"for": 1, "against": 1}
