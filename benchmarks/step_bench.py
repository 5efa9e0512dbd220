"""Seconds, UNet calls, FLOPs and peak memory of one optimiser step of Inversion-DPO (or of Diffusion-DPO, for the
comparison), for these schedules:

    released   the released code's schedule: both inversions recomputed every step, all N policy evaluations
               held in one graph until backward (--trajectory_chunk_size N); the paper form only (--loss_type
               inversion_dpo, all N steps: what the released code ran)
    uncached   this project without a cache: inversions every step (and the anchored form's N reference calls at
               the inversion's points)
    cached     this project with a warm trajectory cache (trajectory_cache.py): no inversion, no reference call (the
               anchored form's reference errors are in the cache), and for a full fine-tune no reference UNet in
               memory (as in the trainer)
    noising    Diffusion-DPO's step (--loss_type diffusion_dpo, its only mode): the trainer's noising_loss on the
               same pair (the winner's conditioning row for both, as the trainer passes it), the policy and the
               reference at one random noise level, then AdamW. The reference is loaded (full fine-tune: a frozen
               copy; LoRA: the policy with its adapters off). The trainer's cached Diffusion-DPO step reads only
               the latents and conditioning from the cache; the benchmark gives every mode those already (encoders
               are outside the step), so this one step is Diffusion-DPO both cached and uncached, and the modes
               released, uncached and cached are refused for it (as noising is for the trajectory forms).

The uncached and cached modes use --chunk K (default 1: the gradient one step at a time, memory independent of N;
0: one graph of all N steps, one policy call).

for N inversion steps in {10, 20, 40, 80}. The step is the trainer's own code (invert_pairs, trajectory_loss,
noising_loss) on one pair, guidance 2 (FLUX: its guidance embedding, 3.5), conditioning given (text encoders and VAE
are outside the step being measured). The loss is the trainer's: --loss_type (default inversion_dpo, the paper form of
the tables of docs/speed_and_memory.md; inversion_dpo_x0 the anchored form, which stores the reference's per-step errors in the cache
when filling it), --loss_timesteps M with --loss_timestep_sampling (the policy at M of the N steps, drawn by a fresh
default torch.Generator each step, so every step draws the same ones), --loss_guidance_scale (the anchored form's
loss guidance; 1: one pass per point). Every row records loss_type, loss_timesteps, loss_timestep_sampling (null
without M) and loss_guidance_scale (as the trainer resolves it; null for Diffusion-DPO on a UNet, which has no
guidance).

    python benchmarks/step_bench.py                          # tiny SDXL-shaped UNet on the CPU, 64 px
    python benchmarks/step_bench.py --config sdxl --json out.jsonl   # SDXL-sized UNet, random weights, 1024 px, bf16, CUDA
    python benchmarks/step_bench.py --config sdxl --lora ...         # the same with LoRA adapters (rank 64)
    python benchmarks/step_bench.py --config sd3 ...    # SD3.5-medium-sized transformer (flow inversion, CFG 2)
    python benchmarks/step_bench.py --config flux --lora ...   # FLUX.1-dev-sized transformer (guidance embedding)
    python benchmarks/step_bench.py --config tiny_sd3   # (tiny_flux) the tiny flow models on the CPU, 64 px
    python benchmarks/step_bench.py --config sdxl --loss_type diffusion_dpo          # Diffusion-DPO's step
    python benchmarks/step_bench.py --config sdxl --loss_type inversion_dpo_x0 --modes cached --inversion_steps 80 \
        --loss_guidance_scale 1 --loss_timesteps 4 --loss_timestep_sampling stratified --chunk 4

Each configuration runs in a fresh process so that peak memory is its own: torch.cuda.max_memory_allocated (and
_reserved) on a GPU, the process's peak resident set on a CPU (which includes the interpreter, the weights and whatever
the allocator keeps). A cached configuration's cache is filled by a process of its own first, as
--fill_inversion_cache does before training.

Per configuration: one warm-up step, run eagerly under torch.utils.flop_counter, gives the FLOPs. With every step
evaluated, the trajectory forms' FLOPs are linear in N with no constant term (N inversion steps, the anchored form's
N reference calls, N policy evaluations; the optimiser and the loss's elementwise work count no FLOPs), so the
warm-up runs at N' = min(N, 2) and a step at N costs N/N' times that. With --loss_timesteps M the policy's share no
longer grows with N (M evaluations whatever N; uncached: plus the inversion, which does), and Diffusion-DPO's step
has no N at all: those warm-ups run at the real N (for a cached M-step row that is M policy evaluations, seconds on
a GPU). executed_flops_per_step counts everything, flops_per_step leaves out the forward passes that gradient
checkpointing (on for sdxl) recomputes. With --compile the UNets are then compiled and a second warm-up (at the same
N as the first) compiles them; then --steps timed steps at N. Model FLOP utilisation mfu = flops_per_step / seconds
per step / --peak_tflops (the GPU's dense bf16 peak; 989 for an H100 SXM), hfu the same with the executed FLOPs.
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

import startup  # noqa: E402,F401  (before diffusers: quiets two start-up warnings)

from losses import LOSS_STEP_SAMPLINGS  # noqa: E402  (torch only)
from full_models import FLUX_DEV_TRANSFORMER, SD35_MEDIUM_TRANSFORMER, SDXL_UNET  # noqa: E402

MODES = ("released", "uncached", "cached", "noising")
LOSS_TYPES = ("inversion_dpo", "inversion_dpo_x0", "diffusion_dpo")  # the paper form, the anchored form, the baseline
NOISING_LOSSES = ("diffusion_dpo",)  # one random noise level per pair: no inversion, no N

# The shapes and cost of the real models (random weights, nothing downloaded): benchmarks/full_models.py
KINDS = {"tiny": "sdxl", "sdxl": "sdxl", "tiny_sd3": "sd3", "sd3": "sd3", "tiny_flux": "flux", "flux": "flux"}
GUIDANCE = {"sdxl": 2.0, "sd3": 2.0, "flux": 3.5}  # flux: the value of its guidance embedding (one call per step)


def modes_for(loss_type, loss_timesteps=None):
    """The modes a loss takes: Diffusion-DPO's one step (noising); the trajectory forms' uncached and cached steps,
    and the released code's schedule for what it ran (the paper form at every step)."""
    if loss_type in NOISING_LOSSES:
        return ("noising",)
    if loss_type == "inversion_dpo" and loss_timesteps is None:
        return ("released", "uncached", "cached")
    return ("uncached", "cached")


def mode_error(loss_type, mode, loss_timesteps=None):
    """Why `mode` does not apply to the loss settings, or None."""
    if mode in modes_for(loss_type, loss_timesteps):
        return None
    if loss_type in NOISING_LOSSES:
        return (f"--loss_type {loss_type} has one step here, mode noising: the trainer's cached Diffusion-DPO step "
                "only reads the latents and conditioning from the cache, and this benchmark gives every mode those "
                "already, so its cached and uncached steps are the same step (and it has no inversion to release "
                f"or cache); use --modes noising, not {mode}")
    if mode == "noising":
        takes = ", ".join(modes_for(loss_type, loss_timesteps))
        return f"mode noising is Diffusion-DPO's step; --loss_type {loss_type} takes {takes}"
    return ("mode released is the released code's step, the paper form (--loss_type inversion_dpo) at all N steps "
            "in one graph; for that schedule with other loss settings use --modes uncached --chunk 0")


def trainer_argv(kind, resolution, mode, chunk, num_steps, loss_type="inversion_dpo", loss_timesteps=None,
                 loss_timestep_sampling=None, loss_guidance_scale=None):
    """The trainer's command line for one configuration (num_steps None: Diffusion-DPO's step, no inversion)."""
    argv = ["--pretrained_model_name_or_path", "unused", "--dataset_name", "unused", "--loss_type", loss_type,
            "--resolution", str(resolution), "--inversion_guidance_scale", str(GUIDANCE[kind])]
    if num_steps is not None:
        k = num_steps if mode == "released" or chunk == 0 else chunk
        argv += ["--num_inference_steps", str(num_steps), "--trajectory_chunk_size", str(k)]
    if loss_timesteps is not None:
        argv += ["--loss_timesteps", str(loss_timesteps)]
    if loss_timestep_sampling is not None:  # the trainer refuses a draw without M
        argv += ["--loss_timestep_sampling", loss_timestep_sampling]
    if loss_guidance_scale is not None:
        argv += ["--loss_guidance_scale", str(loss_guidance_scale)]
    return argv


def loss_fields(trainer_args, kind):
    """What a row records of the loss settings, as the trainer resolved them."""
    noising = trainer_args.loss_type in NOISING_LOSSES
    return {"loss_type": trainer_args.loss_type, "loss_timesteps": trainer_args.loss_timesteps,
            "loss_timestep_sampling": trainer_args.loss_timestep_sampling if trainer_args.loss_timesteps else None,
            # Diffusion-DPO on a UNet or SD3 runs the conditional prediction alone; FLUX takes it as its embedding
            "loss_guidance_scale": None if noising and kind != "flux" else trainer_args.loss_guidance_scale}


def peak_memory(device):
    """(peak bytes allocated, peak bytes reserved by the allocator); on a CPU both are the peak resident set."""
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device), torch.cuda.max_memory_reserved(device)
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # Linux reports KiB
    return peak, peak


class Bench:
    """One configuration: the policy (full fine-tune or LoRA), its reference, one pair's conditioning and latents,
    and `step(N)`, one optimiser step of the trainer's code on a trajectory of N steps (Diffusion-DPO: `step(None)`,
    the trainer's noising_loss on the pair). `loss_type`, `loss_timesteps`, `loss_timestep_sampling` and
    `loss_guidance_scale` are the trainer's flags (None: its default)."""

    def __init__(self, config, mode, lora=False, chunk=1, cache_dir=None, load_reference=True, device=None,
                 resolution=None, gradient_checkpointing=None, loss_type="inversion_dpo", loss_timesteps=None,
                 loss_timestep_sampling=None, loss_guidance_scale=None):
        from accelerate import Accelerator

        from diffusers import FluxTransformer2DModel, SD3Transformer2DModel, UNet2DConditionModel

        from models import Conditioning
        from tiny_models import build_tiny_flux, build_tiny_sd3, build_tiny_sdxl
        from models import DEFAULT_LORA_TARGETS
        from training import Reference

        self.mode, self.chunk, self.kind = mode, chunk, KINDS[config]
        self.loss = dict(loss_type=loss_type, loss_timesteps=loss_timesteps,
                         loss_timestep_sampling=loss_timestep_sampling, loss_guidance_scale=loss_guidance_scale)
        if mode_error(loss_type, mode, loss_timesteps):
            raise ValueError(mode_error(loss_type, mode, loss_timesteps))
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
        from arguments import parse_args

        return parse_args(trainer_argv(self.kind, self.resolution, self.mode, self.chunk, num_steps, **self.loss)
                          + list(extra))

    @property
    def noising(self):
        return self.loss["loss_type"] in NOISING_LOSSES

    def setup(self, num_steps):
        """(trainer arguments, schedule, timestep weights, cache or None) for N steps, made once: what the trainer
        prepares before its loop stays out of the timed step. Diffusion-DPO (num_steps None): (trainer arguments,
        the training noise levels it draws from, None, None)."""
        if num_steps not in self._setups:
            from inversion import FlowSchedule, InversionSchedule, flow_training_sigmas, training_alphas
            from tiny_models import FLUX_SCHEDULER_CONFIG, SCHEDULER_CONFIG, SD3_SCHEDULER_CONFIG
            from training import step_weights
            from trajectory_cache import TrajectoryCache

            scheduler_config = {"sdxl": SCHEDULER_CONFIG, "sd3": SD3_SCHEDULER_CONFIG,
                                "flux": FLUX_SCHEDULER_CONFIG}[self.kind]
            if self.noising:
                if num_steps is not None:
                    raise ValueError(f"{self.loss['loss_type']} has no inversion: step(None), not step({num_steps})")
                levels = (training_alphas if self.kind == "sdxl" else flow_training_sigmas)(scheduler_config)
                self._setups[num_steps] = (self.trainer_args(None), levels, None, None)  # on the CPU, as the trainer's
                return self._setups[num_steps]
            args = self.trainer_args(num_steps)
            if self.kind == "sdxl":
                schedule = InversionSchedule.from_scheduler_config(SCHEDULER_CONFIG, num_steps)
            else:  # the real models' scheduler configs
                schedule = FlowSchedule.for_pipeline(self.kind, scheduler_config, num_steps, self.resolution // 8)
            weights = step_weights(schedule, "official").to(self.device)
            # keyed by what fixes an entry here (the reference's random weights are the same in every process)
            settings = {"N": num_steps, "config": self.kind, "resolution": self.resolution,
                        "loss_guidance": args.loss_guidance_scale}
            cache = TrajectoryCache(self.cache_dir, "bench", settings) if self.mode == "cached" else None
            self._setups[num_steps] = (args, schedule, weights, cache)
        return self._setups[num_steps]

    def fill(self, num_steps):
        """Write the trajectories of N steps into the cache (what --fill_inversion_cache does), with the anchored
        form's reference errors (invert_pairs stores them for the forms evaluated at x_i)."""
        from training import invert_pairs

        args, schedule, _, cache = self.setup(num_steps)
        invert_pairs(args, self.reference, self.latents, self.cond, self.uncond, schedule, cache, self.keys)

    def step(self, num_steps):
        """One optimiser step: trajectories (inverted, or read from the cache), the loss and its gradient, AdamW.
        Diffusion-DPO (num_steps None): the policy's and reference's errors at one noise level, the gradient, AdamW."""
        from training import invert_pairs, noising_loss, trajectory_loss

        if self.noising:
            args, levels, _, _ = self.setup(num_steps)
            latents_w, latents_l = self.latents.chunk(2)
            cond_w = self.cond.select(slice(0, 1))  # the winner's row for both, as the trainer's training_step
            noising_loss(args, self.accelerator, self.policy, self.reference, latents_w, latents_l, cond_w, levels,
                         torch.Generator())
            self.optimizer.step()
            self.optimizer.zero_grad(set_to_none=True)
            return
        args, schedule, weights, cache = self.setup(num_steps)
        trajectories = invert_pairs(args, self.reference, self.latents, self.cond, self.uncond, schedule, cache,
                                    self.keys)
        trajectory_loss(args, self.accelerator, self.policy, trajectories, self.cond, self.uncond, weights,
                        torch.Generator())
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)

    def count_flops(self, num_steps):
        """(model FLOPs, executed FLOPs) of step(num_steps), run eagerly as configured, counted as the trainer counts
        them (step_meter.FlopCount): executed FLOPs include the forward passes that gradient checkpointing recomputes
        during backward; model FLOPs leave them out."""
        from step_meter import FlopCount

        with FlopCount(self.unwrapped) as count:
            self.step(num_steps)
        return count.model_flops, count.executed_flops

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


def warmup_steps(num_steps, loss_type, loss_timesteps):
    """N' of the FLOP-counting (and compiling) warm-up step: min(N, 2) where the FLOPs are linear in N (every step
    evaluated), else N itself (--loss_timesteps M: the policy's M evaluations do not grow with N; Diffusion-DPO: no
    N, None)."""
    if loss_type in NOISING_LOSSES or loss_timesteps is not None:
        return num_steps
    return min(num_steps, 2)


def loss_options(args):
    return dict(loss_type=args.loss_type, loss_timesteps=args.loss_timesteps,
                loss_timestep_sampling=args.loss_timestep_sampling, loss_guidance_scale=args.loss_guidance_scale)


def run_one(args):
    """One configuration, in this process; prints one JSON line."""
    from models import compile_model

    cached = args.mode == "cached"
    bench = Bench(args.config, args.mode, args.lora, args.chunk, cache_dir=args.cache_dir,
                  load_reference=not cached or args.fill_cache, resolution=args.resolution, **loss_options(args))
    short = warmup_steps(args.N, args.loss_type, args.loss_timesteps)
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

    at = "" if short is None else f" at N = {short}"
    phase(f"FLOP-counting warm-up step{at}")
    scale = 1 if short == args.N else args.N / short  # linear in N (see the module's docstring)
    model_flops, executed_flops = (count * scale for count in bench.count_flops(short))  # also the warm-up
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
    phase("timed steps" + ("" if args.N is None else f" at N = {args.N}"))
    for _ in range(args.steps):
        calls["count"] = 0
        bench.synchronise()
        start = time.perf_counter()
        bench.step(args.N)
        bench.synchronise()
        seconds.append(time.perf_counter() - start)
    peak, reserved = peak_memory(device)
    trainer_args = bench.setup(args.N)[0]
    result = {"mode": args.mode, "N": args.N, **loss_fields(trainer_args, bench.kind),
              "inversion_guidance_scale": None if bench.noising else trainer_args.inversion_guidance_scale,
              "seconds_per_step": statistics.median(seconds),
              "peak_memory_bytes": peak, "peak_reserved_bytes": reserved, "unet_calls": calls["count"],
              "device": torch.cuda.get_device_name(device) if device.type == "cuda" else f"cpu ({os.cpu_count()} cores)",
              "config": args.config, "resolution": bench.resolution, "lora": args.lora, "compile": args.compile,
              "trajectory_chunk_size": None if bench.noising else trainer_args.trajectory_chunk_size,
              "flops_per_step": model_flops, "executed_flops_per_step": executed_flops, "flops_counted_at_N": short,
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


def configuration_trainer_args(args, mode, n):
    """The trainer's arguments for one configuration, parsed and checked by the trainer's own parser (a bad
    combination, e.g. --loss_timesteps above N, exits here with its message, before any model is built)."""
    from arguments import parse_args

    resolution = args.resolution or (64 if args.config.startswith("tiny") else 1024)
    return parse_args(trainer_argv(KINDS[args.config], resolution, mode, args.chunk, n, **loss_options(args)))


def loss_flags(args):
    """The loss flags of the command line, for the per-configuration processes."""
    flags = ["--loss_type", args.loss_type]
    if args.loss_timestep_sampling is not None:
        flags += ["--loss_timestep_sampling", args.loss_timestep_sampling]
    if args.loss_timesteps is not None:
        flags += ["--loss_timesteps", str(args.loss_timesteps)]
    if args.loss_guidance_scale is not None:
        flags += ["--loss_guidance_scale", str(args.loss_guidance_scale)]
    return flags


def run_configuration(args, mode, n, cache_dir):
    """Run one configuration in fresh processes (a filling one first for the cached mode); its row, or an error
    (with the configuration's loss settings)."""
    common = [sys.executable, __file__, "--config", args.config, "--mode", mode, "--chunk", str(args.chunk),
              "--cache_dir", cache_dir] + (["--N", str(n)] if n is not None else []) + loss_flags(args) \
        + (["--lora"] if args.lora else []) + (["--resolution", str(args.resolution)] if args.resolution else [])
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    commands = [common + ["--fill_cache"]] if mode == "cached" else []
    commands.append(common + ["--steps", str(args.steps), "--peak_tflops", str(args.peak_tflops)]
                    + (["--compile"] if args.compile else []))
    labels = loss_fields(configuration_trainer_args(args, mode, n), KINDS[args.config])
    for command in commands:
        try:
            done = subprocess.run(command, capture_output=True, text=True, env=env, timeout=args.timeout)
        except subprocess.TimeoutExpired:
            return {"mode": mode, "N": n, **labels, "error": f"timed out after {args.timeout} s"}
        if done.returncode != 0:
            return {**failure_row(mode, n, done.stderr), **labels}
    lines = [line for line in done.stdout.splitlines() if line.startswith("RESULT ")]
    if not lines:
        return {"mode": mode, "N": n, **labels, "error": "no result printed"}
    return json.loads(lines[-1].removeprefix("RESULT "))


def describe(row):
    """The loss settings of a row, in a few words."""
    words = [row.get("loss_type", "inversion_dpo")]
    if row.get("loss_timesteps") is not None:
        words.append(f"M {row['loss_timesteps']} {row['loss_timestep_sampling']}")
    if row.get("loss_guidance_scale") is not None and row.get("loss_type") == "inversion_dpo_x0":
        words.append(f"loss g {row['loss_guidance_scale']:g}")
    return ", ".join(words)


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", choices=list(KINDS), default="tiny")
    parser.add_argument("--lora", action="store_true")
    parser.add_argument("--resolution", type=int, default=None, help="Image side in pixels (default 1024 for sdxl, "
                                                                      "64 for tiny).")
    parser.add_argument("--compile", action="store_true", help="torch.compile the UNets (inductor), as --torch_compile.")
    parser.add_argument("--modes", nargs="+", choices=MODES, default=None,
                        help="Default: every mode the loss takes (released, uncached, cached for the paper form; "
                             "uncached, cached for the anchored form or with --loss_timesteps; noising for "
                             "diffusion_dpo).")
    parser.add_argument("--loss_type", choices=LOSS_TYPES, default="inversion_dpo",
                        help="The trainer's --loss_type (default inversion_dpo, the paper form of docs/speed_and_memory.md's "
                             "tables).")
    parser.add_argument("--loss_timesteps", type=int, default=None,
                        help="The trainer's --loss_timesteps M: the policy at M of the N steps (trajectory forms).")
    parser.add_argument("--loss_timestep_sampling", default=None, choices=LOSS_STEP_SAMPLINGS,
                        help="The trainer's --loss_timestep_sampling (with --loss_timesteps; default stratified).")
    parser.add_argument("--loss_guidance_scale", type=float, default=None,
                        help="The trainer's --loss_guidance_scale (default: the inversion's guidance).")
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
    for mode in [args.mode] if args.mode else args.modes or []:
        if mode_error(args.loss_type, mode, args.loss_timesteps):
            parser.error(mode_error(args.loss_type, mode, args.loss_timesteps))
    if args.mode:
        return run_one(args)
    args.modes = args.modes or list(modes_for(args.loss_type, args.loss_timesteps))
    plan = [(mode, [None] if mode == "noising" else args.inversion_steps) for mode in args.modes]
    for mode, values in plan:  # the trainer's own checks, before any model is built
        for n in values:
            configuration_trainer_args(args, mode, n)
    rows = []
    for mode, values in plan:
        for n in values:
            with tempfile.TemporaryDirectory() as cache_dir:
                row = run_configuration(args, mode, n, cache_dir)
            rows.append(row)
            if args.json:
                with open(args.json, "a") as f:
                    f.write(json.dumps(row) + "\n")
            where = f"{describe(row)}, {mode:9s}" + ("" if n is None else f" N={n:3d}")
            if "error" in row:
                print(f"{where}: failed ({row['error']})", flush=True)
                continue
            print(f"{where}: {row['seconds_per_step']:.3f} s/step, {row['unet_calls']} UNet calls, "
                  f"peak {row['peak_memory_bytes'] / 2**20:.0f} MiB" +
                  (f", MFU {row['mfu']:.1%}" if "mfu" in row else ""), flush=True)
            if args.stop_when_fits:
                break
    print("\n| loss | mode | N | K | s/step | UNet calls | TFLOP/step | MFU | peak memory (MiB) |\n"
          "|---|---|---|---|---|---|---|---|---|")
    for row in rows:
        n, k = ("" if row.get(key) is None else row[key] for key in ("N", "trajectory_chunk_size"))
        if "error" in row:
            print(f"| {describe(row)} | {row['mode']} | {n} | | {row['error']} | | | | |")
            continue
        mfu = f"{row['mfu']:.1%}" if "mfu" in row else ""
        print(f"| {describe(row)} | {row['mode']} | {n} | {k} | {row['seconds_per_step']:.3f} | "
              f"{row['unet_calls']} | {row['flops_per_step'] / 1e12:.3g} | {mfu} | "
              f"{row['peak_memory_bytes'] / 2**20:.0f} |")


if __name__ == "__main__":
    main()
