"""Shared fixtures: tiny SDXL-, SD1.x-, SD3- and FLUX-shaped pipelines built by `tiny_models`, saved once per test
session."""

import os
import sys

import pytest

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
os.environ.setdefault("HF_HUB_OFFLINE", "1")
# transformers warns at import that torchvision is absent (the image processors it would use are not needed here)
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")

import torch  # noqa: E402

from tiny_models import save_tiny_pipeline  # noqa: E402

if os.environ.get("PYTEST_XDIST_WORKER"):
    # `-n 2` on 2 cores: one thread per worker and per process it starts, instead of each taking every core
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    torch.set_num_threads(1)


@pytest.fixture(scope="session")
def tiny_sdxl_path(tmp_path_factory):
    return save_tiny_pipeline("sdxl", str(tmp_path_factory.mktemp("tiny-sdxl")))


@pytest.fixture(scope="session")
def tiny_sd_path(tmp_path_factory):
    return save_tiny_pipeline("sd", str(tmp_path_factory.mktemp("tiny-sd")))


@pytest.fixture(scope="session")
def sdxl_pipe(tiny_sdxl_path):
    from diffusers import StableDiffusionXLPipeline

    return StableDiffusionXLPipeline.from_pretrained(tiny_sdxl_path)


@pytest.fixture(scope="session")
def sd_pipe(tiny_sd_path):
    from diffusers import StableDiffusionPipeline

    return StableDiffusionPipeline.from_pretrained(tiny_sd_path)


@pytest.fixture(scope="session")
def tiny_sd3_path(tmp_path_factory):
    return save_tiny_pipeline("sd3", str(tmp_path_factory.mktemp("tiny-sd3")))


@pytest.fixture(scope="session")
def tiny_flux_path(tmp_path_factory):
    return save_tiny_pipeline("flux", str(tmp_path_factory.mktemp("tiny-flux")))


@pytest.fixture(scope="session")
def sd3_pipe(tiny_sd3_path):
    from diffusers import StableDiffusion3Pipeline

    return StableDiffusion3Pipeline.from_pretrained(tiny_sd3_path)


@pytest.fixture(scope="session")
def flux_pipe(tiny_flux_path):
    from diffusers import FluxPipeline

    return FluxPipeline.from_pretrained(tiny_flux_path)


def pytest_configure(config):
    config.addinivalue_line("markers", "slow: over about 20 s on the 2-core machine; `pytest -m 'not slow'` skips "
                                       "them for a quick inner loop (CI runs everything)")


# the longest tests (minutes each on the 2-core machine): their modules start first of all
LONGEST = ("test_efficiency.py::", "test_toy.py::test_alignment_study", "test_toy.py::test_flow_alignment",
           "test_scaling.py::test_deepspeed")


def pytest_collection_modifyitems(config, items):
    """The modules of the longest tests first, then the other modules with slow tests, then the rest; each module's
    tests stay together and in their order (a module-scoped fixture is set up once per worker). With `-n 2` each
    worker's first share of the tests is fixed at the start (every other test of the list): a minutes-long test drawn
    near the end would run alone while the other worker idles."""
    def rank(item):
        if any(part in item.nodeid for part in LONGEST):
            return 0
        return 1 if item.get_closest_marker("slow") else 2

    modules = {}
    for item in items:
        modules[item.nodeid.split("::")[0]] = min(rank(item), modules.get(item.nodeid.split("::")[0], 2))
    order = {module: position for position, module in enumerate(sorted(modules, key=modules.get))}
    items[:] = sorted(items, key=lambda item: order[item.nodeid.split("::")[0]])
