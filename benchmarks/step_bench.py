"""Seconds, UNet calls, FLOPs and peak memory of one Inversion-DPO optimiser step, for three schedules:

    released   the released code's schedule: both inversions recomputed every step, all N policy evaluations
               held in one graph until backward (--trajectory_chunk_size N)
    uncached   this project without a cache: inversions every step
    cached     this project with a warm trajectory cache (trajectory_cache.py): no inversion, and for a full
               fine-tune no reference UNet in memory (as in the trainer)

The uncached and cached modes use --chunk K (default 1: the gradient one step at a time, memory independent of N;
0: one graph of all N steps, one policy call).

for N inversion steps in {10, 20, 40, 80}. The step is the trainer's own code (invert_pairs, trajectory_loss) on one
pair, paper loss, guidance 2, conditioning given (text encoders and VAE are outside the step being measured).

    python benchmarks/step_bench.py                          # tiny SDXL-shaped UNet on the CPU, 64 px
    python benchmarks/step_bench.py --config sdxl --json out.jsonl   # SDXL-sized UNet, random weights, 1024 px, bf16, CUDA
    python benchmarks/step_bench.py --config sdxl --lora ...         # the same with LoRA adapters (rank 64)
    python benchmarks/step_bench.py --config sd3 ...    # SD3.5-medium-sized transformer (flow inversion, CFG 2)
    python benchmarks/step_bench.py --config flux --lora ...   # FLUX.1-dev-sized transformer (guidance embedding)
    python benchmarks/step_bench.py --config tiny_sd3   # (tiny_flux) the tiny flow models on the CPU, 64 px

Each configuration runs in a fresh process so that peak memory is its own: torch.cuda.max_memory_allocated (and
_reserved) on a GPU, the process's peak resident set on a CPU (which includes the interpreter, the weights and whatever
the allocator keeps). A cached configuration's cache is filled by a process of its own first, as
--fill_inversion_cache does before training.

Per configuration: one warm-up step at N' = min(N, 2) steps, run eagerly under torch.utils.flop_counter, gives the
FLOPs (every schedule's FLOPs are linear in N, so a step at N costs N/N' times that): executed_flops_per_step counts
everything, flops_per_step leaves out the forward passes that gradient checkpointing (on for sdxl) recomputes. With
--compile the UNets are then compiled and a second warm-up compiles them; then --steps timed steps at N. Model FLOP
utilisation mfu = flops_per_step / seconds per step / --peak_tflops (the GPU's dense bf16 peak; 989 for an H100 SXM),
hfu the same with the executed FLOPs.
"""

import argparse
import copy
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

# The shapes and cost of the real models (random weights, nothing downloaded). SDXL base 1.0's UNet:
SDXL_UNET = dict(
    sample_size=128, in_channels=4, out_channels=4, layers_per_block=2, block_out_channels=(320, 640, 1280),
    down_block_types=("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
    up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"),
    attention_head_dim=(5, 10, 20), transformer_layers_per_block=(1, 2, 10), cross_attention_dim=2048,
    use_linear_projection=True, addition_embed_type="text_time", addition_time_embed_dim=256,
    projection_class_embeddings_input_dim=2816,
)
# SD3.5 medium's transformer (2.5B parameters; MMDiT-X: dual attention in its first 13 blocks, RMS-normed q/k).
SD35_MEDIUM_TRANSFORMER = dict(
    sample_size=128, patch_size=2, in_channels=16, out_channels=16, num_layers=24, attention_head_dim=64,
    num_attention_heads=24, joint_attention_dim=4096, caption_projection_dim=1536, pooled_projection_dim=2048,
    pos_embed_max_size=384, dual_attention_layers=tuple(range(13)), qk_norm="rms_norm",
)
# FLUX.1-dev's transformer (12B parameters: 19 double-stream and 38 single-stream blocks, guidance embedding).
FLUX_DEV_TRANSFORMER = dict(
    patch_size=1, in_channels=64, num_layers=19, num_single_layers=38, attention_head_dim=128, num_attention_heads=24,
    joint_attention_dim=4096, pooled_projection_dim=768, guidance_embeds=True, axes_dims_rope=(16, 56, 56),
)
KINDS = {"tiny": "sdxl", "sdxl": "sdxl", "tiny_sd3": "sd3", "sd3": "sd3", "tiny_flux": "flux", "flux": "flux"}
GUIDANCE = {"sdxl": 2.0, "sd3": 2.0, "flux": 3.5}  # flux: the value of its guidance embedding (one call per step)


def peak_memory(device):
    """(peak bytes allocated, peak bytes reserved by the allocator); on a CPU both are the peak resident set."""
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device), torch.cuda.max_memory_reserved(device)
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # Linux reports KiB
    return peak, peak


class Bench:
    """One configuration: the policy (full fine-tune or LoRA), its reference, one pair's conditioning and latents,
    and `step(N)`, one optimiser step of the trainer's code on a trajectory of N steps."""

    def __init__(self, config, mode, lora=False, chunk=1, cache_dir=None, load_reference=True, device=None,
                 resolution=None, gradient_checkpointing=None):
        from accelerate import Accelerator

        from diffusers import FluxTransformer2DModel, SD3Transformer2DModel, UNet2DConditionModel

        from inversion import Conditioning
        from tiny_models import build_tiny_flux, build_tiny_sd3, build_tiny_sdxl
        from train_inversion_dpo import DEFAULT_LORA_TARGETS, Reference

        self.mode, self.chunk, self.kind = mode, chunk, KINDS[config]
        self.device = device or torch.device("cuda" if torch.cuda.is_available() else "cpu")
        full_size = not config.startswith("tiny")
        self.dtype = torch.bfloat16 if full_size else torch.float32
        self.accelerator = Accelerator(cpu=self.device.type == "cpu",
                                       mixed_precision="bf16" if self.dtype == torch.bfloat16 else "no")
        torch.manual_seed(0)
        if full_size:
            model_class, model_config = {"sdxl": (UNet2DConditionModel, SDXL_UNET),
                                         "sd3": (SD3Transformer2DModel, SD35_MEDIUM_TRANSFORMER),
                                         "flux": (FluxTransformer2DModel, FLUX_DEV_TRANSFORMER)}[self.kind]
            with torch.device(self.device):  # random init on the device: seconds, not minutes
                policy = model_class(**model_config)
            # text tokens, their width, pooled width: SDXL 77 CLIP; SD3 77 CLIP + 256 T5; FLUX 512 T5
            tokens, width, pooled = {"sdxl": (77, 2048, 1280), "sd3": (333, 4096, 2048),
                                     "flux": (512, 4096, 768)}[self.kind]
            self.resolution = resolution or 1024
        else:
            build = {"sdxl": build_tiny_sdxl, "sd3": build_tiny_sd3, "flux": build_tiny_flux}[self.kind]
            pipe = build()
            policy = (pipe.unet if self.kind == "sdxl" else pipe.transformer).to(self.device)
            tokens, width, pooled = {"sdxl": (16, 64, 32), "sd3": (32, 64, 64), "flux": (16, 64, 32)}[self.kind]
            self.resolution = resolution or 64
        if gradient_checkpointing if gradient_checkpointing is not None else full_size:
            policy.enable_gradient_checkpointing()
        # The conditioning and latents come before anything optional so that every process draws the same ones.
        side = self.resolution // 8
        if self.kind == "sdxl":
            time_ids = torch.tensor([[self.resolution, self.resolution, 0, 0, self.resolution, self.resolution]] * 2,
                                    dtype=torch.float32)
            self.cond = Conditioning(torch.randn(2, tokens, width), torch.randn(2, pooled), time_ids)
            self.uncond = Conditioning(torch.zeros(2, tokens, width), torch.zeros(2, pooled), time_ids)
        else:
            self.cond = Conditioning(torch.randn(2, tokens, width), torch.randn(2, pooled), kind=self.kind)
            # SD3: the empty caption's encoding (not zeros); FLUX: no unconditional branch
            self.uncond = Conditioning(torch.randn(2, tokens, width), torch.randn(2, pooled), kind="sd3") \
                if self.kind == "sd3" else None
        self.cond = self.cond.to(self.device)
        self.uncond = None if self.uncond is None else self.uncond.to(self.device)
        self.latents = torch.randn(2, 4 if self.kind == "sdxl" else 16, side, side).to(self.device)
        self.keys = ["winner", "loser"]  # the cache's keys for the two images (the trainer hashes pixels and captions)

        self.reference_unet = None
        if lora:
            from peft import LoraConfig

            policy.requires_grad_(False).to(self.device, self.dtype)
            targets = DEFAULT_LORA_TARGETS["unet" if self.kind == "sdxl" else "transformer"].split(",")
            policy.add_adapter(LoraConfig(r=64, lora_alpha=64, init_lora_weights="gaussian", target_modules=targets))
            for p in policy.parameters():
                if p.requires_grad:
                    p.data = p.data.float()
            self.reference = Reference(lora_model=policy)  # the policy with its adapters off, as in the trainer
        else:
            if load_reference:  # a separate frozen copy in the compute dtype, as load_reference does
                self.reference_unet = copy.deepcopy(policy).requires_grad_(False).eval().to(self.device, self.dtype)
                if policy.is_gradient_checkpointing:
                    self.reference_unet.disable_gradient_checkpointing()
            self.reference = Reference(load=self._reference_or_fail)
        policy.train()
        self.unwrapped = policy
        optimizer = torch.optim.AdamW([p for p in policy.parameters() if p.requires_grad], lr=1e-6)
        self.policy, self.optimizer = self.accelerator.prepare(policy, optimizer)
        self.cache_dir = cache_dir
        self._setups = {}

    def _reference_or_fail(self):
        if self.reference_unet is None:
            raise RuntimeError("the warm cache missed: the reference UNet was needed but is not loaded")
        return self.reference_unet

    def unets(self):
        return [m for m in (self.unwrapped, self.reference_unet) if m is not None]

    def trainer_args(self, num_steps, *extra):
        from train_inversion_dpo import parse_args

        chunk = num_steps if self.mode == "released" or self.chunk == 0 else self.chunk
        # the paper form, as in the README's tables (the anchored form adds the N reference calls of its cache)
        return parse_args(["--pretrained_model_name_or_path", "unused", "--dataset_name", "unused",
                           "--loss_type", "inversion_dpo", "--num_inference_steps", str(num_steps),
                           "--trajectory_chunk_size", str(chunk), "--resolution", str(self.resolution),
                           "--inversion_guidance_scale", str(GUIDANCE[self.kind]), *extra])

    def setup(self, num_steps):
        """(trainer arguments, schedule, timestep weights, cache or None) for N steps, made once: what the trainer
        prepares before its loop stays out of the timed step."""
        if num_steps not in self._setups:
            from inversion import FlowSchedule, InversionSchedule
            from tiny_models import FLUX_SCHEDULER_CONFIG, SCHEDULER_CONFIG, SD3_SCHEDULER_CONFIG
            from train_inversion_dpo import step_weights
            from trajectory_cache import TrajectoryCache

            if self.kind == "sdxl":
                schedule = InversionSchedule.from_scheduler_config(SCHEDULER_CONFIG, num_steps)
            else:  # the real models' scheduler configs
                config = SD3_SCHEDULER_CONFIG if self.kind == "sd3" else FLUX_SCHEDULER_CONFIG
                schedule = FlowSchedule.for_pipeline(self.kind, config, num_steps, self.resolution // 8)
            weights = step_weights(schedule, "official").to(self.device)
            cache = TrajectoryCache(self.cache_dir, "bench", {"N": num_steps}) if self.mode == "cached" else None
            self._setups[num_steps] = (self.trainer_args(num_steps), schedule, weights, cache)
        return self._setups[num_steps]

    def fill(self, num_steps):
        """Write the trajectories of N steps into the cache (what --fill_inversion_cache does)."""
        from train_inversion_dpo import invert_pairs

        args, schedule, _, cache = self.setup(num_steps)
        invert_pairs(args, self.reference, self.latents, self.cond, self.uncond, schedule, cache, self.keys)

    def step(self, num_steps):
        """One optimiser step: trajectories (inverted, or read from the cache), the loss and its gradient, AdamW."""
        from train_inversion_dpo import invert_pairs, trajectory_loss

        args, schedule, weights, cache = self.setup(num_steps)
        trajectories = invert_pairs(args, self.reference, self.latents, self.cond, self.uncond, schedule, cache,
                                    self.keys)
        trajectory_loss(args, self.accelerator, self.policy, trajectories, self.cond, self.uncond, weights,
                        torch.Generator())
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)

    def count_flops(self, num_steps):
        """(model FLOPs, executed FLOPs) of step(num_steps), run eagerly as configured. Executed FLOPs include the
        forward passes that gradient checkpointing recomputes during backward; model FLOPs leave them out. The
        recomputation is counted by a checkpoint function that reads the counter around each block's second run."""
        from torch.utils.checkpoint import checkpoint
        from torch.utils.flop_counter import FlopCounterMode

        counter = FlopCounterMode(display=False)
        recomputed = [0]

        def counting_checkpoint(block, *args):
            runs = [0]

            def run(*inputs):
                runs[0] += 1
                if runs[0] == 1:  # the forward pass
                    return block(*inputs)
                before = counter.get_total_flops()  # the recomputation, in backward (it may stop early)
                try:
                    return block(*inputs)
                finally:
                    recomputed[0] += counter.get_total_flops() - before

            return checkpoint(run, *args, use_reentrant=False)

        checkpointing = self.unwrapped.is_gradient_checkpointing
        if checkpointing:
            self.unwrapped.enable_gradient_checkpointing(counting_checkpoint)
        with counter:
            self.step(num_steps)
        if checkpointing:
            self.unwrapped.enable_gradient_checkpointing()  # back to diffusers' own checkpoint function
        executed = counter.get_total_flops()
        return executed - recomputed[0], executed

    def synchronise(self):
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)


def allocator_setting():
    """PYTORCH_CUDA_ALLOC_CONF when set (expandable segments change what fits), for the row."""
    value = os.environ.get("PYTORCH_CUDA_ALLOC_CONF")
    return {"cuda_alloc_conf": value} if value else {}


def phase(name):
    """Mark on stderr what the process is doing, so that a failure's row says where it happened."""
    print(f"PHASE {name}", file=sys.stderr, flush=True)


def run_one(args):
    """One configuration, in this process; prints one JSON line."""
    from train_inversion_dpo import compile_model

    cached = args.mode == "cached"
    bench = Bench(args.config, args.mode, args.lora, args.chunk, cache_dir=args.cache_dir,
                  load_reference=not cached or args.fill_cache, resolution=args.resolution)
    short = min(args.N, 2)
    phase("model and optimiser built")
    if args.fill_cache:
        phase("filling the cache")
        for n in sorted({short, args.N}):
            bench.fill(n)
        return
    device = bench.device
    calls = {"count": 0}
    for model in bench.unets():
        model.register_forward_hook(lambda *_: calls.__setitem__("count", calls["count"] + 1))

    phase(f"FLOP-counting warm-up step at N = {short}")
    model_flops, executed_flops = (count * args.N / short for count in bench.count_flops(short))  # also the warm-up
    warmup_seconds = None
    if args.compile:
        for model in bench.unets():
            compile_model(model, bench.trainer_args(short, "--torch_compile"))
        bench.synchronise()
        start = time.perf_counter()
        phase("compiling warm-up step")
        bench.step(short)  # compiles
        bench.synchronise()
        warmup_seconds = time.perf_counter() - start
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    seconds = []
    phase(f"timed steps at N = {args.N}")
    for _ in range(args.steps):
        calls["count"] = 0
        bench.synchronise()
        start = time.perf_counter()
        bench.step(args.N)
        bench.synchronise()
        seconds.append(time.perf_counter() - start)
    peak, reserved = peak_memory(device)
    result = {"mode": args.mode, "N": args.N, "seconds_per_step": statistics.median(seconds),
              "peak_memory_bytes": peak, "peak_reserved_bytes": reserved, "unet_calls": calls["count"],
              "device": torch.cuda.get_device_name(device) if device.type == "cuda" else f"cpu ({os.cpu_count()} cores)",
              "config": args.config, "resolution": bench.resolution, "lora": args.lora, "compile": args.compile,
              "trajectory_chunk_size": bench.setup(args.N)[0].trajectory_chunk_size,
              "flops_per_step": model_flops, "executed_flops_per_step": executed_flops,
              "gradient_checkpointing": bench.unwrapped.is_gradient_checkpointing, "compile_seconds": warmup_seconds,
              "torch": torch.__version__, **allocator_setting()}
    if device.type == "cuda":
        result["mfu"] = model_flops / result["seconds_per_step"] / (args.peak_tflops * 1e12)
        result["hfu"] = executed_flops / result["seconds_per_step"] / (args.peak_tflops * 1e12)
    print("RESULT " + json.dumps(result), flush=True)


def failure_row(mode, n, stderr):
    """The row of a configuration whose process failed: the error, the phase it failed in, and for an
    out-of-memory error torch's own line (how much was free, and how much this process held)."""
    lines = stderr.splitlines()
    oom = [line.strip() for line in lines if "out of memory" in line]
    raised = [line.strip() for line in lines if "Error" in line] or lines[-1:]
    phases = [line.removeprefix("PHASE ") for line in lines if line.startswith("PHASE ")]
    row = {"mode": mode, "N": n, "error": "out of memory" if oom else " ".join(raised[-1:])[:400],
           **allocator_setting()}
    if phases:
        row["phase"] = phases[-1]
    if oom:
        row["oom_detail"] = oom[-1][:400]
    return row


def run_configuration(args, mode, n, cache_dir):
    """Run one configuration in fresh processes (a filling one first for the cached mode); its row, or an error."""
    common = [sys.executable, __file__, "--config", args.config, "--mode", mode, "--N", str(n),
              "--chunk", str(args.chunk), "--cache_dir", cache_dir] + (["--lora"] if args.lora else []) \
        + (["--resolution", str(args.resolution)] if args.resolution else [])
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    commands = [common + ["--fill_cache"]] if mode == "cached" else []
    commands.append(common + ["--steps", str(args.steps), "--peak_tflops", str(args.peak_tflops)]
                    + (["--compile"] if args.compile else []))
    for command in commands:
        try:
            done = subprocess.run(command, capture_output=True, text=True, env=env, timeout=args.timeout)
        except subprocess.TimeoutExpired:
            return {"mode": mode, "N": n, "error": f"timed out after {args.timeout} s"}
        if done.returncode != 0:
            return failure_row(mode, n, done.stderr)
    lines = [line for line in done.stdout.splitlines() if line.startswith("RESULT ")]
    if not lines:
        return {"mode": mode, "N": n, "error": "no result printed"}
    return json.loads(lines[-1].removeprefix("RESULT "))


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", choices=list(KINDS), default="tiny")
    parser.add_argument("--lora", action="store_true")
    parser.add_argument("--resolution", type=int, default=None, help="Image side in pixels (default 1024 for sdxl, "
                                                                      "64 for tiny).")
    parser.add_argument("--compile", action="store_true", help="torch.compile the UNets (inductor), as --torch_compile.")
    parser.add_argument("--modes", nargs="+", choices=MODES, default=list(MODES))
    parser.add_argument("--inversion_steps", type=int, nargs="+", default=[10, 20, 40, 80], help="Values of N.")
    parser.add_argument("--stop_when_fits", action="store_true",
                        help="Per mode, try the values of N in the order given and stop at the first that runs "
                             "(e.g. --inversion_steps 80 40 20 10: the largest N that fits in memory).")
    parser.add_argument("--steps", type=int, default=3, help="Timed optimiser steps per configuration (median).")
    parser.add_argument("--chunk", type=int, default=1,
                        help="--trajectory_chunk_size of the uncached and cached modes; 0 means N (one graph).")
    parser.add_argument("--peak_tflops", type=float, default=989.0, help="The GPU's dense bf16 peak, for MFU.")
    parser.add_argument("--timeout", type=float, default=None, help="Seconds allowed per configuration.")
    parser.add_argument("--json", default=None, help="Append one JSON object per configuration to this file.")
    parser.add_argument("--mode", choices=MODES, help=argparse.SUPPRESS)  # a single configuration, in-process
    parser.add_argument("--N", type=int, help=argparse.SUPPRESS)
    parser.add_argument("--cache_dir", help=argparse.SUPPRESS)
    parser.add_argument("--fill_cache", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.mode:
        return run_one(args)
    rows = []
    for mode in args.modes:
        for n in args.inversion_steps:
            with tempfile.TemporaryDirectory() as cache_dir:
                row = run_configuration(args, mode, n, cache_dir)
            rows.append(row)
            if args.json:
                with open(args.json, "a") as f:
                    f.write(json.dumps(row) + "\n")
            if "error" in row:
                print(f"{mode} N={n}: failed ({row['error']})", flush=True)
                continue
            print(f"{mode:9s} N={n:3d}: {row['seconds_per_step']:.3f} s/step, {row['unet_calls']} UNet calls, "
                  f"peak {row['peak_memory_bytes'] / 2**20:.0f} MiB" +
                  (f", MFU {row['mfu']:.1%}" if "mfu" in row else ""), flush=True)
            if args.stop_when_fits:
                break
    print("\n| mode | N | K | s/step | UNet calls | TFLOP/step | MFU | peak memory (MiB) |\n|---|---|---|---|---|---|---|---|")
    for row in rows:
        if "error" in row:
            print(f"| {row['mode']} | {row['N']} | | {row['error']} | | | | |")
            continue
        mfu = f"{row['mfu']:.1%}" if "mfu" in row else ""
        print(f"| {row['mode']} | {row['N']} | {row['trajectory_chunk_size']} | {row['seconds_per_step']:.3f} | "
              f"{row['unet_calls']} | {row['flops_per_step'] / 1e12:.3g} | {mfu} | "
              f"{row['peak_memory_bytes'] / 2**20:.0f} |")


if __name__ == "__main__":
    main()
