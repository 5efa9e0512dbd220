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


@pytest.mark.parametrize("task", ["colour", "warmcool"])
def test_pairs_rank_the_captions_preferred_colour_first_and_the_swapped_manifest_the_other(tmp_path, task):
    manifest = toy_task.build_pairs(tmp_path / "pairs", count=6, task=task)
    rows = [json.loads(line) for line in manifest.read_text().splitlines()]
    swapped = [json.loads(line) for line in (manifest.parent / "pairs_swapped.jsonl").read_text().splitlines()]
    expected = {"colour": {"a square": True}, "warmcool": {"a warm square": True, "a cool square": False}}[task]
    assert len(rows) == len(swapped) == 6 and {row["caption"] for row in rows} == set(expected)
    from PIL import Image

    def red(row, column):
        return toy_task.is_red(toy_task.to_tensor([Image.open(manifest.parent / row[column]).convert("RGB")])).item()

    for row, other in zip(rows, swapped):
        assert red(row, "chosen") == expected[row["caption"]] and red(row, "rejected") != expected[row["caption"]]
        assert (other["caption"], other["chosen"], other["rejected"]) == (row["caption"], row["rejected"], row["chosen"])


def test_preference_measure_counts_each_captions_preferred_colour():
    rng = np.random.default_rng(0)
    red, blue = (toy_task.to_tensor([toy_task.render(c, rng)]) for c in ("red", "blue"))
    images = torch.cat([red, red, blue, blue])
    captions = ["a warm square", "a cool square", "a warm square", "a cool square"]
    assert toy_task.prefers(images, captions, "warmcool").tolist() == [True, False, False, True]
    assert toy_task.prefers(images, ["a square"] * 4, "colour").tolist() == [True, True, False, False]
    assert toy_task.task_captions("warmcool", 3) == ["a warm square", "a cool square", "a warm square"]
    with pytest.raises(ValueError, match="unknown toy task 'shape'"):
        toy_task.task_captions("shape", 2)


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
    # a folder built with other settings is built again, not reused
    assert toy_task._atomic_folder(tmp_path / "model", build, {"unet_steps": 350}) == folder and len(calls) == 2
    assert json.loads((folder / toy_task.COMPLETE).read_text())["unet_steps"] == 350
    toy_task._atomic_folder(tmp_path / "model", build, {"unet_steps": 350})
    assert len(calls) == 2


def test_demo_refuses_an_unwritable_output_location(tmp_path):
    blocker = tmp_path / "a-file"
    blocker.write_text("not a folder")
    result = subprocess.run(["bash", str(ROOT / "demo.sh")], env={**os.environ, "DEMO_DIR": str(blocker / "demo")},
                            capture_output=True, text=True, timeout=60)
    assert result.returncode == 1
    assert f"cannot write to {blocker / 'demo'}; set DEMO_DIR to a writable folder" in result.stderr


@pytest.mark.slow
def test_alignment_study_quick_run_writes_its_outputs(tmp_path):
    # one inversion form and the baseline: the smoke run is about the script (every form trains in test_train.py)
    results = tmp_path / "results"
    command = [sys.executable, str(ROOT / "benchmarks" / "alignment.py"), "--quick", "--forms", "inversion_dpo_x0",
               "diffusion_dpo", "--work_dir", str(tmp_path / "work"), "--results_dir", str(results)]
    subprocess.run(command, check=True, cwd=ROOT, capture_output=True, text=True, timeout=900)
    numbers = json.loads((results / "alignment_quick.json").read_text())
    assert set(numbers["rows"]) == {"inversion_dpo_x0, official weights", "diffusion_dpo"}
    for row in numbers["rows"].values():
        for task in ("colour",):  # the smoke run's one task
            summary = row[task]
            # the effect is the 'for' rate minus the 'against' rate, seed by seed
            assert summary["effects"] == pytest.approx([f - a for f, a in zip(summary["rate_for"],
                                                                                 summary["rate_against"])])
            assert all(0 <= rate <= 1 for rate in summary["rate_for"] + summary["rate_against"])
    runs = numbers["runs"]
    assert all(name.split("-")[-1] in ("for", "against") for name in runs)
    table = (results / "alignment_quick.md").read_text()
    assert "| inversion_dpo_x0, official weights |" in table and "| diffusion_dpo |" in table
    from PIL import Image

    assert Image.open(results / "alignment_quick.png").size[0] > 0
    # resumable: a second invocation reuses every finished run (no training, no measuring)
    started = {p: p.stat().st_mtime for p in (tmp_path / "work" / "runs").glob("*/record.json")}
    subprocess.run(command, check=True, cwd=ROOT, capture_output=True, text=True, timeout=300)
    # the per-timestep decomposition reads the study's runs
    subprocess.run([sys.executable, str(ROOT / "benchmarks" / "why.py"), "--quick", "--work_dir", str(tmp_path / "work"),
                    "--results_dir", str(results)], check=True, cwd=ROOT, capture_output=True, text=True, timeout=300)
    why = json.loads((results / "why_quick.json").read_text())
    entry = why["inversion_dpo_x0, official weights"]["for"]
    assert len(entry["winner"]) == len(entry["loser"]) == 10
    assert entry["S_w"] == pytest.approx(sum(entry["winner"]), rel=1e-5, abs=1e-9)
    assert set(why["diffusion_dpo"]["for"]) == {"noising"}
    assert started and {p: p.stat().st_mtime for p in (tmp_path / "work" / "runs").glob("*/record.json")} == started


@pytest.mark.slow
def test_flow_alignment_quick_run_writes_its_outputs(tmp_path):
    # the rectified-flow study's smoke run: an SD3-shaped toy trained by flow matching, both forms for and against
    results = tmp_path / "results"
    command = [sys.executable, str(ROOT / "benchmarks" / "flow_alignment.py"), "--quick", "--work_dir",
               str(tmp_path / "work"), "--results_dir", str(results)]
    subprocess.run(command, check=True, cwd=ROOT, capture_output=True, text=True, timeout=900)
    numbers = json.loads((results / "flow_alignment_quick.json").read_text())
    assert set(numbers["forms"]) == {"inversion_dpo_x0", "diffusion_dpo", "inversion_dpo_x0_rule"}
    rule = numbers["forms"]["inversion_dpo_x0_rule"]  # no --beta_dpo: the trainer's rule set one beta per run
    assert rule["beta"] is None and rule["beta_used"] and all(0 < b < float("inf") for b in rule["beta_used"])
    for row in numbers["forms"].values():
        assert row["per_seed"] == pytest.approx([f - a for f, a in zip(row["rates"]["for"], row["rates"]["against"])])
        assert [point["step"] for point in row["curve"]] == [2, 4]
    assert "| inversion_dpo_x0 |" in (results / "flow_alignment_quick.md").read_text()
    from PIL import Image

    assert Image.open(results / "flow_alignment_quick.png").size[0] > 0


def test_the_warmcool_toy_leans_its_captions_to_their_colours_and_leaves_the_others_alone(tmp_path):
    # 4000 latents whose first value says which they are; even ones are red squares
    latents = torch.arange(4000.0).reshape(4000, 1, 1, 1).expand(4000, 4, 2, 2).contiguous()
    red = torch.arange(4000) % 2 == 0
    generator = torch.Generator().manual_seed(0)
    x0 = latents[torch.randint(0, 4000, (6000,), generator=generator)]
    picks = torch.arange(6000) % 4  # "a square", "a warm square", "a cool square", unconditional (index 3)
    leaned = toy_task.lean_to_captions(x0, picks, latents, red, generator)
    is_red = leaned[:, 0, 0, 0].long() % 2 == 0
    assert (leaned == leaned[:, :1, :1, :1]).all()  # whole latents, not mixed ones
    assert torch.equal(leaned[picks % 3 == 0], x0[picks % 3 == 0])  # "a square" and unconditional rows untouched
    for index, caption in ((1, "a warm square"), (2, "a cool square")):
        rate, n = is_red[picks == index].float().mean().item(), int((picks == index).sum())
        p = toy_task.CAPTION_LEAN[caption]
        assert abs(rate - p) < 4 * (p * (1 - p) / n) ** 0.5  # 4 binomial standard deviations
        assert set(leaned[picks == index, 0, 0, 0].tolist()) <= set(latents[:, 0, 0, 0].tolist())
    assert toy_task.model_folder(tmp_path, "warmcool") == tmp_path / "model_warmcool"
    assert toy_task.model_folder(tmp_path, "colour", "pairs") == tmp_path / "pairs"
