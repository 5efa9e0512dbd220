"""Start-up output: the two warnings every launch printed about parts the project never uses are gone (startup.py),
in every entry point, and a real warning from the same loggers still shows."""

import importlib.util
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PROGRAM = """
import logging, sys
import torch
if sys.argv[1] == "quiet":
    import startup
from diffusers import AutoencoderKL, StableDiffusionPipeline, StableDiffusionXLPipeline
AutoencoderKL(block_out_channels=(8,), norm_num_groups=8).to("cpu", dtype=torch.float32)
logging.getLogger("transformers.utils.import_utils").warning("a real transformers warning")
logging.getLogger("diffusers.models.modeling_utils").warning("a real diffusers warning")
"""


def run(mode):
    env = {k: v for k, v in os.environ.items() if k != "TRANSFORMERS_VERBOSITY"}
    result = subprocess.run([sys.executable, "-c", PROGRAM, mode], cwd=ROOT, env=env, capture_output=True, text=True,
                            timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    return result.stderr


def test_unused_image_processor_and_empty_float32_warnings_are_dropped_and_real_ones_kept():
    quiet = run("quiet")
    assert "requires torchvision" not in quiet and "kept in float32: []" not in quiet
    assert "a real transformers warning" in quiet and "a real diffusers warning" in quiet


@pytest.mark.skipif(importlib.util.find_spec("torchvision") is not None,
                    reason="with torchvision installed transformers has nothing to warn about")
def test_without_the_filter_the_warnings_do_appear():
    loud = run("loud")  # the control: the program above does trigger both warnings
    assert "requires torchvision" in loud and "kept in float32: []" in loud


ENTRY_POINTS = ["train_inversion_dpo.py", "toy_task.py", "evaluate.py", "tiny_models.py",
                *sorted(str(p.relative_to(ROOT)) for p in (ROOT / "benchmarks").glob("*.py"))]


@pytest.mark.slow
@pytest.mark.parametrize("entry", ENTRY_POINTS)
def test_every_entry_point_starts_without_the_two_warnings(entry):
    env = {k: v for k, v in os.environ.items() if k != "TRANSFORMERS_VERBOSITY"}
    result = subprocess.run([sys.executable, entry, "--help"], cwd=ROOT, env=env, capture_output=True, text=True,
                            timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    assert "requires torchvision" not in result.stderr and "kept in float32: []" not in result.stderr
