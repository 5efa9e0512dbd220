"""trajectory_loss: the chunk-by-chunk gradient equals the one-graph gradient; --loss_timesteps estimates S."""

import copy

import pytest
import torch
from accelerate import Accelerator

import losses
from models import Conditioning, PromptEncoder
from inversion import InversionSchedule, invert
from training import Reference, loss_targets, policy_errors, reference_errors, trajectory_loss
from train_inversion_dpo import parse_args


def gradient(policy, args, micro_batches, weights):
    accelerator = Accelerator(cpu=True, gradient_accumulation_steps=args.gradient_accumulation_steps)
    policy.zero_grad(set_to_none=True)
    for trajectories, cond, uncond in micro_batches:
        trajectory_loss(args, accelerator, policy, trajectories, cond, uncond, weights, torch.Generator())
    return torch.cat([p.grad.flatten() for p in policy.parameters() if p.grad is not None])


@pytest.fixture(scope="module")
def micro_batches(sdxl_pipe):
    """Two micro-batches of 2 pairs (winners then losers), inverted over 6 steps, and the official weights."""
    torch.manual_seed(0)
    encoder = PromptEncoder([sdxl_pipe.tokenizer, sdxl_pipe.tokenizer_2], [sdxl_pipe.text_encoder, sdxl_pipe.text_encoder_2])
    schedule = InversionSchedule.from_scheduler_config(sdxl_pipe.scheduler.config, NUM_STEPS)
    batches = []
    for captions in (["red", "blue"], ["a green star", "grey"]):
        cond_w = encoder.encode(captions, [[64, 64]] * 2, [[0, 0]] * 2, (64, 64))
        cond_l = encoder.encode(captions, [[64, 80]] * 2, [[0, 8]] * 2, (64, 64))
        cond = Conditioning.cat([cond_w, cond_l])
        uncond = encoder.unconditional(cond)
        trajectories = invert(sdxl_pipe.unet, torch.randn(4, 4, 8, 8), cond, uncond, schedule, 2.0)
        trajectories.reference_errors = reference_errors(trainer_args("inversion_dpo_x0"),
                                                         Reference(load=lambda: sdxl_pipe.unet), trajectories, cond,
                                                         uncond)
        batches.append((trajectories, cond, uncond))
    return batches, losses.timestep_weights(schedule.alphas[1:], "official")


@pytest.fixture(scope="module")
def policy(sdxl_pipe):
    policy = copy.deepcopy(sdxl_pipe.unet).train()
    with torch.no_grad():  # away from the reference, so the paper form has a gradient too
        for p in policy.parameters():
            p.add_(2e-3 * torch.randn_like(p))
    return policy


NUM_STEPS = 6


def trainer_args(loss_type, *extra):
    return parse_args(["--pretrained_model_name_or_path", "unused", "--dataset_name", "unused", "--loss_type",
                       loss_type, "--num_inference_steps", str(NUM_STEPS), "--beta_dpo", "100",
                       "--gradient_accumulation_steps", "2", *extra])


@pytest.mark.parametrize("loss_type", ["inversion_dpo", "inversion_dpo_exact"])
def test_chunked_gradient_equals_one_graph_gradient_with_accumulation(micro_batches, policy, loss_type):
    # Chunking changes how many steps go through the UNet per call, and a float32 UNet call on more rows rounds
    # differently: in float32 the chunked and one-graph gradients differ by 1e-6 to 1e-5 of their size depending on
    # the CPU's kernels, as much as either differs from the float64 gradient. So the identity is checked with the
    # policy in float64 (rounding near 1e-16; measured 4e-16 here). The trainer's float32 steps (the predictions'
    # cast, the loss, dL/d(error)) see the same numbers in both, so the gradients must agree to one float32 ulp of
    # their size: far below float32 rounding, and far below what a wrong scale, step or chunk would change.
    policy = copy.deepcopy(policy).double()
    tolerance = torch.finfo(torch.float32).eps
    batches, weights = micro_batches
    one_graph = gradient(policy, trainer_args(loss_type, "--trajectory_chunk_size", str(NUM_STEPS)), batches, weights)
    assert one_graph.dtype == torch.float64 and one_graph.norm() > 0
    for chunk in (1, 4):
        chunked = gradient(policy, trainer_args(loss_type, "--trajectory_chunk_size", str(chunk)), batches, weights)
        assert ((chunked - one_graph).norm() / one_graph.norm()).item() <= tolerance
    # a --loss_timesteps subset too: the same generator draws the same steps in both
    subset = ["--loss_timesteps", "3"]
    one_graph = gradient(policy, trainer_args(loss_type, *subset, "--trajectory_chunk_size", "3"), batches, weights)
    chunked = gradient(policy, trainer_args(loss_type, *subset, "--trajectory_chunk_size", "1"), batches, weights)
    assert ((chunked - one_graph).norm() / one_graph.norm()).item() <= tolerance


@pytest.mark.parametrize("loss_type", ["inversion_dpo", "inversion_dpo_x0"])
def test_accumulated_gradient_is_the_mean_of_the_micro_batch_gradients(micro_batches, policy, loss_type):
    # The gradient of an optimiser step over A micro-batches is that of the mean loss: (g_1 + g_2) / 2 with each g_k
    # taken alone (no accumulation). accelerate's backward divides by A itself, so a second division in the trainer
    # would make it half that. Float64 policy: the same UNet calls on both sides, so only the final sum and halving
    # round (float32 steps in the loss see identical numbers).
    policy = copy.deepcopy(policy).double()
    batches, weights = micro_batches
    alone = [gradient(policy, trainer_args(loss_type, "--gradient_accumulation_steps", "1"), [batch], weights)
             for batch in batches]
    accumulated = gradient(policy, trainer_args(loss_type), batches, weights)
    expected = (alone[0] + alone[1]) / 2
    assert expected.norm() > 0
    assert ((accumulated - expected).norm() / expected.norm()).item() <= torch.finfo(torch.float32).eps


def test_loss_timesteps_subset_is_an_unbiased_estimate_of_the_score(micro_batches, policy):
    (trajectories, cond, uncond), weights = micro_batches[0][0], micro_batches[1]
    accelerator = Accelerator(cpu=True)

    def scores(args, seed):
        output = trajectory_loss(args, accelerator, policy, trajectories, cond, uncond, weights,
                                 torch.Generator().manual_seed(seed))
        policy.zero_grad(set_to_none=True)
        return torch.stack([output.metrics["score_w"], output.metrics["score_l"]])

    full = scores(trainer_args("inversion_dpo"), 0)
    assert torch.equal(scores(trainer_args("inversion_dpo", "--loss_timesteps", str(NUM_STEPS)), 0), full)
    # Draw 2-step subsets until all 15 have been seen: each subset is equally likely, so the mean over all of them
    # is the expectation of the estimate, which must be the full S (a wrong scale or weighting would show here).
    # One step per UNet call, as for the full S: each step's errors are then the same numbers in both (a call on
    # more steps at once would round differently), and only float32 sums and means of positive terms remain: a few
    # dozen operations, each off by at most half an ulp, on any CPU.
    subset = trainer_args("inversion_dpo", "--loss_timesteps", "2", "--loss_timestep_sampling", "uniform",
                          "--trajectory_chunk_size", "1")
    distinct = {}
    for seed in range(300):
        draw = scores(subset, seed)
        distinct.setdefault(tuple(draw.tolist()), draw)  # a subset's scores are the same numbers at every draw
        if len(distinct) == 15:
            break
    assert len(distinct) == 15
    eps = torch.finfo(torch.float32).eps
    torch.testing.assert_close(torch.stack(list(distinct.values())).mean(0), full, rtol=64 * eps, atol=0)


@pytest.mark.parametrize("sampling", ["weighted", "stratified"])
def test_drawn_steps_enter_the_score_with_their_estimate_weights(micro_batches, policy, sampling):
    """The trainer evaluates the drawn steps, the same for winner and loser, and weights each as the draw says:
    score = mean over pairs of (1/K) sum_k estimate_weight_k (E_k(theta) - E_k(ref)), with the per-step errors
    taken here at every step (one step per call, as the trainer's chunk size 1 takes them)."""
    (trajectories, cond, uncond), weights = micro_batches[0][0], micro_batches[1]
    every = trainer_args("inversion_dpo_x0", "--trajectory_chunk_size", "1")
    with torch.no_grad():
        errors = policy_errors(policy, trajectories, loss_targets(every, trajectories), cond, uncond, every, "end",
                               torch.arange(NUM_STEPS))
    differences = errors - trajectories.reference_errors["anchored"]
    args = trainer_args("inversion_dpo_x0", "--loss_timesteps", "3", "--loss_timestep_sampling", sampling,
                        "--trajectory_chunk_size", "1")
    for seed in range(4):
        output = trajectory_loss(args, Accelerator(cpu=True), policy, trajectories, cond, uncond, weights,
                                 torch.Generator().manual_seed(seed))
        policy.zero_grad(set_to_none=True)
        steps, estimate_weights = losses.draw_loss_steps(weights, 3, sampling, torch.Generator().manual_seed(seed))
        scores = (differences[:, steps] * estimate_weights).mean(-1)
        torch.testing.assert_close(output.metrics["score_w"], scores[:2].mean(), rtol=1e-6, atol=0)
        torch.testing.assert_close(output.metrics["score_l"], scores[2:].mean(), rtol=1e-6, atol=0)
