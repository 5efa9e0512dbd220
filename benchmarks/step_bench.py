"""Seconds, UNet calls and peak memory of one Inversion-DPO optimiser step, for three schedules:

    released   the released code's schedule: both inversions recomputed every step, all N policy evaluations
               held in one graph until backward (--trajectory_chunk_size N)
    uncached   this project without a cache: inversions every step
    cached     this project with a warm trajectory cache (trajectory_cache.py): no inversion

The uncached and cached modes use --chunk K (default 1: the gradient one step at a time, memory independent of N;
0: one graph of all N steps, one policy call).

for N inversion steps in {10, 20, 40, 80}. The step is the trainer's own code (invert_pairs, trajectory_loss) on one
pair, paper loss, guidance 2, conditioning given (text encoders and VAE are outside the step being measured).

    python benchmarks/step_bench.py                          # tiny SDXL-shaped UNet on the CPU, 64 px
    python benchmarks/step_bench.py --config sdxl --json out.jsonl   # SDXL-sized UNet, random weights, 1024 px, bf16, CUDA
    python benchmarks/step_bench.py --config sdxl --lora ...         # the same with LoRA adapters (rank 64)

Each configuration runs in a fresh process so that peak memory is its own: torch.cuda.max_memory_allocated on a
GPU, the process's peak resident set on a CPU (which includes the interpreter, the weights and whatever the allocator
keeps). FLOPs are counted with torch.utils.flop_counter; on a GPU, model FLOP utilisation is
reported against --peak_tflops (bf16 dense peak; 989 for an H100 SXM).
"""

import argparse
import json
import os
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

MODES = ("released", "uncached", "cached")

# SDXL base 1.0's UNet (the shapes and cost of the real one; random weights, nothing downloaded).
SDXL_UNET = dict(
    sample_size=128, in_channels=4, out_channels=4, layers_per_block=2, block_out_channels=(320, 640, 1280),
    down_block_types=("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
    up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"),
    attention_head_dim=(5, 10, 20), transformer_layers_per_block=(1, 2, 10), cross_attention_dim=2048,
    use_linear_projection=True, addition_embed_type="text_time", addition_time_embed_dim=256,
    projection_class_embeddings_input_dim=2816,
)


def peak_memory(device):
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device)
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # Linux reports KiB


def build(config, device, dtype, lora):
    """(policy, reference, conditioning, unconditional, latents of one pair, resolution, scheduler config)."""
    from diffusers import UNet2DConditionModel

    from inversion import Conditioning
    from tiny_models import SCHEDULER_CONFIG, build_tiny_sdxl

    torch.manual_seed(0)
    if config == "sdxl":
        unet, resolution, tokens, width, pooled = UNet2DConditionModel(**SDXL_UNET), 1024, 77, 2048, 1280
    else:
        unet, resolution, tokens, width, pooled = build_tiny_sdxl().unet, 64, 16, 64, 32
    reference = UNet2DConditionModel.from_config(unet.config)
    reference.load_state_dict(unet.state_dict())
    reference.requires_grad_(False).eval().to(device, dtype)
    if lora:
        from peft import LoraConfig

        unet.requires_grad_(False).to(device, dtype)
        unet.add_adapter(LoraConfig(r=64, lora_alpha=64, init_lora_weights="gaussian",
                                    target_modules=["to_k", "to_q", "to_v", "to_out.0"]))
        for p in unet.parameters():
            if p.requires_grad:
                p.data = p.data.float()
    else:
        unet.to(device)
    unet.train()
    side = resolution // 8
    time_ids = torch.tensor([[resolution, resolution, 0, 0, resolution, resolution]] * 2, dtype=torch.float32)
    cond = Conditioning(torch.randn(2, tokens, width), torch.randn(2, pooled), time_ids).to(device)
    uncond = Conditioning(torch.zeros(2, tokens, width), torch.zeros(2, pooled), time_ids).to(device)
    return unet, reference, cond, uncond, torch.randn(2, 4, side, side, device=device), resolution, SCHEDULER_CONFIG


def run_one(args):
    """One configuration, in this process; prints one JSON line."""
    from accelerate import Accelerator
    from torch.utils.flop_counter import FlopCounterMode

    import losses
    from inversion import InversionSchedule
    from train_inversion_dpo import Reference, invert_pairs, parse_args, trajectory_loss
    from trajectory_cache import TrajectoryCache

    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    dtype = torch.bfloat16 if args.config == "sdxl" else torch.float32
    accelerator = Accelerator(cpu=device.type == "cpu", mixed_precision="bf16" if dtype == torch.bfloat16 else "no")
    policy, reference_unet, cond, uncond, latents, resolution, scheduler_config = build(args.config, device, dtype,
                                                                                           args.lora)
    chunk = args.N if args.mode == "released" or args.chunk == 0 else args.chunk
    trainer_args = parse_args(["--pretrained_model_name_or_path", "unused", "--dataset_name", "unused",
                               "--num_inference_steps", str(args.N), "--trajectory_chunk_size", str(chunk),
                               "--resolution", str(resolution)] + (["--gradient_checkpointing"] if args.config == "sdxl" else []))
    if args.config == "sdxl":
        policy.enable_gradient_checkpointing()
    params = [p for p in policy.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=1e-6)
    policy, optimizer = accelerator.prepare(policy, optimizer)
    schedule = InversionSchedule.from_scheduler_config(scheduler_config, args.N)
    weights = losses.timestep_weights(schedule.alphas[1:], "official").to(device)
    reference = Reference(load=lambda: reference_unet)
    scratch = tempfile.TemporaryDirectory()
    cache = None
    if args.mode == "cached":
        cache = TrajectoryCache(scratch.name, "bench", {"N": args.N})
        invert_pairs(trainer_args, reference, latents, cond, uncond, schedule, cache)  # warm it
    calls = {"count": 0}
    for model in (accelerator.unwrap_model(policy), reference_unet):
        model.register_forward_hook(lambda *_: calls.__setitem__("count", calls["count"] + 1))

    def step():
        trajectories = invert_pairs(trainer_args, reference, latents, cond, uncond, schedule, cache)
        trajectory_loss(trainer_args, accelerator, policy, trajectories, cond, uncond, weights, torch.Generator())
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    def synchronise():
        if device.type == "cuda":
            torch.cuda.synchronize()

    step()  # warm-up
    synchronise()
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    seconds = []
    for _ in range(args.steps):
        synchronise()
        start = time.perf_counter()
        step()
        synchronise()
        seconds.append(time.perf_counter() - start)
    peak = peak_memory(device)  # before counting FLOPs: the counter itself holds memory that grows with the calls
    calls["count"] = 0
    with FlopCounterMode(display=False) as flops:
        step()
    result = {"mode": args.mode, "N": args.N, "seconds_per_step": statistics.median(seconds),
              "peak_memory_bytes": peak, "unet_calls": calls["count"],
              "device": torch.cuda.get_device_name(device) if device.type == "cuda" else f"cpu ({os.cpu_count()} cores)",
              "config": args.config, "lora": args.lora, "trajectory_chunk_size": chunk,
              "flops_per_step": flops.get_total_flops()}
    if device.type == "cuda":
        result["mfu"] = result["flops_per_step"] / result["seconds_per_step"] / (args.peak_tflops * 1e12)
    print("RESULT " + json.dumps(result), flush=True)


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", choices=["tiny", "sdxl"], default="tiny")
    parser.add_argument("--lora", action="store_true")
    parser.add_argument("--modes", nargs="+", choices=MODES, default=list(MODES))
    parser.add_argument("--inversion_steps", type=int, nargs="+", default=[10, 20, 40, 80], help="Values of N.")
    parser.add_argument("--steps", type=int, default=3, help="Timed optimiser steps per configuration (median).")
    parser.add_argument("--chunk", type=int, default=1,
                        help="--trajectory_chunk_size of the uncached and cached modes; 0 means N (one graph).")
    parser.add_argument("--peak_tflops", type=float, default=989.0, help="The GPU's dense bf16 peak, for MFU.")
    parser.add_argument("--json", default=None, help="Append one JSON object per configuration to this file.")
    parser.add_argument("--mode", choices=MODES, help=argparse.SUPPRESS)  # a single configuration, in-process
    parser.add_argument("--N", type=int, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.mode:
        return run_one(args)
    rows = []
    for mode in args.modes:
        for n in args.inversion_steps:
            command = [sys.executable, __file__, "--config", args.config, "--mode", mode, "--N", str(n),
                       "--steps", str(args.steps), "--peak_tflops", str(args.peak_tflops), "--chunk", str(args.chunk)] + (["--lora"] if args.lora else [])
            done = subprocess.run(command, capture_output=True, text=True, env={**os.environ, "HF_HUB_OFFLINE": "1"})
            lines = [line for line in done.stdout.splitlines() if line.startswith("RESULT ")]
            if done.returncode != 0 or not lines:
                message = "out of memory" if "OutOfMemoryError" in done.stderr else done.stderr.strip().splitlines()[-1:]
                print(f"{mode} N={n}: failed ({message})", flush=True)
                rows.append({"mode": mode, "N": n, "error": str(message)})
                continue
            row = json.loads(lines[-1].removeprefix("RESULT "))
            rows.append(row)
            print(f"{mode:9s} N={n:3d}: {row['seconds_per_step']:.3f} s/step, {row['unet_calls']} UNet calls, "
                  f"peak {row['peak_memory_bytes'] / 2**20:.0f} MiB", flush=True)
            if args.json:
                with open(args.json, "a") as f:
                    f.write(json.dumps(row) + "\n")
    print("\n| mode | N | K | s/step | UNet calls | peak memory (MiB) |\n|---|---|---|---|---|---|")
    for row in rows:
        if "error" in row:
            print(f"| {row['mode']} | {row['N']} | | {row['error']} | | |")
            continue
        print(f"| {row['mode']} | {row['N']} | {row['trajectory_chunk_size']} | {row['seconds_per_step']:.3f} | "
              f"{row['unet_calls']} | {row['peak_memory_bytes'] / 2**20:.0f} |")


if __name__ == "__main__":
    main()
