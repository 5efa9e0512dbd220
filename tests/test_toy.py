"""The toy task, demo.sh's guards and the alignment benchmark's smoke run."""

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

import toy_task

ROOT = Path(__file__).resolve().parents[1]


def test_preference_measure_tells_red_from_blue():
    rng = np.random.default_rng(0)
    red = toy_task.to_tensor([toy_task.render("red", rng) for _ in range(8)])
    blue = toy_task.to_tensor([toy_task.render("blue", rng) for _ in range(8)])
    assert red.shape == (8, 3, 32, 32) and red.min() >= -1 and red.max() <= 1
    assert toy_task.is_red(red).all() and not toy_task.is_red(blue).any()
    # a square is (220, 40, 40) on (128, 128, 128): red minus blue is positive exactly where the square is
    pixel = red[0].permute(1, 2, 0).reshape(-1, 3)
    square = (pixel[:, 0] - pixel[:, 2]) > 0
    assert torch.allclose(pixel[square][0], (torch.tensor([220.0, 40.0, 40.0]) / 127.5 - 1))
    assert 100 <= int(square.sum()) <= 256  # a side of 10 to 16 pixels


def test_pairs_rank_red_above_blue(tmp_path):
    manifest = toy_task.build_pairs(tmp_path / "pairs", count=4)
    rows = [json.loads(line) for line in manifest.read_text().splitlines()]
    assert len(rows) == 4 and all(row["caption"] == toy_task.CAPTION for row in rows)
    from PIL import Image

    for row in rows:
        winner = toy_task.to_tensor([Image.open(manifest.parent / row["chosen"]).convert("RGB")])
        loser = toy_task.to_tensor([Image.open(manifest.parent / row["rejected"]).convert("RGB")])
        assert toy_task.is_red(winner).item() and not toy_task.is_red(loser).item()


def test_an_interrupted_build_is_never_reused_and_a_complete_one_always_is(tmp_path):
    calls = []

    def interrupted(scratch):
        (scratch / "half-written").write_text("x")
        raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        toy_task._atomic_folder(tmp_path / "model", interrupted)
    assert not (tmp_path / "model").exists()

    def build(scratch):
        calls.append(scratch)
        (scratch / "weights").write_text("ok")

    folder = toy_task._atomic_folder(tmp_path / "model", build)
    assert (folder / "weights").read_text() == "ok" and not (folder / "half-written").exists()
    assert toy_task._atomic_folder(tmp_path / "model", build) == folder and len(calls) == 1


def test_demo_refuses_an_unwritable_output_location(tmp_path):
    blocker = tmp_path / "a-file"
    blocker.write_text("not a folder")
    result = subprocess.run(["bash", str(ROOT / "demo.sh")], env={**os.environ, "DEMO_DIR": str(blocker / "demo")},
                            capture_output=True, text=True, timeout=60)
    assert result.returncode == 1
    assert f"cannot write to {blocker / 'demo'}; set DEMO_DIR to a writable folder" in result.stderr


def test_alignment_benchmark_quick_run_writes_its_outputs(tmp_path):
    results = tmp_path / "results"
    # two of the five forms (every form trains in tests/test_train.py): the smoke run is about the script
    forms = ["inversion_dpo", "diffusion_dpo"]
    subprocess.run([sys.executable, str(ROOT / "benchmarks" / "alignment.py"), "--quick", "--forms", *forms,
                    "--work_dir", str(tmp_path / "work"), "--results_dir", str(results)], check=True, cwd=ROOT,
                   capture_output=True, text=True, timeout=600)
    table = (results / "alignment_quick.md").read_text()
    for form in forms:
        assert f"| {form} |" in table
    numbers = json.loads((results / "alignment_quick.json").read_text())
    assert set(numbers["runs"]) == set(forms)
    assert all(0 <= point["preference_rate"] <= 1 for runs in numbers["runs"].values() for run in runs
               for point in run)
    from PIL import Image

    assert Image.open(results / "alignment_quick.png").size == (1100, 520)
