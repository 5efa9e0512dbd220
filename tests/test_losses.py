"""losses.py: values, gradients and signs against the method spec's formulas written out here."""

import copy
import math

import pytest
import torch
import torch.nn.functional as F
from diffusers import DDIMInverseScheduler

from inversion import InversionSchedule, invert, forward_noise, predict_on_trajectory
from models import PromptEncoder
from losses import (
    reference_scale,
    relative_beta,
    LOSS_STEP_SAMPLINGS,
    draw_loss_steps,
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
    invert_images = lambda z: invert(reference, z, cond, uncond, schedule, G, with_noise_at_end=True)  # noqa: E731
    winners, losers = invert_images(torch.randn(3, 4, 8, 8)), invert_images(torch.randn(3, 4, 8, 8))
    return dict(cond=cond, uncond=uncond, schedule=schedule, reference=reference, winners=winners, losers=losers,
                weights=timestep_weights(schedule.alphas[1:], "official"))


@pytest.fixture(scope="module")
def setup64(setup):
    """`setup` with the reference UNet in float64 and the same images inverted again by it (the library takes every
    prediction as float32, so the trajectories are float32 as before)."""
    reference = copy.deepcopy(setup["reference"]).double()
    invert_images = lambda z: invert(reference, z, setup["cond"], setup["uncond"], setup["schedule"], G,  # noqa: E731
                                   with_noise_at_end=True)
    return dict(setup, reference=reference, winners=invert_images(setup["winners"].latents[:, 0]),
                losers=invert_images(setup["losers"].latents[:, 0]))


def perturbed(unet, scale=3e-3, seed=0):
    policy = copy.deepcopy(unet)
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in policy.parameters():
            p.add_(scale * torch.randn(p.shape, generator=generator))
    return policy


def predictions(form, policy, s, select=slice(None), cond_select=None):
    """The policy's guided predictions on the winners' and losers' trajectories of the images at `select`,
    (2, B, N, C, H, W), in the call pattern the form's reference term was made with: the paper forms at x_{i-1}, one
    step per call (as inversion computed e_i), the exact form at x_i, every step in one call (as the setup computed
    eps~_ref(x_i, tau_i)). `cond_select` picks other captions' conditioning (default: the images' own)."""
    cond_select = select if cond_select is None else cond_select
    cond, uncond = s["cond"].select(cond_select), s["uncond"].select(cond_select)
    at, chunk_size = ("end", None) if form == "exact" else ("start", 1)
    return torch.stack([predict_on_trajectory(policy, trajectory.select(select), cond, uncond, G, at=at,
                                              chunk_size=chunk_size)
                        for trajectory in (s["winners"], s["losers"])])


def loss_of_predictions(form, prediction, s, select=slice(None)):
    """The form's loss for the pairs at `select`, from the policy's `predictions` on their trajectories."""
    winners, losers = s["winners"].select(select), s["losers"].select(select)
    errors_w, errors_l = (squared_error(p, t.noise, batch_dims=2) for p, t in zip(prediction, (winners, losers)))
    if form == "exact":
        reference_w, reference_l = (squared_error(t.noise_at_end, t.noise, 2) for t in (winners, losers))
        return inversion_dpo_exact(errors_w, reference_w, errors_l, reference_l, s["weights"], BETA)
    loss_fn = inversion_dpo if form == "paper" else inversion_dpo_official
    return loss_fn(errors_w, errors_l, s["weights"], BETA)


def dpo_loss(form, policy, s, select=slice(None)):
    return loss_of_predictions(form, predictions(form, policy, s, select), s, select)


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


def test_exact_gradient_equals_autograd_of_the_formula_written_out(setup64):
    # The library calls the UNet on every image and step at once, the formula below one image, step and guidance half
    # at a time. In float32 those calls round differently, by an amount that depends on the CPU's kernels, and the
    # loss magnifies it (it is a small difference of errors, times beta / 2): the two gradients differed by 1.4e-5 to
    # 3.3e-5 of their size across CPU kernels. With the UNets in float64 that rounding vanishes under the library's
    # float32 casts of the predictions, which the formula makes too; only the float32 loss arithmetic, summed in
    # another order, remains (3e-9 to 5e-7 across the same kernels).
    setup = setup64
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

                def guided(model):  # both halves taken as float32, as the library takes them
                    e_c = model(x_i.double(), t, **c.unet_kwargs(torch.float64)).sample.float()
                    e_u = model(x_i.double(), t, **u.unet_kwargs(torch.float64)).sample.float()
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
    assert grad_lib.dtype == torch.float64 and grad_hand.norm() > 0
    assert (grad_lib - grad_hand).norm() / grad_hand.norm() <= 1e-4


def relative_difference(a, b):
    return ((a - b).norm() / b.norm()).item()


@pytest.mark.parametrize("form", ["paper", "exact"])
def test_batch_of_pairs_with_their_own_captions_is_the_mean_of_single_pair_losses(setup, form):
    # A UNet call on a batch rounds differently from calls on one image at a time, by an amount that depends on the
    # CPU's kernels. So the two claims are checked apart, each comparing like with like or within rounding measured
    # here: (1) the batch loss is the mean of the per-pair losses of the same predictions; (2) each pair's predictions
    # in the batch are its predictions alone, with its own caption (the released code gave every pair the first).
    policy = perturbed(setup["reference"], seed=2)
    pairs = [0, 1, 2]
    with torch.no_grad():
        batched = predictions(form, policy, setup)
        batch = loss_of_predictions(form, batched, setup).loss
        per_pair = [loss_of_predictions(form, batched[:, b : b + 1], setup, select=[b]).loss for b in pairs]
        singles = [predictions(form, policy, setup, select=[b])[:, 0] for b in pairs]
        # the rounding of the same images in other call patterns that must agree mathematically: each pair in a
        # batch of three copies of itself (batch size; no caption can be mixed up there), and the batch reordered
        # (the position and the neighbours of each pair)
        copies = [predictions(form, policy, setup, select=[b] * 3)[:, b] for b in pairs]
        reordered = predictions(form, policy, setup, select=[2, 0, 1])[:, [1, 2, 0]]
        shared = predictions(form, policy, setup, cond_select=[0] * 3)  # the released code's caption mix-up
    assert abs(batch.item() - math.log(2)) > 1e-3  # the perturbation moved the loss off its starting value

    # (1) like with like: the per-pair losses come from the batch's own predictions, so only the float32 rounding of
    # the final mean over three pairs remains
    eps = torch.finfo(torch.float32).eps
    torch.testing.assert_close(batch, torch.stack(per_pair).mean(), rtol=4 * eps, atol=0)

    # (2) within twice the largest rounding measured above, and at least 4 float32 ulps of the predictions' size
    rounding = max([relative_difference(copies[b], singles[b]) for b in pairs]
                   + [relative_difference(reordered[:, b], batched[:, b]) for b in pairs])
    tolerance = 2 * rounding + 4 * eps
    for b in pairs:
        difference = relative_difference(batched[:, b], singles[b])
        assert difference <= tolerance, f"pair {b}: batched vs alone {difference:.3g}, rounding {rounding:.3g}"

    # the check can fail: the first caption for every pair moves the other pairs' predictions, and the loss, by far
    # more than any tolerance above (a mix-up inside the batch would also show in `reordered`, inflating `rounding`)
    for b in (1, 2):
        difference = relative_difference(shared[:, b], singles[b])
        assert difference > 1000 * tolerance, f"pair {b}: first caption {difference:.3g}, tolerance {tolerance:.3g}"
    shared_loss = loss_of_predictions(form, shared, setup).loss
    assert abs(shared_loss.item() - batch.item()) > 1e4 * eps * batch.item()


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


# --loss_timesteps draws (METHOD.md section 8) ------------------------------------------------------------------

STEP_WEIGHTS = 1 / (2 * torch.tensor([0.95, 0.8, 0.6, 0.4, 0.25, 0.1, 0.03]))  # official weights, uneven


@pytest.mark.parametrize("sampling", LOSS_STEP_SAMPLINGS)
@pytest.mark.parametrize("count", [1, 2, 3])
def test_every_draw_estimates_the_score_without_bias(sampling, count):
    """S^ = sum_k c_k d_k with c_k = estimate_weight_k / K; unbiased for S = (1/N) sum w_i d_i for every d exactly
    when E[c_i] = w_i / N for each step i (c_i = 0 when i is not drawn). Checked on 20000 seeded draws, to 5 standard
    errors of the mean, measured from the draws themselves."""
    generator = torch.Generator().manual_seed(0)
    num_steps, draws = len(STEP_WEIGHTS), 20000
    coefficients = torch.zeros(draws, num_steps, dtype=torch.float64)
    for n in range(draws):
        steps, estimate_weights = draw_loss_steps(STEP_WEIGHTS, count, sampling, generator)
        assert torch.equal(steps, steps.unique()) and len(steps) <= count
        coefficients[n, steps] = estimate_weights.double() / len(steps)
    expected = STEP_WEIGHTS.double() / num_steps
    standard_error = coefficients.std(0) / draws**0.5
    assert ((coefficients.mean(0) - expected).abs() <= 5 * standard_error + 1e-12).all()


def test_the_draws_follow_the_method_spec():
    weights, num_steps = STEP_WEIGHTS, len(STEP_WEIGHTS)
    total = weights.sum()
    generator = torch.Generator().manual_seed(1)
    # every step with its own weight when all are drawn: S exactly
    for sampling in ("uniform", "stratified"):
        steps, estimate_weights = draw_loss_steps(weights, num_steps, sampling, generator)
        assert torch.equal(steps, torch.arange(num_steps)) and torch.equal(estimate_weights, weights)
    # weighted: S^ = (W / N) (1/M) sum_m d_{i_m}, so step i's coefficient is (times drawn) x W / (N M)
    for _ in range(50):
        steps, estimate_weights = draw_loss_steps(weights, 3, "weighted", generator)
        times = estimate_weights / len(steps) / (total / (num_steps * 3))
        torch.testing.assert_close(times, times.round())
        assert (times.round() >= 1).all() and times.round().sum() == 3
    # stratified: blocks {0,1,2}, {3,4}, {5,6}, one step from each, coefficient W_b / N
    blocks = [[0, 1, 2], [3, 4], [5, 6]]
    for _ in range(50):
        steps, estimate_weights = draw_loss_steps(weights, 3, "stratified", generator)
        assert [int(s) in block for s, block in zip(steps, blocks)] == [True] * 3
        expected = torch.stack([weights[block].sum() for block in blocks]) / num_steps
        torch.testing.assert_close(estimate_weights / 3, expected)


def test_weight_proportional_draws_remove_the_variance_the_weights_make():
    """With equal per-step errors (d_i = 1) the score depends on the steps only through their weights: weighted and
    stratified draws estimate it exactly at every draw (their coefficients sum to W / N), the uniform draw does not."""
    generator = torch.Generator().manual_seed(2)
    estimates = {sampling: [] for sampling in LOSS_STEP_SAMPLINGS}
    for _ in range(200):
        for sampling in LOSS_STEP_SAMPLINGS:
            steps, estimate_weights = draw_loss_steps(STEP_WEIGHTS, 2, sampling, generator)
            estimates[sampling].append(estimate_weights.mean().item())
    exact = STEP_WEIGHTS.mean().item()
    for sampling in ("weighted", "stratified"):
        assert max(abs(e - exact) for e in estimates[sampling]) <= 1e-5 * exact
    assert max(abs(e - exact) for e in estimates["uniform"]) > 0.3 * exact


def test_bad_draws_are_named():
    with pytest.raises(ValueError, match="unknown loss timestep sampling 'random'"):
        draw_loss_steps(STEP_WEIGHTS, 2, "random")
    with pytest.raises(ValueError, match="at least one loss step"):
        draw_loss_steps(STEP_WEIGHTS, 0, "uniform")


def test_relative_beta_is_kappa_over_the_references_weighted_error():
    errors = torch.tensor([[0.1, 0.2, 0.4], [0.3, 0.0, 0.2]])
    weights = torch.tensor([0.5, 1.0, 3.0])
    # by hand: rows (0.05 + 0.2 + 1.2) / 3 = 0.48333 and (0.15 + 0 + 0.6) / 3 = 0.25; mean 0.366667
    scale = reference_scale(errors, weights)
    assert scale.item() == pytest.approx(0.3666667, rel=1e-6)
    assert relative_beta(40.0, scale) == pytest.approx(40.0 / 0.3666667, rel=1e-6)
    # scale-free: errors in other units (a latent twice as large: errors x4) give a beta a quarter as large, the same
    # margin for the same relative change
    assert relative_beta(40.0, reference_scale(4 * errors, weights)) == pytest.approx(10.0 / 0.3666667, rel=1e-6)
    for bad in (0.0, float("nan"), -1.0):
        with pytest.raises(ValueError, match="give --beta_dpo explicitly"):
            relative_beta(40.0, bad)
