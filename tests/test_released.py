"""Reproducing the released run: --loss_type inversion_dpo_official with --inversion_steps_offset 0 computes the
released script's loss and gradient (its DDIM schedule with steps_offset 0, its sign), written out here.

The UNets run in float64 on both sides, and the written-out DDIM step does its float32 operations in the library's
order: a float32 UNet call on more images or steps rounds differently from one on fewer, by an amount that depends on
the CPU's kernels, and the loss magnifies any rounding (beta / 2 times a small difference of errors) and carries it
along the trajectory: in float32 the trainer and the written-out computation differed by up to 7.7e-5 of the loss and
2.1e-5 of the gradient across CPU kernels. In float64 that rounding (about 1e-16) vanishes under the float32 casts of
the predictions, which both sides make. What remains is float32 arithmetic on the same numbers, summed in another
order: each score S (a weighted mean of N errors) is good to a few ulps, and beta / 2 magnifies that in the margins,
where S_w and S_l nearly cancel; the loss and the gradient's relative size move by at most the margins' change."""

import copy

import pytest
import torch
import torch.nn.functional as F
from accelerate import Accelerator
from test_losses import perturbed

from inversion import InversionSchedule
from models import PromptEncoder
from losses import timestep_weights
from training import Reference, invert_pairs, inversion_scheduler_config, trajectory_loss
from train_inversion_dpo import parse_args

N, BETA, G = 10, 500.0, 2.0
CAPTIONS = ["a red square", "a blue circle"]


def trainer_args(*extra):
    return parse_args(["--pretrained_model_name_or_path", "unused", "--dataset_name", "unused", "--loss_type",
                       "inversion_dpo_official", "--num_inference_steps", str(N), "--beta_dpo", str(BETA),
                       "--inversion_guidance_scale", str(G), "--trajectory_chunk_size", str(N), *extra])


def setup(sdxl_pipe):
    encoder = PromptEncoder([sdxl_pipe.tokenizer, sdxl_pipe.tokenizer_2],
                            [sdxl_pipe.text_encoder, sdxl_pipe.text_encoder_2])
    cond = encoder.encode(CAPTIONS, [[64, 64]] * 2, [[0, 0]] * 2, (64, 64))
    generator = torch.Generator().manual_seed(1)
    winners, losers = torch.randn(2, 2, 4, 8, 8, generator=generator)
    return cond, encoder.unconditional(cond), winners, losers


@pytest.fixture(scope="module")
def unet64(sdxl_pipe):
    return copy.deepcopy(sdxl_pipe.unet).double()


def trainer_loss_and_gradient(args, sdxl_pipe, policy, reference_unet):
    """The trainer's own code: its schedule from the flags, its inversion, its loss and backward."""
    cond, uncond, winners, losers = setup(sdxl_pipe)
    config = inversion_scheduler_config(args, sdxl_pipe.scheduler.config)
    schedule = InversionSchedule.from_scheduler_config(config, N)
    weights = timestep_weights(schedule.alphas[1:], args.timestep_weighting)
    both = type(cond).cat([cond, cond]), type(uncond).cat([uncond, uncond])
    reference = Reference(load=lambda: reference_unet)
    trajectories = invert_pairs(args, reference, torch.cat([winners, losers]), *both, schedule, cache=None)
    policy.zero_grad(set_to_none=True)
    output = trajectory_loss(args, Accelerator(cpu=True), policy, trajectories, *both, weights, generator=None)
    return output.loss.item(), torch.cat([p.grad.flatten() for p in policy.parameters()]), schedule


def released_loss_and_gradient(sdxl_pipe, policy, images_per_call, reference):
    """The released script's computation written out: DDIM with steps_offset 0 (tau_i = 0, 100, ..., 900), the level
    before tau_1 = 0 being a(0) (set_alpha_to_one False), guidance g with zero unconditional embeddings, D_i at
    x_{i-1}, w_i = 1 / (2 a(tau_i)), loss = -log sigmoid(+beta/2 (S_w - S_l)). `images_per_call` 1 or 2 changes only
    how the UNet calls are batched (the rounding), not the maths."""
    cond, uncond, winners, losers = setup(sdxl_pipe)
    alpha_bar = torch.cumprod(1 - torch.linspace(0.00085**0.5, 0.012**0.5, 1000) ** 2, 0)
    taus = list(range(0, 1000, 1000 // N))

    def guided(model, x, tau, rows):  # both halves taken as float32, as the trainer takes them
        c, u = cond.select(rows), uncond.select(rows)
        t, dtype = torch.full((len(x),), tau), next(model.parameters()).dtype
        e_c = model(x.to(dtype), t, **c.unet_kwargs(dtype)).sample.float()
        e_u = model(x.to(dtype), t, **u.unet_kwargs(dtype)).sample.float()
        return e_u + G * (e_c - e_u)

    def score(x0, rows):
        x, total = x0, 0.0
        for tau in taus:
            a_prev, a = alpha_bar[max(tau - 1000 // N, 0)], alpha_bar[tau]
            with torch.no_grad():
                e = guided(reference, x, tau, rows)
            error = ((guided(policy, x, tau, rows) - e) ** 2).flatten(1).mean(1)
            total = total + error / (2 * a)
            x = a.sqrt() * ((x - (1 - a_prev).sqrt() * e) / a_prev.sqrt()) + (1 - a).sqrt() * e
        return total / N

    policy.zero_grad(set_to_none=True)
    groups = [slice(0, 2)] if images_per_call == 2 else [slice(0, 1), slice(1, 2)]
    scores_w, scores_l = (torch.cat(s) for s in zip(*[(score(winners[rows], rows), score(losers[rows], rows))
                                                     for rows in groups]))
    margins = BETA / 2 * (scores_w - scores_l)
    loss = -F.logsigmoid(margins).mean()
    loss.backward()
    return loss.item(), torch.cat([p.grad.flatten() for p in policy.parameters()]), (scores_w, scores_l)


def test_released_form_with_steps_offset_0_is_the_released_formula(sdxl_pipe, unet64):
    args = trainer_args("--inversion_steps_offset", "0")
    policy = perturbed(unet64)
    loss, gradient, schedule = trainer_loss_and_gradient(args, sdxl_pipe, policy, unet64)
    assert schedule.timesteps.tolist() == list(range(0, 1000, 100)) and gradient.dtype == torch.float64
    released = [released_loss_and_gradient(sdxl_pipe, policy, images, unet64) for images in (1, 2)]
    # The rounding scale: the same released computation batched two ways.
    loss_rounding = abs(released[0][0] - released[1][0])
    gradient_rounding = (released[0][1] - released[1][1]).norm() / released[0][1].norm()
    released_loss, released_gradient, (scores_w, scores_l) = released[0]
    # 8 float32 ulps of the scores, through beta / 2 (see the module's docstring)
    margin_rounding = BETA / 2 * (scores_w.abs() + scores_l.abs()).max().item() * 8 * torch.finfo(torch.float32).eps
    assert released_gradient.norm() > 0
    assert abs(loss - released_loss) <= max(8 * loss_rounding, margin_rounding)
    gradient_difference = ((gradient - released_gradient).norm() / released_gradient.norm()).item()
    assert gradient_difference <= max(8 * gradient_rounding, margin_rounding)

    # The model's own config (steps_offset 1: 1, 101, ..., 901) is a different run, far beyond rounding.
    default_loss, default_gradient, default_schedule = trainer_loss_and_gradient(trainer_args(), sdxl_pipe, policy,
                                                                                 unet64)
    assert default_schedule.timesteps.tolist() == list(range(1, 1000, 100))
    assert abs(default_loss - released_loss) > 100 * max(loss_rounding, margin_rounding)


def test_steps_offset_overrides_only_the_inversion_config(sdxl_pipe):
    """The inversion schedule and the cache key take the flag; the model's own config (validation sampling) keeps its value."""
    config = inversion_scheduler_config(trainer_args("--inversion_steps_offset", "0"), sdxl_pipe.scheduler.config)
    assert config["steps_offset"] == 0 and sdxl_pipe.scheduler.config["steps_offset"] == 1
    assert inversion_scheduler_config(trainer_args(), sdxl_pipe.scheduler.config)["steps_offset"] == 1
