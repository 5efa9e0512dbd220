"""Reproducing the released run: --loss_type inversion_dpo_official with --inversion_steps_offset 0 computes the
released script's loss and gradient (its DDIM schedule with steps_offset 0, its sign), written out here."""


import torch
import torch.nn.functional as F
from accelerate import Accelerator
from test_losses import perturbed

from inversion import InversionSchedule, PromptEncoder
from losses import timestep_weights
from train_inversion_dpo import Reference, invert_pairs, inversion_scheduler_config, parse_args, trajectory_loss

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


def trainer_loss_and_gradient(args, sdxl_pipe, policy):
    """The trainer's own code: its schedule from the flags, its inversion, its loss and backward."""
    cond, uncond, winners, losers = setup(sdxl_pipe)
    config = inversion_scheduler_config(args, sdxl_pipe.scheduler.config)
    schedule = InversionSchedule.from_scheduler_config(config, N)
    weights = timestep_weights(schedule.alphas[1:], args.timestep_weighting)
    both = type(cond).cat([cond, cond]), type(uncond).cat([uncond, uncond])
    reference = Reference(load=lambda: sdxl_pipe.unet)
    trajectories = invert_pairs(args, reference, torch.cat([winners, losers]), *both, schedule, cache=None)
    policy.zero_grad(set_to_none=True)
    output = trajectory_loss(args, Accelerator(cpu=True), policy, trajectories, *both, weights, generator=None)
    return output.loss.item(), torch.cat([p.grad.flatten() for p in policy.parameters()]), schedule


def released_loss_and_gradient(sdxl_pipe, policy, images_per_call):
    """The released script's computation written out: DDIM with steps_offset 0 (tau_i = 0, 100, ..., 900), the level
    before tau_1 = 0 being a(0) (set_alpha_to_one False), guidance g with zero unconditional embeddings, D_i at
    x_{i-1}, w_i = 1 / (2 a(tau_i)), loss = -log sigmoid(+beta/2 (S_w - S_l)). `images_per_call` 1 or 2 changes only
    how the UNet calls are batched (the rounding), not the maths."""
    cond, uncond, winners, losers = setup(sdxl_pipe)
    reference = sdxl_pipe.unet
    alpha_bar = torch.cumprod(1 - torch.linspace(0.00085**0.5, 0.012**0.5, 1000) ** 2, 0)
    taus = list(range(0, 1000, 1000 // N))

    def guided(model, x, tau, rows):
        c, u = cond.select(rows), uncond.select(rows)
        t = torch.full((len(x),), tau)
        e_c = model(x, t, **c.unet_kwargs(torch.float32)).sample
        e_u = model(x, t, **u.unet_kwargs(torch.float32)).sample
        return e_u + G * (e_c - e_u)

    def score(x0, rows):
        x, total = x0, 0.0
        for tau in taus:
            a_prev, a = alpha_bar[max(tau - 1000 // N, 0)], alpha_bar[tau]
            with torch.no_grad():
                e = guided(reference, x, tau, rows)
            error = ((guided(policy, x, tau, rows) - e) ** 2).flatten(1).mean(1)
            total = total + error / (2 * a)
            x = a.sqrt() * (x - (1 - a_prev).sqrt() * e) / a_prev.sqrt() + (1 - a).sqrt() * e
        return total / N

    policy.zero_grad(set_to_none=True)
    groups = [slice(0, 2)] if images_per_call == 2 else [slice(0, 1), slice(1, 2)]
    margins = torch.cat([BETA / 2 * (score(winners[rows], rows) - score(losers[rows], rows)) for rows in groups])
    loss = -F.logsigmoid(margins).mean()
    loss.backward()
    return loss.item(), torch.cat([p.grad.flatten() for p in policy.parameters()])


def test_released_form_with_steps_offset_0_is_the_released_formula(sdxl_pipe):
    args = trainer_args("--inversion_steps_offset", "0")
    policy = perturbed(sdxl_pipe.unet)
    loss, gradient, schedule = trainer_loss_and_gradient(args, sdxl_pipe, policy)
    assert schedule.timesteps.tolist() == list(range(0, 1000, 100))
    released = [released_loss_and_gradient(sdxl_pipe, policy, images) for images in (1, 2)]
    # The rounding scale: the same released computation batched two ways.
    loss_rounding = abs(released[0][0] - released[1][0])
    gradient_rounding = (released[0][1] - released[1][1]).norm() / released[0][1].norm()
    released_loss, released_gradient = released[0]
    assert released_gradient.norm() > 0
    assert abs(loss - released_loss) <= max(8 * loss_rounding, 1e-6 * abs(released_loss))
    assert (gradient - released_gradient).norm() / released_gradient.norm() <= max(8 * gradient_rounding, 1e-5)

    # The model's own config (steps_offset 1: 1, 101, ..., 901) is a different run, far beyond rounding.
    default_loss, default_gradient, default_schedule = trainer_loss_and_gradient(trainer_args(), sdxl_pipe, policy)
    assert default_schedule.timesteps.tolist() == list(range(1, 1000, 100))
    assert abs(default_loss - released_loss) > 100 * max(loss_rounding, 1e-6 * abs(released_loss))


def test_steps_offset_overrides_only_the_inversion_config(sdxl_pipe):
    """The inversion schedule and the cache key take the flag; the model's own config (validation sampling) keeps its value."""
    config = inversion_scheduler_config(trainer_args("--inversion_steps_offset", "0"), sdxl_pipe.scheduler.config)
    assert config["steps_offset"] == 0 and sdxl_pipe.scheduler.config["steps_offset"] == 1
    assert inversion_scheduler_config(trainer_args(), sdxl_pipe.scheduler.config)["steps_offset"] == 1
