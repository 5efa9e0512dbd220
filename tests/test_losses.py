"""losses.py: values, gradients and signs against the method spec's formulas written out here."""

import copy
import math

import pytest
import torch
import torch.nn.functional as F
from diffusers import DDIMInverseScheduler

from inversion import InversionSchedule, PromptEncoder, ddim_invert, forward_noise, predict_on_trajectory
from losses import (
    diffusion_dpo,
    inversion_dpo,
    inversion_dpo_exact,
    inversion_dpo_official,
    preference_loss,
    sft,
    squared_error,
    timestep_weights,
)

BETA = 500.0
G = 2.0
CAPTIONS = ["red square", "blue circle", "a green star"]


@pytest.fixture(scope="module")
def setup(sdxl_pipe):
    """Winner/loser trajectories of 3 pairs, each pair its own caption, inverted by the reference UNet."""
    torch.manual_seed(0)
    encoder = PromptEncoder([sdxl_pipe.tokenizer, sdxl_pipe.tokenizer_2], [sdxl_pipe.text_encoder, sdxl_pipe.text_encoder_2])
    cond = encoder.encode(CAPTIONS, [[64, 64]] * 3, [[0, 0]] * 3, (64, 64))
    uncond = encoder.unconditional(cond)
    schedule = InversionSchedule.from_scheduler_config(sdxl_pipe.scheduler.config, 4)
    reference = sdxl_pipe.unet
    invert = lambda z: ddim_invert(reference, z, cond, uncond, schedule, G, with_noise_at_end=True)  # noqa: E731
    winners, losers = invert(torch.randn(3, 4, 8, 8)), invert(torch.randn(3, 4, 8, 8))
    return dict(cond=cond, uncond=uncond, schedule=schedule, reference=reference, winners=winners, losers=losers,
                weights=timestep_weights(schedule.alphas[1:], "official"))


def perturbed(unet, scale=3e-3, seed=0):
    policy = copy.deepcopy(unet)
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in policy.parameters():
            p.add_(scale * torch.randn(p.shape, generator=generator))
    return policy


def paper_errors(policy, s, select=slice(None), chunk_size=1):
    """D_i for winners and losers, (B, N) each."""
    cond, uncond = s["cond"].select(select), s["uncond"].select(select)
    errors = []
    for trajectory in (s["winners"].select(select), s["losers"].select(select)):
        prediction = predict_on_trajectory(policy, trajectory, cond, uncond, G, chunk_size=chunk_size)
        errors.append(squared_error(prediction, trajectory.noise, batch_dims=2))
    return errors


def exact_errors(policy, s, select=slice(None)):
    """E_i(theta) and E_i(ref) for winners and losers."""
    cond, uncond = s["cond"].select(select), s["uncond"].select(select)
    out = []
    for trajectory in (s["winners"].select(select), s["losers"].select(select)):
        prediction = predict_on_trajectory(policy, trajectory, cond, uncond, G, at="end")
        out += [squared_error(prediction, trajectory.noise, 2), squared_error(trajectory.noise_at_end, trajectory.noise, 2)]
    return out  # policy_w, reference_w, policy_l, reference_l


def dpo_loss(form, policy, s, select=slice(None)):
    if form == "exact":
        return inversion_dpo_exact(*exact_errors(policy, s, select), s["weights"], BETA)
    errors_w, errors_l = paper_errors(policy, s, select)
    loss_fn = inversion_dpo if form == "paper" else inversion_dpo_official
    return loss_fn(errors_w, errors_l, s["weights"], BETA)


def grad_norm(model):
    return torch.sqrt(sum(p.grad.pow(2).sum() for p in model.parameters() if p.grad is not None))


def test_official_weights_at_80_steps(sdxl_pipe):
    schedule = InversionSchedule.from_scheduler_config(sdxl_pipe.scheduler.config, 80)
    scheduler = DDIMInverseScheduler.from_config(sdxl_pipe.scheduler.config)
    scheduler.set_timesteps(80)
    alphas = scheduler.alphas_cumprod[scheduler.timesteps]
    torch.testing.assert_close(timestep_weights(schedule.alphas[1:], "official"), 1 / (2 * alphas), rtol=0, atol=0)
    # the released code's spelling of the same weight
    torch.testing.assert_close(timestep_weights(alphas, "official"), (1 - alphas) / (2 * (1 - alphas) * alphas))
    assert torch.equal(timestep_weights(alphas, "uniform"), torch.ones(80))


@pytest.mark.parametrize("form", ["paper", "official"])
def test_paper_forms_are_log2_with_exactly_zero_gradient_at_the_reference(setup, form):
    policy = copy.deepcopy(setup["reference"])
    out = dpo_loss(form, policy, setup)
    assert out.loss.item() == pytest.approx(math.log(2), abs=1e-7)
    out.loss.backward()
    assert grad_norm(policy) == 0.0


def test_exact_form_is_log2_with_a_nonzero_gradient_at_the_reference(setup):
    policy = copy.deepcopy(setup["reference"])
    out = dpo_loss("exact", policy, setup)
    assert out.loss.item() == pytest.approx(math.log(2), abs=1e-6)
    out.loss.backward()
    assert grad_norm(policy) > 1e-4


def test_diffusion_dpo_is_log2_with_a_nonzero_gradient_at_the_reference(setup):
    torch.manual_seed(7)
    reference = setup["reference"]
    policy = copy.deepcopy(reference)
    cond = setup["cond"]
    noise = torch.randn(3, 4, 8, 8)  # the same noise and timestep for winner and loser
    timesteps = torch.randint(0, 1000, (3,))
    alpha_bar = torch.cumprod(1 - torch.linspace(0.00085**0.5, 0.012**0.5, 1000) ** 2, 0)
    kwargs = cond.unet_kwargs(torch.float32)
    errors = []
    for x0 in (setup["winners"].latents[:, 0], setup["losers"].latents[:, 0]):
        x_t = forward_noise(x0, noise, alpha_bar[timesteps])
        policy_pred = policy(x_t, timesteps, **kwargs).sample
        with torch.no_grad():
            reference_pred = reference(x_t, timesteps, **kwargs).sample
        errors += [squared_error(policy_pred, noise), squared_error(reference_pred, noise)]
    out = diffusion_dpo(*errors, beta=5000.0)
    assert out.loss.item() == pytest.approx(math.log(2), abs=1e-6)
    out.loss.backward()
    assert grad_norm(policy) > 0


@pytest.mark.parametrize("form, direction", [("paper", -1), ("official", +1)])
def test_one_small_step_moves_the_score_gap_in_the_forms_direction(setup, form, direction):
    policy = perturbed(setup["reference"])
    gap_before = dpo_loss(form, policy, setup)
    gap_before = (gap_before.metrics["score_w"] - gap_before.metrics["score_l"]).item()
    out = dpo_loss(form, policy, setup)
    out.loss.backward()
    norm = grad_norm(policy)
    assert norm > 0
    with torch.no_grad():
        for p in policy.parameters():
            p.sub_(1e-3 * p.grad / norm)
    after = dpo_loss(form, policy, setup)
    gap_after = (after.metrics["score_w"] - after.metrics["score_l"]).item()
    assert (gap_after - gap_before) * direction > 0


def test_exact_gradient_equals_autograd_of_the_formula_written_out(setup):
    reference = setup["reference"]
    policy_lib = perturbed(reference, seed=1)
    policy_hand = copy.deepcopy(policy_lib)
    dpo_loss("exact", policy_lib, setup).loss.backward()

    cond, uncond, schedule = setup["cond"], setup["uncond"], setup["schedule"]
    betas = torch.linspace(0.00085**0.5, 0.012**0.5, 1000) ** 2
    alpha_bar = torch.cumprod(1 - betas, 0)
    losses = []
    for b in range(3):
        scores = []
        for trajectory in (setup["winners"], setup["losers"]):
            total = 0.0
            for i, tau in enumerate(schedule.timesteps.tolist()):
                x_i, e_i = trajectory.latents[b : b + 1, i + 1], trajectory.noise[b : b + 1, i]
                c, u = cond.select(slice(b, b + 1)), uncond.select(slice(b, b + 1))
                t = torch.tensor([tau])

                def guided(model):
                    e_c = model(x_i, t, **c.unet_kwargs(torch.float32)).sample
                    e_u = model(x_i, t, **u.unet_kwargs(torch.float32)).sample
                    return e_u + G * (e_c - e_u)

                with torch.no_grad():
                    ref_error = ((guided(reference) - e_i) ** 2).mean()
                policy_error = ((guided(policy_hand) - e_i) ** 2).mean()
                total = total + (policy_error - ref_error) / (2 * alpha_bar[tau])
            scores.append(total / len(schedule.timesteps))
        losses.append(-F.logsigmoid(-BETA / 2 * (scores[0] - scores[1])))
    (sum(losses) / 3).backward()

    grad_lib = torch.cat([p.grad.flatten() for p in policy_lib.parameters()])
    grad_hand = torch.cat([p.grad.flatten() for p in policy_hand.parameters()])
    assert grad_hand.norm() > 0
    # batched vs one-at-a-time UNet calls round differently: compare the whole gradient vector
    assert (grad_lib - grad_hand).norm() / grad_hand.norm() <= 1e-4


@pytest.mark.parametrize("form", ["paper", "exact"])
def test_batch_of_pairs_with_their_own_captions_is_the_mean_of_single_pair_losses(setup, form):
    policy = perturbed(setup["reference"], seed=2)
    with torch.no_grad():
        batch = dpo_loss(form, policy, setup).loss
        singles = [dpo_loss(form, policy, setup, select=slice(b, b + 1)).loss for b in range(3)]
    assert abs(batch.item() - math.log(2)) > 1e-3  # the perturbation moved the loss off its starting value
    torch.testing.assert_close(batch, torch.stack(singles).mean(), rtol=1e-5, atol=1e-6)


def test_preference_loss_hand_computed_value():
    policy_w = torch.tensor([[0.2, 0.4]])
    policy_l = torch.tensor([[0.1, 0.1]])
    weights = torch.tensor([1.0, 3.0])
    # S_w = (0.2*1 + 0.4*3)/2 = 0.7; S_l = (0.1 + 0.3)/2 = 0.2; margin = -10/2 * 0.5 = -2.5
    out = inversion_dpo(policy_w, policy_l, weights, beta=10.0)
    assert out.metrics["margin"].item() == pytest.approx(-2.5)
    assert out.loss.item() == pytest.approx(math.log1p(math.exp(2.5)))
    assert out.metrics["implicit_accuracy"].item() == 0.0
    official = inversion_dpo_official(policy_w, policy_l, weights, beta=10.0)
    assert official.loss.item() == pytest.approx(math.log1p(math.exp(-2.5)))
    assert official.metrics["implicit_accuracy"].item() == 1.0
    assert sft(torch.tensor([1.0, 3.0])).loss.item() == 2.0


def test_bad_inputs_name_the_problem():
    errors = torch.rand(2, 4)
    with pytest.raises(ValueError, match="unknown timestep weighting 'linear'; choose one of official, uniform"):
        timestep_weights(torch.rand(4), "linear")
    with pytest.raises(ValueError, match=r"shape \(2, 3\); expected \(pairs, steps\) = \(2, 4\)"):
        inversion_dpo(errors, torch.rand(2, 3), torch.ones(4), 1.0)
    with pytest.raises(ValueError, match="give one per step"):
        inversion_dpo(errors, errors, torch.ones(3), 1.0)
    with pytest.raises(ValueError, match="must match"):
        squared_error(torch.rand(2, 4), torch.rand(4, 2))
    with pytest.raises(ValueError, match="beta must be positive"):
        preference_loss(errors, errors, errors, errors, torch.ones(4), 0.0)
    with pytest.raises(ValueError, match=r"\(B,\)"):
        diffusion_dpo(errors, errors, errors, errors, 1.0)
