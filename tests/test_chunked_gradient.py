"""--trajectory_chunk_size: the chunk-by-chunk gradient equals the one-graph gradient."""

import copy

import pytest
import torch
from accelerate import Accelerator

import losses
from inversion import Conditioning, InversionSchedule, PromptEncoder, ddim_invert
from train_inversion_dpo import parse_args, trajectory_loss


def gradient(policy, args, micro_batches, weights):
    accelerator = Accelerator(cpu=True, gradient_accumulation_steps=args.gradient_accumulation_steps)
    policy.zero_grad(set_to_none=True)
    for trajectories, cond, uncond in micro_batches:
        trajectory_loss(args, accelerator, policy, trajectories, cond, uncond, weights)
    return torch.cat([p.grad.flatten() for p in policy.parameters() if p.grad is not None])


@pytest.mark.parametrize("loss_type", ["inversion_dpo", "inversion_dpo_exact"])
def test_chunked_gradient_equals_one_graph_gradient_with_accumulation(sdxl_pipe, loss_type):
    torch.manual_seed(0)
    num_steps = 6
    encoder = PromptEncoder([sdxl_pipe.tokenizer, sdxl_pipe.tokenizer_2], [sdxl_pipe.text_encoder, sdxl_pipe.text_encoder_2])
    schedule = InversionSchedule.from_scheduler_config(sdxl_pipe.scheduler.config, num_steps)
    weights = losses.timestep_weights(schedule.alphas[1:], "official")
    micro_batches = []
    for captions in (["red", "blue"], ["a green star", "grey"]):  # two micro-batches of 2 pairs
        cond_w = encoder.encode(captions, [[64, 64]] * 2, [[0, 0]] * 2, (64, 64))
        cond_l = encoder.encode(captions, [[64, 80]] * 2, [[0, 8]] * 2, (64, 64))
        cond = Conditioning.cat([cond_w, cond_l])
        uncond = encoder.unconditional(cond)
        trajectories = ddim_invert(sdxl_pipe.unet, torch.randn(4, 4, 8, 8), cond, uncond, schedule, 2.0,
                                   with_noise_at_end=True)
        micro_batches.append((trajectories, cond, uncond))

    policy = copy.deepcopy(sdxl_pipe.unet).train()
    with torch.no_grad():  # away from the reference, so the paper form has a gradient too
        for p in policy.parameters():
            p.add_(2e-3 * torch.randn_like(p))
    common = ["--pretrained_model_name_or_path", "unused", "--dataset_name", "unused", "--loss_type", loss_type,
              "--num_inference_steps", str(num_steps), "--beta_dpo", "100", "--gradient_accumulation_steps", "2"]
    one_graph = gradient(policy, parse_args([*common, "--trajectory_chunk_size", str(num_steps)]), micro_batches,
                         weights)
    for chunk in (1, 4):
        chunked = gradient(policy, parse_args([*common, "--trajectory_chunk_size", str(chunk)]), micro_batches,
                           weights)
        assert one_graph.norm() > 0
        assert ((chunked - one_graph).norm() / one_graph.norm()).item() <= 1e-5
