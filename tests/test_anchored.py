"""The anchored form, --loss_type inversion_dpo_x0: its target, its value and gradient against the method spec's
formula written out here, and its wiring in the trainer (chunked gradient, per-pair captions, trajectory cache)."""

import copy
import math

import pytest
import torch
import torch.nn.functional as F
from accelerate import Accelerator
from test_losses import perturbed

from models import Conditioning, PromptEncoder
from inversion import InversionSchedule, anchored_noise
from losses import SATURATION_MARGIN, inversion_dpo_x0, timestep_weights
from training import Reference, invert_pairs, trajectory_loss
from train_inversion_dpo import parse_args
from trajectory_cache import TrajectoryCache

N, BETA, G = 4, 500.0, 2.0
CAPTIONS = ["a red square", "a blue circle"]


def trainer_args(*extra):
    return parse_args(["--pretrained_model_name_or_path", "unused", "--dataset_name", "unused", "--loss_type",
                       "inversion_dpo_x0", "--num_inference_steps", str(N), "--beta_dpo", str(BETA),
                       "--inversion_guidance_scale", str(G), *extra])


@pytest.fixture(scope="module")
def pairs(sdxl_pipe):
    encoder = PromptEncoder([sdxl_pipe.tokenizer, sdxl_pipe.tokenizer_2],
                            [sdxl_pipe.text_encoder, sdxl_pipe.text_encoder_2])
    cond = encoder.encode(CAPTIONS, [[64, 64]] * 2, [[0, 0]] * 2, (64, 64))
    winners, losers = torch.randn(2, 2, 4, 8, 8, generator=torch.Generator().manual_seed(1))
    schedule = InversionSchedule.from_scheduler_config(sdxl_pipe.scheduler.config, N)
    return dict(cond=Conditioning.cat([cond, cond]), uncond=encoder.unconditional(Conditioning.cat([cond, cond])),
                latents=torch.cat([winners, losers]), schedule=schedule)


@pytest.fixture(scope="module")
def unet64(sdxl_pipe):
    """The tiny UNet in float64. A float32 UNet call on more rows rounds differently from one on fewer, by an amount
    that depends on the CPU's kernels, and the loss magnifies it (a small difference of errors, times beta / 2). In
    float64 that rounding (about 1e-16) vanishes under the float32 casts the library makes of every prediction, so
    two call patterns give the same float32 numbers on any CPU."""
    return copy.deepcopy(sdxl_pipe.unet).double()


def trainer_step(args, sdxl_pipe, pairs, policy, rows=slice(None), cache=None, reference=None):
    """The trainer's inversion and loss on the pairs at `rows` (winner rows, then the same loser rows)."""
    count = len(CAPTIONS)
    index = torch.arange(2 * count).reshape(2, count)[:, rows].flatten()
    weights = timestep_weights(pairs["schedule"].alphas[1:], args.timestep_weighting)
    reference = reference or Reference(load=lambda: sdxl_pipe.unet)
    cond, uncond = pairs["cond"].select(index), pairs["uncond"].select(index)
    keys = [f"image {int(i)}" for i in index]  # the cache's encoding key of each image
    trajectories = invert_pairs(args, reference, pairs["latents"][index], cond, uncond, pairs["schedule"], cache, keys)
    policy.zero_grad(set_to_none=True)
    output = trajectory_loss(args, Accelerator(cpu=True), policy, trajectories, cond, uncond, weights, None)
    gradient = [p.grad for p in policy.parameters() if p.grad is not None]
    return output, (torch.cat([g.flatten() for g in gradient]) if gradient else None), trajectories


def test_anchored_target_rebuilds_each_point_from_the_clean_latent():
    latents = torch.randn(3, 5, 4, 8, 8)
    alphas = torch.tensor([0.999, 0.9, 0.6, 0.3, 0.05])
    target = anchored_noise(latents, alphas)
    for i in range(1, 5):
        rebuilt = math.sqrt(alphas[i]) * latents[:, 0] + math.sqrt(1 - alphas[i]) * target[:, i - 1]
        torch.testing.assert_close(rebuilt, latents[:, i], rtol=0, atol=1e-5)


def test_log2_and_a_nonzero_gradient_at_the_reference(sdxl_pipe, pairs):
    output, gradient, _ = trainer_step(trainer_args(), sdxl_pipe, pairs, copy.deepcopy(sdxl_pipe.unet))
    assert output.loss.item() == pytest.approx(math.log(2), abs=1e-6)
    assert gradient is not None and gradient.norm() > 0


def written_out(reference, pairs, policy, trajectories, weighting):
    """Method spec section 2, one image and one step at a time: eps^_i = (x_i - sqrt(a_i) x_0) / sqrt(1 - a_i),
    E_i(m) = mean (eps~_m(x_i, tau_i) - eps^_i)^2, S = (1/N) sum w_i (E_i(theta) - E_i(ref)),
    loss = mean over pairs of -log sigmoid(-beta/2 (S_w - S_l))."""
    schedule, count = pairs["schedule"], len(CAPTIONS)

    def guided(model, x, tau, row):  # both halves taken as float32, as the library takes them
        c, u = pairs["cond"].select([row]), pairs["uncond"].select([row])
        t, dtype = torch.tensor([tau]), next(model.parameters()).dtype
        e_c = model(x.to(dtype), t, **c.unet_kwargs(dtype)).sample.float()
        e_u = model(x.to(dtype), t, **u.unet_kwargs(dtype)).sample.float()
        return e_u + G * (e_c - e_u)

    def score(row):
        total = 0.0
        x0 = trajectories.latents[row : row + 1, 0]
        for i, tau in enumerate(schedule.timesteps.tolist()):
            a = schedule.alphas[i + 1]
            x_i = trajectories.latents[row : row + 1, i + 1]
            target = (x_i - a.sqrt() * x0) / (1 - a).sqrt()
            with torch.no_grad():
                reference_error = ((guided(reference, x_i, tau, row) - target) ** 2).mean()
            policy_error = ((guided(policy, x_i, tau, row) - target) ** 2).mean()
            weight = 1 / (2 * a) if weighting == "official" else 1.0
            total = total + weight * (policy_error - reference_error)
        return total / N

    policy.zero_grad(set_to_none=True)
    loss = sum(-F.logsigmoid(-BETA / 2 * (score(b) - score(count + b))) for b in range(count)) / count
    loss.backward()
    return loss.item(), torch.cat([p.grad.flatten() for p in policy.parameters()])


@pytest.mark.parametrize("weighting", ["official", "uniform"])
def test_loss_and_gradient_equal_the_formula_written_out(sdxl_pipe, pairs, unet64, weighting):
    # Batched against one-at-a-time UNet calls, both in float64 (see `unet64`): in float32 they differed by 5e-6 to
    # 1e-5 of the gradient and up to 1.7e-5 of the loss across CPU kernels. What remains is float32 loss arithmetic in
    # another order; the trainer's chunk-by-chunk gradient of the same loss bounds the rounding of a different call
    # pattern, measured here. (A wrong weight or target moves the loss by orders of magnitude more than the 1e-4 floor.)
    policy, reference = perturbed(unet64), Reference(load=lambda: unet64)
    output, gradient, trajectories = trainer_step(trainer_args("--timestep_weighting", weighting,
                                                               "--trajectory_chunk_size", str(N)),
                                                  sdxl_pipe, pairs, policy, reference=reference)
    loss, expected = written_out(unet64, pairs, policy, trajectories, weighting)
    assert gradient.dtype == torch.float64 and abs(output.loss.item() - math.log(2)) > 1e-3  # moved off the start
    chunked_output, chunked, _ = trainer_step(trainer_args("--timestep_weighting", weighting), sdxl_pipe, pairs, policy,
                                              reference=reference)
    loss_rounding = abs(output.loss.item() - chunked_output.loss.item()) / loss
    gradient_rounding = ((gradient - chunked).norm() / gradient.norm()).item()
    assert abs(output.loss.item() - loss) / loss <= max(10 * loss_rounding, 1e-4)
    assert ((gradient - expected).norm() / expected.norm()).item() <= max(10 * gradient_rounding, 1e-4)


def test_chunked_gradient_equals_the_one_graph_gradient(sdxl_pipe, pairs, unet64):
    # The chunk size also sets how many steps the reference evaluates per call. In float32 the two runs' losses
    # differed by up to 2.3e-5 and their gradients by up to 4.9e-6 across CPU kernels; in float64 (see `unet64`) the
    # float32 errors are the same numbers in both, so the losses agree and the gradients agree to a float32 ulp.
    policy, reference = perturbed(unet64), Reference(load=lambda: unet64)
    one_graph, gradient, _ = trainer_step(trainer_args("--trajectory_chunk_size", str(N)), sdxl_pipe, pairs, policy,
                                          reference=reference)
    chunked, chunked_gradient, _ = trainer_step(trainer_args("--trajectory_chunk_size", "1"), sdxl_pipe, pairs, policy,
                                                reference=reference)
    eps = torch.finfo(torch.float32).eps
    assert chunked.loss.item() == pytest.approx(one_graph.loss.item(), rel=4 * eps)
    assert gradient.dtype == torch.float64
    assert ((chunked_gradient - gradient).norm() / gradient.norm()).item() <= eps


def test_each_pair_keeps_its_own_caption(sdxl_pipe, pairs):
    """The batch loss is the mean of each pair's loss alone; with every pair given the first caption it is not."""
    policy = perturbed(sdxl_pipe.unet)
    args = trainer_args()
    batch = trainer_step(args, sdxl_pipe, pairs, policy)[0].loss.item()
    # Each pair alone, as a batch of the same size (the pair twice): UNet calls of one batch size round alike.
    singles = [trainer_step(args, sdxl_pipe, pairs, policy, rows=[b, b])[0].loss.item() for b in range(2)]
    shared = dict(pairs, cond=Conditioning.cat([pairs["cond"].select([0])] * 4))
    first_caption = trainer_step(args, sdxl_pipe, shared, policy)[0].loss.item()
    difference = abs(batch - sum(singles) / 2)
    assert difference <= 1e-5 * abs(batch)
    assert abs(first_caption - batch) > 100 * max(difference, 1e-5 * abs(batch))


def test_a_warm_cache_needs_no_reference_pass(tmp_path, sdxl_pipe, pairs):
    args = trainer_args("--inversion_cache_dir", str(tmp_path))
    cache = TrajectoryCache(str(tmp_path), "fingerprint", {"n": N}, "float32")
    policy = perturbed(sdxl_pipe.unet)
    cold, cold_gradient, _ = trainer_step(args, sdxl_pipe, pairs, policy, cache=cache)

    def no_reference():
        raise AssertionError("the reference was loaded although every trajectory was cached")

    warm, warm_gradient, _ = trainer_step(args, sdxl_pipe, pairs, policy, cache=cache,
                                          reference=Reference(load=no_reference))
    assert warm.loss.item() == cold.loss.item() and torch.equal(warm_gradient, cold_gradient)


def test_saturation_is_the_fraction_of_pairs_past_the_margin():
    errors = torch.zeros(4, 1)
    # margins -beta/2 (S_w - S_l) with beta 2: 0, -4, 6, -10 -> two of four past |5|
    policy_w = torch.tensor([[0.0], [4.0], [0.0], [10.0]])
    policy_l = torch.tensor([[0.0], [0.0], [6.0], [0.0]])
    output = inversion_dpo_x0(policy_w, errors, policy_l, errors, torch.ones(1), beta=2.0)
    assert SATURATION_MARGIN == 5.0
    assert output.metrics["saturated"].item() == 0.5
    assert output.metrics["margin"].item() == pytest.approx((0 - 4 + 6 - 10) / 4)


def test_standardised_points_are_the_inversion_standardised_with_the_references_errors_there(sdxl_pipe, pairs):
    from inversion import invert, standardised_trajectory
    from training import reference_errors

    args = trainer_args("--anchor_points", "standardised")
    reference = Reference(load=lambda: sdxl_pipe.unet)
    cond, uncond, latents = pairs["cond"], pairs["uncond"], pairs["latents"]
    got = invert_pairs(args, reference, latents, cond, uncond, pairs["schedule"])
    # computed independently: the plain inversion, standardised, and the reference's errors at those points
    expected = standardised_trajectory(invert(sdxl_pipe.unet, latents, cond, uncond, pairs["schedule"], G))
    assert torch.equal(got.latents, expected.latents)
    errors = reference_errors(args, reference, expected, cond, uncond)
    assert torch.equal(got.reference_errors["anchored"], errors["anchored"])
    plain = invert_pairs(trainer_args("--anchor_points", "inversion"), reference, latents, cond, uncond,
                         pairs["schedule"])
    assert not torch.allclose(plain.latents[:, 1:], got.latents[:, 1:])  # the points did move
    assert torch.equal(plain.latents[:, 0], got.latents[:, 0])  # x_0 did not

