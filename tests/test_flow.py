"""Rectified-flow inversion (METHOD.md section 7): schedule, Euler inversion, anchored target and weights, checked
against diffusers' FlowMatchEulerDiscreteScheduler and the formulas written out here."""

import math

import pytest
import torch
from diffusers import FlowMatchEulerDiscreteScheduler

import losses
from inversion import FlowSchedule, anchored_velocity, euler_step, invert_path

SD3_CONFIG = {"num_train_timesteps": 1000, "shift": 3.0}
FLUX_CONFIG = {"num_train_timesteps": 1000, "shift": 1.0, "use_dynamic_shifting": True, "base_shift": 0.5,
               "max_shift": 1.15, "base_image_seq_len": 256, "max_image_seq_len": 4096}


def velocity_field(seed=0, channels=4):
    """A fixed nonlinear v(x, t) standing in for a guided transformer call."""
    generator = torch.Generator().manual_seed(seed)
    weight = torch.randn(channels, channels, generator=generator) / channels
    bias = torch.randn(channels, 1, 1, generator=generator)

    def velocity(x, timesteps):
        mixed = torch.einsum("oc,bchw->bohw", weight, x)
        return torch.tanh(mixed) + bias * (timesteps / 1000).reshape(-1, 1, 1, 1)

    return velocity


@pytest.mark.parametrize("config, mu", [(SD3_CONFIG, None), (FLUX_CONFIG, 0.9)])
def test_schedule_is_the_samplers_sigmas_run_upward(config, mu):
    scheduler = FlowMatchEulerDiscreteScheduler.from_config(config)
    scheduler.set_timesteps(7, mu=mu)
    schedule = FlowSchedule.from_scheduler_config(config, 7, mu=mu)
    assert schedule.num_steps == 7
    assert torch.equal(schedule.sigmas, scheduler.sigmas.float().flip(0))
    # the model is called at the sampler's own timesteps, in the opposite order
    torch.testing.assert_close(schedule.timesteps, scheduler.timesteps.float().flip(0), rtol=0, atol=1e-3)


def test_dynamic_shifting_needs_the_pipelines_mu():
    with pytest.raises(ValueError, match="pass the pipeline's mu"):
        FlowSchedule.from_scheduler_config(FLUX_CONFIG, 4)


def test_inversion_is_upward_euler_steps_and_the_sampler_steps_back_to_x0():
    torch.manual_seed(0)
    velocity = velocity_field()
    x0 = torch.randn(3, 4, 8, 8)
    schedule = FlowSchedule.from_scheduler_config(SD3_CONFIG, 6)
    points, velocities = invert_path(velocity, x0, schedule)
    assert points.shape == (3, 7, 4, 8, 8) and velocities.shape == (3, 6, 4, 8, 8)
    # written out: v_i = v(x_{i-1}, sigma_i T); x_i = x_{i-1} + (sigma_i - sigma_{i-1}) v_i
    sigmas = schedule.sigmas.tolist()
    x = x0.clone()
    for i in range(1, 7):
        v = velocity(x, torch.full((3,), sigmas[i] * 1000))
        assert torch.equal(velocities[:, i - 1], v)
        x = x + (sigmas[i] - sigmas[i - 1]) * v
        assert torch.equal(points[:, i], x)
    # diffusers' sampler, fed the stored velocities from the top, walks back down to x_0
    scheduler = FlowMatchEulerDiscreteScheduler.from_config(SD3_CONFIG)
    scheduler.set_timesteps(6)
    sample = points[:, -1]
    for k, t in enumerate(scheduler.timesteps):
        sample = scheduler.step(velocities[:, 5 - k], t, sample).prev_sample
    # 6 float32 additions of terms no larger than the points themselves
    bound = 6 * torch.finfo(torch.float32).eps * points.abs().max()
    assert (sample - x0).abs().max() <= bound
    assert torch.equal(euler_step(points[:, 1], velocities[:, 0], sigmas[1], sigmas[0]),
                       points[:, 1] - sigmas[1] * velocities[:, 0])


def test_anchored_velocity_rebuilds_each_point_from_x0():
    torch.manual_seed(1)
    schedule = FlowSchedule.from_scheduler_config(SD3_CONFIG, 5)
    points, _ = invert_path(velocity_field(1), torch.randn(2, 4, 4, 4), schedule)
    target = anchored_velocity(points, schedule.sigmas)
    for i in range(1, 6):
        sigma = schedule.sigmas[i]
        noise = target[:, i - 1] + points[:, 0]  # eps^_i = v^_i + x_0
        rebuilt = (1 - sigma) * points[:, 0] + sigma * noise
        torch.testing.assert_close(rebuilt, points[:, i], rtol=0, atol=8 * torch.finfo(torch.float32).eps)


def test_flow_weights_match_the_ddpm_official_weight_at_the_same_snr():
    sigmas = torch.tensor([0.1, 0.5, 0.9])
    weights = losses.flow_timestep_weights(sigmas, "official")
    for sigma, weight in zip(sigmas.tolist(), weights.tolist()):
        snr = (1 - sigma) ** 2 / sigma**2
        alpha = snr / (1 + snr)  # the DDPM level of that SNR
        epsilon_weight = 1 / (2 * alpha)  # the official DDPM weight
        assert weight == pytest.approx(epsilon_weight * (1 - sigma) ** 2, rel=1e-6)
    assert weights[1].item() == pytest.approx(0.25)  # sigma 0.5: ((0.5)^2 + (0.5)^2) / 2, by hand
    assert torch.equal(losses.flow_timestep_weights(sigmas, "uniform"), torch.ones(3))
    assert math.isclose(losses.flow_timestep_weights(torch.tensor([0.0]), "official").item(), 0.5)


def test_forward_process_and_its_velocity_target():
    torch.manual_seed(2)
    x0, noise = torch.randn(3, 4, 2, 2), torch.randn(3, 4, 2, 2)
    sigmas = torch.tensor([0.0, 0.25, 1.0])
    from inversion import flow_forward

    noisy = flow_forward(x0, noise, sigmas)
    assert torch.equal(noisy[0], x0[0]) and torch.equal(noisy[2], noise[2])
    torch.testing.assert_close(noisy[1], 0.75 * x0[1] + 0.25 * noise[1], rtol=0, atol=0)
    # one Euler step down with the true velocity eps - x_0 lands on x_0 exactly (up to rounding)
    back = euler_step(noisy[1:2], noise[1:2] - x0[1:2], 0.25, 0.0)
    torch.testing.assert_close(back, x0[1:2], rtol=0, atol=4 * torch.finfo(torch.float32).eps * x0.abs().max().item())


def test_logit_normal_sigmas_follow_the_density():
    from inversion import logit_normal_sigmas

    sigmas = logit_normal_sigmas(20000, torch.Generator().manual_seed(0))
    assert 0 < sigmas.min() and sigmas.max() < 1
    logits = torch.log(sigmas / (1 - sigmas))
    assert abs(logits.mean().item()) < 0.03 and abs(logits.std().item() - 1) < 0.03  # 20000 draws: SE 0.007
