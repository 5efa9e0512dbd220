"""inversion.py against diffusers and against the method spec's formulas written out here.

Where the library's UNet calls (both guidance halves in one call, several steps or images per call) are compared
with calls written out here (one half, one step at a time), the UNet runs in float64 on both sides: a float32 call
on a batch rounds differently from separate calls, by an amount that depends on the CPU's kernels, while float64
rounding (about 1e-16) vanishes under the float32 casts the library makes of every prediction. What is left is
float32 arithmetic on the same numbers, which rounds the same on every CPU, so the tolerances are a few float32
ulps of the values compared.
"""

import copy

import pytest
import torch
from diffusers import DDIMInverseScheduler, DDPMScheduler, EulerDiscreteScheduler

from inversion import InversionSchedule, ddim_step, forward_noise, invert, predict_on_trajectory
from models import Conditioning, PromptEncoder, guided_noise_prediction, sdxl_time_ids

CAPTIONS = ["a red square", "a blue circle", "green"]


def sdxl_encoder(pipe):
    return PromptEncoder([pipe.tokenizer, pipe.tokenizer_2], [pipe.text_encoder, pipe.text_encoder_2])


def sdxl_conditioning(pipe, captions=CAPTIONS):
    batch = len(captions)
    encoder = sdxl_encoder(pipe)
    cond = encoder.encode(captions, [[64, 64 + 8 * b] for b in range(batch)], [[0, 4 * b] for b in range(batch)], (64, 64))
    return cond, encoder.unconditional(cond)


def guided_by_hand(unet, x, t, cond, uncond, g, dtype=torch.float32):
    """eps~ = e_u + g (e_c - e_u) with two separate UNet calls, in the UNet's dtype; the two predictions are taken
    in `dtype` (float32, as the library takes them) before they are combined."""
    unet_dtype = next(unet.parameters()).dtype
    timesteps = torch.full((x.shape[0],), int(t))
    e_c = unet(x.to(unet_dtype), timesteps, **cond.unet_kwargs(unet_dtype)).sample.to(dtype)
    e_u = unet(x.to(unet_dtype), timesteps, **uncond.unet_kwargs(unet_dtype)).sample.to(dtype)
    return e_u + g * (e_c - e_u)


def float32_ulps(count, *tensors):
    """`count` float32 ulps of the largest magnitude in `tensors`."""
    return count * torch.finfo(torch.float32).eps * max(t.abs().max().item() for t in tensors)


@pytest.fixture(scope="module")
def sdxl_unet64(sdxl_pipe):
    return copy.deepcopy(sdxl_pipe.unet).double()


@pytest.fixture(scope="module")
def sd_unet64(sd_pipe):
    return copy.deepcopy(sd_pipe.unet).double()


def test_sdxl_conditioning_matches_diffusers_pipeline(sdxl_pipe):
    cond, uncond = sdxl_conditioning(sdxl_pipe)
    embeds, negative, pooled, negative_pooled = sdxl_pipe.encode_prompt(
        CAPTIONS, device="cpu", num_images_per_prompt=1, do_classifier_free_guidance=True
    )
    assert torch.equal(cond.prompt_embeds, embeds)
    assert torch.equal(cond.pooled_prompt_embeds, pooled)
    # force_zeros_for_empty_prompt: the unconditional branch is all zeros
    assert torch.equal(uncond.prompt_embeds, negative) and not negative.any()
    assert torch.equal(uncond.pooled_prompt_embeds, negative_pooled)
    # each caption encoded on its own gives the same row: no caption is shared across the batch. A text encoder call
    # on a batch may round differently from one on a single caption, by an amount that depends on the CPU's kernels:
    # that rounding is measured on a batch of three copies of each caption (which no mix-up can change), and the rows
    # must be within twice it, or 4 float32 ulps of their size, while another caption's row is far outside.
    encoder, eps = sdxl_encoder(sdxl_pipe), torch.finfo(torch.float32).eps
    relative_difference = lambda a, b: ((a - b).norm() / b.norm()).item()  # noqa: E731
    singles = [encoder.encode([caption], [[64, 64]], [[0, 0]], (64, 64)).prompt_embeds[0] for caption in CAPTIONS]
    copies = [encoder.encode([caption] * 3, [[64, 64]] * 3, [[0, 0]] * 3, (64, 64)).prompt_embeds[b]
              for b, caption in enumerate(CAPTIONS)]
    tolerance = 2 * max(relative_difference(c, s) for c, s in zip(copies, singles)) + 4 * eps
    for b in range(len(CAPTIONS)):
        assert relative_difference(cond.prompt_embeds[b], singles[b]) <= tolerance
        assert relative_difference(cond.prompt_embeds[b - 1], singles[b]) > 1000 * tolerance


def test_sdxl_time_ids_layout(sdxl_pipe):
    ids = sdxl_time_ids([[512, 768], [1024, 1024]], [[16, 0], [0, 32]], (1024, 1024))
    expected = torch.tensor([[512, 768, 16, 0, 1024, 1024], [1024, 1024, 0, 32, 1024, 1024]], dtype=torch.float32)
    assert torch.equal(ids, expected)
    reference = sdxl_pipe._get_add_time_ids(
        (512, 768), (16, 0), (1024, 1024), dtype=torch.float32,
        text_encoder_projection_dim=sdxl_pipe.text_encoder_2.config.projection_dim,
    )
    assert torch.equal(ids[:1], reference)


def test_sd_conditioning_matches_diffusers_pipeline(sd_pipe):
    encoder = PromptEncoder([sd_pipe.tokenizer], [sd_pipe.text_encoder])
    cond = encoder.encode(CAPTIONS)
    uncond = encoder.unconditional(cond)
    embeds, negative = sd_pipe.encode_prompt(CAPTIONS, "cpu", 1, True)
    assert cond.pooled_prompt_embeds is None and cond.time_ids is None
    assert torch.equal(cond.prompt_embeds, embeds)
    # the empty caption's embedding. The library encodes it once for the batch, the pipeline once per prompt: compared
    # with the pipeline's for one prompt, the same text encoder call (a call on a batch may round differently)
    _, negative_of_one = sd_pipe.encode_prompt(CAPTIONS[:1], "cpu", 1, True)
    assert torch.equal(uncond.prompt_embeds, negative_of_one.expand_as(negative)) and negative.abs().sum() > 0


def test_schedule_from_sdxl_euler_config_matches_ddim_inverse_scheduler():
    # the keys of SDXL base 1.0's scheduler/scheduler_config.json (an Euler scheduler carrying DDIM's keys)
    sdxl_scheduler_config = {
        "_class_name": "EulerDiscreteScheduler", "beta_end": 0.012, "beta_schedule": "scaled_linear",
        "beta_start": 0.00085, "clip_sample": False, "interpolation_type": "linear", "num_train_timesteps": 1000,
        "prediction_type": "epsilon", "sample_max_value": 1.0, "set_alpha_to_one": False, "skip_prk_steps": True,
        "steps_offset": 1, "timestep_spacing": "leading", "trained_betas": None, "use_karras_sigmas": False,
    }
    EulerDiscreteScheduler.from_config(sdxl_scheduler_config)  # a valid config for the pipeline's own sampler
    schedule = InversionSchedule.from_scheduler_config(sdxl_scheduler_config, 80)
    reference = DDIMInverseScheduler.from_config(sdxl_scheduler_config)
    reference.set_timesteps(80)
    assert torch.equal(schedule.timesteps, reference.timesteps)
    assert schedule.timesteps[0] == 1 and schedule.timesteps[-1] == 949 and (schedule.timesteps.diff() == 12).all()
    assert torch.equal(schedule.alphas[1:], reference.alphas_cumprod[reference.timesteps])
    # tau_1 - 12 < 0: the level before the first step is the scheduler's final alpha, a(0) with set_alpha_to_one off
    assert schedule.alphas[0] == reference.alphas_cumprod[0]


@pytest.mark.parametrize("guidance_scale", [1.0, 2.0])
def test_inversion_matches_ddim_inverse_scheduler_step_for_step(sdxl_pipe, sdxl_unet64, guidance_scale):
    torch.manual_seed(0)
    cond, uncond = sdxl_conditioning(sdxl_pipe)
    latents = torch.randn(3, 4, 8, 8)
    num_steps = 8
    schedule = InversionSchedule.from_scheduler_config(sdxl_pipe.scheduler.config, num_steps)
    trajectory = invert(sdxl_unet64, latents, cond, uncond, schedule, guidance_scale)
    assert trajectory.latents.shape == (3, num_steps + 1, 4, 8, 8)
    assert torch.equal(trajectory.latents[:, 0], latents)

    scheduler = DDIMInverseScheduler.from_config(sdxl_pipe.scheduler.config)
    scheduler.set_timesteps(num_steps)
    with torch.no_grad():
        for i, t in enumerate(scheduler.timesteps):
            # each step from the library's own point, so that no float32 rounding carries over from step to step
            x = trajectory.latents[:, i]
            e = guided_by_hand(sdxl_unet64, x, t, cond, uncond, guidance_scale)
            # g = 1: the library takes e_c, the formula e_u + (e_c - e_u), a float32 rounding apart
            torch.testing.assert_close(trajectory.noise[:, i], e, rtol=0, atol=float32_ulps(4, e))
            x_next = scheduler.step(trajectory.noise[:, i], t, x).prev_sample
            torch.testing.assert_close(trajectory.latents[:, i + 1], x_next, rtol=0, atol=float32_ulps(4, x, x_next))


def test_inversion_matches_spec_formula_written_out(sd_pipe, sd_unet64):
    torch.manual_seed(1)
    encoder = PromptEncoder([sd_pipe.tokenizer], [sd_pipe.text_encoder])
    cond = encoder.encode(CAPTIONS[:2])
    uncond = encoder.unconditional(cond)
    latents = torch.randn(2, 4, 8, 8)
    num_steps, g = 5, 2.0
    schedule = InversionSchedule.from_scheduler_config(sd_pipe.scheduler.config, num_steps)
    trajectory = invert(sd_unet64, latents, cond, uncond, schedule, g)
    # scaled_linear betas, cumulative product, "leading" timesteps with steps_offset 1, a(0) before the first step
    betas = torch.linspace(0.00085**0.5, 0.012**0.5, 1000, dtype=torch.float64) ** 2
    alpha_bar = torch.cumprod(1 - betas, 0)
    stride = 1000 // num_steps
    x = latents.double()
    with torch.no_grad():
        for i in range(num_steps):
            tau = i * stride + 1
            a_prev = alpha_bar[tau - stride] if tau - stride >= 0 else alpha_bar[0]
            a_tau = alpha_bar[tau]
            e = guided_by_hand(sd_unet64, x, tau, cond, uncond, g, dtype=torch.float64)
            x = a_tau.sqrt() * (x - (1 - a_prev).sqrt() * e) / a_prev.sqrt() + (1 - a_tau).sqrt() * e
            assert trajectory.timesteps[i] == tau
            # all float64 here; the library's float32 path (its predictions and DDIM steps) stays this close
            assert (trajectory.latents[:, i + 1].double() - x).abs().max() <= 1e-4


def test_ddim_steps_back_from_noise_return_the_image(sdxl_pipe):
    torch.manual_seed(2)
    cond, uncond = sdxl_conditioning(sdxl_pipe, CAPTIONS[:2])
    latents = torch.randn(2, 4, 8, 8)
    schedule = InversionSchedule.from_scheduler_config(sdxl_pipe.scheduler.config, 20)
    trajectory = invert(sdxl_pipe.unet, latents, cond, uncond, schedule, 2.0)
    x = trajectory.latents[:, -1]
    for i in reversed(range(schedule.num_steps)):
        x = ddim_step(x, trajectory.noise[:, i], schedule.alphas[i + 1], schedule.alphas[i])
    assert (x - latents).abs().max() <= 1e-4
    assert (trajectory.latents[:, -1] - latents).abs().max() > 0.1  # the walk went somewhere and came back


def test_guidance_one_is_the_conditional_prediction_with_one_call_per_step(sdxl_pipe):
    torch.manual_seed(3)
    cond, uncond = sdxl_conditioning(sdxl_pipe)
    latents = torch.randn(3, 4, 8, 8)
    calls = []
    hook = sdxl_pipe.unet.register_forward_hook(lambda module, args, output: calls.append(args[0].shape[0]))
    try:
        with torch.no_grad():
            guided = guided_noise_prediction(sdxl_pipe.unet, latents, 501, cond, uncond, 1.0)
            assert calls == [3]
            conditional = sdxl_pipe.unet(latents, torch.full((3,), 501), **cond.unet_kwargs(torch.float32)).sample
            assert torch.equal(guided, conditional)
            calls.clear()
            schedule = InversionSchedule.from_scheduler_config(sdxl_pipe.scheduler.config, 6)
            invert(sdxl_pipe.unet, latents, cond, None, schedule, 1.0)
            assert calls == [3] * 6
            calls.clear()
            invert(sdxl_pipe.unet, latents, cond, uncond, schedule, 2.0)
            assert calls == [6] * 6  # guidance: both halves in one call per step
    finally:
        hook.remove()


def test_noise_at_end_and_chunked_prediction_match_unbatched_calls(sdxl_pipe, sdxl_unet64):
    torch.manual_seed(4)
    cond, uncond = sdxl_conditioning(sdxl_pipe, CAPTIONS[:2])
    schedule = InversionSchedule.from_scheduler_config(sdxl_pipe.scheduler.config, 5)
    unet = sdxl_unet64
    trajectory = invert(unet, torch.randn(2, 4, 8, 8), cond, uncond, schedule, 2.0, with_noise_at_end=True,
                             chunk_size=2)
    # a float64 difference that lands either side of a float32 rounding boundary moves a prediction by an ulp
    tolerance = dict(rtol=0, atol=float32_ulps(4, trajectory.noise, trajectory.noise_at_end))
    with torch.no_grad():
        for i in range(5):
            at_end = guided_by_hand(unet, trajectory.latents[:, i + 1], schedule.timesteps[i], cond, uncond, 2.0)
            torch.testing.assert_close(trajectory.noise_at_end[:, i], at_end, **tolerance)
        # the predictions at the start points reproduce the stored noise, whatever the chunking
        for chunk_size in (1, 3, 5):
            at_start = predict_on_trajectory(unet, trajectory, cond, uncond, 2.0, chunk_size=chunk_size)
            torch.testing.assert_close(at_start, trajectory.noise, **tolerance)
        subset = predict_on_trajectory(unet, trajectory, cond, uncond, 2.0, at="end", steps=[4, 1])
        torch.testing.assert_close(subset, trajectory.noise_at_end[:, [4, 1]], **tolerance)


def test_forward_noise_matches_ddpm_scheduler():
    scheduler = DDPMScheduler(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear")
    torch.manual_seed(5)
    x0, noise = torch.randn(3, 4, 8, 8), torch.randn(3, 4, 8, 8)
    timesteps = torch.tensor([0, 500, 999])
    expected = scheduler.add_noise(x0, noise, timesteps)
    torch.testing.assert_close(forward_noise(x0, noise, scheduler.alphas_cumprod[timesteps]), expected)


# ---------------------------------------------------------------------------------------------------------------
# Bad input
# ---------------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("num_steps", [0, 1001, 2.5])
def test_schedule_rejects_step_counts_out_of_range(sdxl_pipe, num_steps):
    with pytest.raises(ValueError, match="from 1 to 1000"):
        InversionSchedule.from_scheduler_config(sdxl_pipe.scheduler.config, num_steps)


def test_schedule_rejects_non_epsilon_models(sdxl_pipe):
    config = dict(sdxl_pipe.scheduler.config, prediction_type="v_prediction")
    with pytest.raises(ValueError, match="epsilon"):
        InversionSchedule.from_scheduler_config(config, 10)


def test_mismatched_batch_sizes_are_errors_not_broadcasts(sdxl_pipe):
    cond, uncond = sdxl_conditioning(sdxl_pipe)
    with pytest.raises(ValueError, match="batch size 2 but the conditioning has 3"):
        guided_noise_prediction(sdxl_pipe.unet, torch.randn(2, 4, 8, 8), 1, cond, uncond, 2.0)
    with pytest.raises(ValueError, match="unconditional"):
        guided_noise_prediction(sdxl_pipe.unet, torch.randn(3, 4, 8, 8), 1, cond, uncond.select(slice(0, 1)), 2.0)
    with pytest.raises(ValueError, match="one row per sample"):
        Conditioning(torch.zeros(2, 4, 8), torch.zeros(3, 8), torch.zeros(2, 6))
    with pytest.raises(ValueError, match=r"\(B, C, H, W\)"):
        invert(sdxl_pipe.unet, torch.randn(4, 8, 8), cond, uncond, None, 2.0)
    with pytest.raises(ValueError, match="one per sample"):
        sdxl_encoder(sdxl_pipe).encode(CAPTIONS, [[64, 64]], [[0, 0]], (64, 64))
    with pytest.raises(ValueError, match="list of strings"):
        sdxl_encoder(sdxl_pipe).encode("one caption", [[64, 64]], [[0, 0]], (64, 64))


def test_noised_trajectory_is_the_forward_process_at_the_schedules_levels_and_its_targets_are_the_noise():
    from inversion import FlowSchedule, InversionSchedule, noised_trajectory

    generator = torch.Generator().manual_seed(0)
    x0, z = torch.randn(2, 4, 3, 3, generator=generator), torch.randn(2, 3, 4, 3, 3, generator=generator)
    alphas = torch.tensor([0.999, 0.8, 0.5, 0.1])
    ddim = noised_trajectory(x0, z, InversionSchedule(torch.tensor([1, 300, 600]), alphas))
    sigmas = torch.tensor([0.0, 0.2, 0.6, 0.9])
    flow = noised_trajectory(x0, z, FlowSchedule(sigmas))
    assert torch.equal(ddim.latents[:, 0], x0) and torch.equal(flow.latents[:, 0], x0)
    for i in range(3):  # written out: DDPM and rectified-flow forward processes at level i + 1
        a = alphas[i + 1]
        torch.testing.assert_close(ddim.latents[:, i + 1], a.sqrt() * x0 + (1 - a).sqrt() * z[:, i])
        torch.testing.assert_close(flow.latents[:, i + 1], (1 - sigmas[i + 1]) * x0 + sigmas[i + 1] * z[:, i])
    # the anchored targets recover the noise (DDIM) and the velocity z - x_0 (flows), to float32 rounding
    torch.testing.assert_close(ddim.anchored_target(), z, atol=1e-5, rtol=0)
    torch.testing.assert_close(flow.anchored_target(), z - x0.unsqueeze(1), atol=1e-5, rtol=0)


def test_standardised_trajectory_rebuilds_each_point_from_its_noise_standardised_per_channel():
    from inversion import FlowSchedule, InversionSchedule, Trajectory, standardised_trajectory

    generator = torch.Generator().manual_seed(0)
    x0 = torch.randn(2, 4, 5, 5, generator=generator)
    # a skewed "inversion" path: scaled-down noise with a per-channel offset, as the toys' inversions end
    z = 0.7 * torch.randn(2, 3, 4, 5, 5, generator=generator) + torch.tensor([0.3, -0.2, 0.0, 0.5]).view(1, 1, 4, 1, 1)
    alphas, sigmas = torch.tensor([0.999, 0.8, 0.5, 0.1]), torch.tensor([0.0, 0.2, 0.6, 0.9])
    ddim_schedule, flow_schedule = InversionSchedule(torch.tensor([1, 300, 600]), alphas), FlowSchedule(sigmas)
    ddim_points = torch.stack([x0] + [alphas[i + 1].sqrt() * x0 + (1 - alphas[i + 1]).sqrt() * z[:, i]
                                      for i in range(3)], 1)
    flow_points = torch.stack([x0] + [(1 - sigmas[i + 1]) * x0 + sigmas[i + 1] * z[:, i] for i in range(3)], 1)
    # written out with numpy's population-free (ddof = 1) spread, per image, step and channel
    zn = z.double().numpy()
    expected = (zn - zn.mean(axis=(3, 4), keepdims=True)) / zn.std(axis=(3, 4), ddof=1, keepdims=True)
    expected = torch.from_numpy(expected).float()
    for schedule, points, rebuild in (
            (ddim_schedule, ddim_points, lambda i, e: alphas[i + 1].sqrt() * x0 + (1 - alphas[i + 1]).sqrt() * e),
            (flow_schedule, flow_points, lambda i, e: (1 - sigmas[i + 1]) * x0 + sigmas[i + 1] * e)):
        out = standardised_trajectory(Trajectory(points, torch.zeros_like(z), schedule))
        assert torch.equal(out.latents[:, 0], x0)
        for i in range(3):
            torch.testing.assert_close(out.latents[:, i + 1], rebuild(i, expected[:, i]), atol=1e-5, rtol=0)
    # the same values in another memory layout (as an inverted path has) give the same bits
    ddim = standardised_trajectory(Trajectory(ddim_points, torch.zeros_like(z), ddim_schedule))
    relaid = ddim_points.permute(0, 1, 3, 4, 2).contiguous().permute(0, 1, 4, 2, 3)
    assert not relaid.is_contiguous()
    assert torch.equal(standardised_trajectory(Trajectory(relaid, torch.zeros_like(z), ddim_schedule)).latents,
                       ddim.latents)
    # the anchored targets are the standardised noise (DDIM) and it minus x_0 (flows)
    torch.testing.assert_close(ddim.anchored_target(), expected, atol=1e-4, rtol=0)
    flow = standardised_trajectory(Trajectory(flow_points, torch.zeros_like(z), flow_schedule))
    torch.testing.assert_close(flow.anchored_target(), expected - x0.unsqueeze(1), atol=1e-4, rtol=0)
