"""The bill of one training step (benchmarks/step_cost.py) against the trainer's own step with every model's calls
counted: policy passes with and without gradient, reference passes, VAE encodes and captions through each text
encoder, per pair, uncached and with a warm trajectory cache."""

import copy
import sys
from pathlib import Path

import pytest
import torch
from accelerate import Accelerator

from inversion import InversionSchedule, training_alphas
from models import PromptEncoder
from training import Reference, step_weights, training_step
from train_inversion_dpo import parse_args
from trajectory_cache import TrajectoryCache

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))
from step_cost import passes_per_pair  # noqa: E402

PAIRS, N = 2, 4


class Counter:
    """Images through a module's forward, split by whether autograd recorded them."""

    def __init__(self, module):
        self.with_grad = self.without_grad = 0
        module.register_forward_hook(self.hook, with_kwargs=True)

    def hook(self, module, args, kwargs, output):
        first = args[0] if args else next(iter(kwargs.values()))
        if torch.is_grad_enabled():
            self.with_grad += first.shape[0]
        else:
            self.without_grad += first.shape[0]


@pytest.fixture(scope="module")
def models(sdxl_pipe):
    policy, reference = copy.deepcopy(sdxl_pipe.unet), copy.deepcopy(sdxl_pipe.unet)
    vae = copy.deepcopy(sdxl_pipe.vae)
    encoders = [copy.deepcopy(sdxl_pipe.text_encoder), copy.deepcopy(sdxl_pipe.text_encoder_2)]
    prompt_encoder = PromptEncoder([sdxl_pipe.tokenizer, sdxl_pipe.tokenizer_2], encoders)
    generator = torch.Generator().manual_seed(0)
    batch = {"pixel_values_w": torch.rand(PAIRS, 3, 64, 64, generator=generator) * 2 - 1,
             "pixel_values_l": torch.rand(PAIRS, 3, 64, 64, generator=generator) * 2 - 1,
             "captions": ["a red square", "a blue circle"], "row_ids": torch.arange(PAIRS)}
    for role in ("w", "l"):
        batch[f"original_sizes_{role}"] = torch.tensor([[64, 64]] * PAIRS)
        batch[f"crop_top_lefts_{role}"] = torch.tensor([[0, 0]] * PAIRS)
    counters = {"policy": Counter(policy), "reference": Counter(reference), "vae": Counter(vae.encoder),
                "text": Counter(encoders[0]), "text_2": Counter(encoders[1])}
    return dict(policy=policy, reference=reference, vae=vae, prompt_encoder=prompt_encoder, batch=batch,
                counters=counters, scheduler_config=sdxl_pipe.scheduler.config)


def counted_step(models, flags, cache_dir=None):
    """Passes per pair of one training step, counted."""
    args = parse_args(["--pretrained_model_name_or_path", "unused", "--dataset_name", "unused", "--resolution", "64",
                       "--num_inference_steps", str(N), *flags])
    schedule = InversionSchedule.from_scheduler_config(models["scheduler_config"], N)
    cache = None if cache_dir is None else TrajectoryCache(cache_dir, "reference", {"N": N}, "float32",
                                                           encoders={"test": 1})
    for counter in models["counters"].values():
        counter.with_grad = counter.without_grad = 0
    training_step(args, Accelerator(cpu=True), models["policy"], Reference(load=lambda: models["reference"]),
                  models["prompt_encoder"], models["vae"], models["batch"], schedule,
                  step_weights(schedule, "official"), training_alphas(models["scheduler_config"]),
                  torch.Generator().manual_seed(0), cache)
    models["policy"].zero_grad(set_to_none=True)
    counters = models["counters"]
    assert counters["reference"].with_grad == 0 and counters["vae"].with_grad == 0  # frozen models: no graph
    assert counters["text"].with_grad == 0 and counters["text"].without_grad == counters["text_2"].without_grad
    return {"policy": counters["policy"].with_grad / PAIRS, "policy_no_grad": counters["policy"].without_grad / PAIRS,
            "reference": counters["reference"].without_grad / PAIRS, "vae": counters["vae"].without_grad / PAIRS,
            "text": counters["text"].without_grad / PAIRS}


CASES = [  # (loss_type, inversion guidance, loss guidance, M, sampling, K)
    ("inversion_dpo_x0", 2.0, None, None, "uniform", 1),
    ("inversion_dpo_x0", 2.0, 1.0, None, "uniform", N),
    ("inversion_dpo_x0", 2.0, 1.0, 2, "stratified", 2),
    ("inversion_dpo_x0", 1.0, None, 3, "uniform", 1),
    ("inversion_dpo_exact", 2.0, 1.0, None, "uniform", 2),
    ("inversion_dpo", 2.0, None, None, "uniform", N),
    ("inversion_dpo", 1.0, None, 1, "stratified", 1),
    ("diffusion_dpo", 2.0, None, None, "uniform", 1),
    ("sft", 2.0, None, None, "uniform", 1),
]


@pytest.mark.parametrize("loss_type,guidance,loss_guidance,loss_timesteps,sampling,chunk", CASES)
def test_counted_passes_are_the_bill_uncached_and_warm(models, tmp_path, loss_type, guidance, loss_guidance,
                                                       loss_timesteps, sampling, chunk):
    flags = ["--loss_type", loss_type, "--inversion_guidance_scale", str(guidance), "--trajectory_chunk_size",
             str(chunk)]
    if loss_guidance is not None:
        flags += ["--loss_guidance_scale", str(loss_guidance)]
    if loss_timesteps is not None:
        flags += ["--loss_timesteps", str(loss_timesteps), "--loss_timestep_sampling", sampling]
    if loss_type in ("diffusion_dpo", "sft"):
        flags = flags[:2]
    bill = dict(loss_type=loss_type, num_steps=N, guidance=guidance, loss_guidance=loss_guidance,
                loss_timesteps=loss_timesteps, chunk_size=chunk)
    assert counted_step(models, flags) == passes_per_pair(**bill)
    assert counted_step(models, flags, tmp_path) == passes_per_pair(**bill)  # a cold cache: the same work
    warm = counted_step(models, flags, tmp_path)
    assert warm == passes_per_pair(**bill, cached=True)
    assert warm["reference"] == (2 if loss_type == "diffusion_dpo" else 0) and warm["vae"] == warm["text"] == 0
