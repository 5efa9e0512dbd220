#!/usr/bin/env python
"""Inversion-DPO training for SDXL, SD1.x/2.x, SD3/SD3.5 and FLUX.1.

    accelerate launch train_inversion_dpo.py --pretrained_model_name_or_path stabilityai/stable-diffusion-xl-base-1.0 \
        --dataset_name PATH_OR_HUB_ID --output_dir out [...]

Per batch of (winner, loser, caption) pairs: encode captions and images (no gradient), invert both images with the
frozen reference model (DDIM for UNets, Euler steps of the flow for SD3 and FLUX transformers), evaluate the trained
model along the two trajectories, take one of the losses in `losses.py`, step. The kind of model is read from the
model folder itself. The maths lives in `inversion.py` and `losses.py`, the model families in `models.py`, the
training step in `training.py`, the data in `data.py`; this file is the command line and the recipe that wires them
(`main`, step by step).
"""

import contextlib
import json
import logging
import math
import os
import shutil
import time
from dataclasses import dataclass, fields
from pathlib import Path

import torch

import startup  # noqa: F401  (first of the project's modules: it quiets two start-up warnings)
import losses
from arguments import build_parser, parse_args  # noqa: F401  (the command line; tests and docs/make_flags.py read it here)
from inversion import flow_training_sigmas, training_alphas
from models import (
    DEFAULT_LORA_TARGETS,
    DEFAULT_MAX_SEQUENCE_LENGTH,
    FLOW_KINDS,
    MODEL_KINDS,
    PIPELINES,
    add_lora,
    build_pipeline,
    compile_model,
    diffusers_class,
    load_models,
    load_reference,
    make_prompt_encoder,
    model_prediction,
    save_model,
)
from training import (
    NOISING_FORMS,
    BetaRule,
    Reference,
    encode_pairs,
    image_keys,
    inversion_scheduler_config,
    invert_pairs,
    make_schedule,
    perturb,
    step_weights,
    training_step,
)
import memory_budget
import runs
from step_meter import PHASES, FlopCount, StepMeter, StepProfile, peak_tflops, phase
from trajectory_cache import TrajectoryCache, weights_fingerprint

logger = logging.getLogger("train_inversion_dpo")

MEMORY_FLAGS = ("--train_batch_size (lower, with more --gradient_accumulation_steps)", "--trajectory_chunk_size",
                "--gradient_checkpointing", "--use_lora", "--mixed_precision bf16", "--use_adafactor",
                "--num_inference_steps")


# ----------------------------------------------------------------------------------------------------------------
# The cache, the optimiser (models.py loads the models; training.py holds the step)
# ----------------------------------------------------------------------------------------------------------------


def make_cache(args, models, inversion_config, schedule, weight_dtype, vae_dtype):
    """The trajectory cache, keyed by fingerprints of the weights as they compute: the VAE and text encoders (for the
    encodings) and the reference, the base denoiser as loaded in weight_dtype (for the trajectories)."""
    kind, vae = models["kind"], models["vae"]
    encoders = dict(kind=kind, vae=weights_fingerprint(vae, vae_dtype), scaling_factor=vae.config.scaling_factor,
                    shift_factor=getattr(vae.config, "shift_factor", None),
                    max_sequence_length=args.max_sequence_length or DEFAULT_MAX_SEQUENCE_LENGTH.get(kind),
                    text_encoders=[None if encoder is None else weights_fingerprint(encoder, weight_dtype)
                                   for encoder in models["text_encoders"]])
    settings = dict(num_steps=args.num_inference_steps, guidance=args.inversion_guidance_scale,
                    loss_guidance=args.loss_guidance_scale,
                    scheduler={k: v for k, v in inversion_config.items() if not k.startswith("_")},
                    zero_unconditional=kind == "sdxl")
    if kind in FLOW_KINDS:
        settings.update(kind=kind, sigmas=schedule.sigmas.tolist())
    if args.anchor_points != "inversion":  # the reference's errors are taken at other points (the plain key unchanged)
        settings.update(anchor_points=args.anchor_points)
    return TrajectoryCache(args.inversion_cache_dir, weights_fingerprint(models["denoiser"], weight_dtype), settings,
                           args.inversion_cache_dtype, encoders)


def set_peak_learning_rate(lr_scheduler, learning_rate):
    """After a resume, train at this run's --learning_rate (a checkpoint's scheduler state holds the old one), at the
    same point of the schedule."""
    scheduler = lr_scheduler.scheduler
    if not hasattr(scheduler, "lr_lambdas") or scheduler.base_lrs == [learning_rate] * len(scheduler.base_lrs):
        return
    logger.info("learning rate %s from the checkpoint replaced by --learning_rate %s", scheduler.base_lrs[0],
                learning_rate)
    scheduler.base_lrs = [learning_rate] * len(scheduler.base_lrs)
    rates = [learning_rate * factor(scheduler.last_epoch) for factor in scheduler.lr_lambdas]
    for group, rate in zip(scheduler.optimizer.param_groups, rates):
        group["lr"] = rate
    scheduler._last_lr = rates


def make_optimizer(args, params):
    if args.use_adafactor:
        from transformers.optimization import Adafactor

        return Adafactor(params, lr=args.learning_rate, weight_decay=args.adam_weight_decay,
                         clip_threshold=1.0, scale_parameter=False, relative_step=False)
    if args.use_8bit_adam:
        try:
            import bitsandbytes as bnb
        except ImportError as error:
            raise ImportError("--use_8bit_adam needs bitsandbytes: pip install bitsandbytes") from error
        optimizer_class = bnb.optim.AdamW8bit
    else:
        optimizer_class = torch.optim.AdamW
    return optimizer_class(params, lr=args.learning_rate, betas=(args.adam_beta1, args.adam_beta2),
                           weight_decay=args.adam_weight_decay, eps=args.adam_epsilon)


# ----------------------------------------------------------------------------------------------------------------
# Non-finite steps
# ----------------------------------------------------------------------------------------------------------------


NONFINITE_ADVICE = ("a lower --learning_rate, a lower --beta_dpo, --mixed_precision bf16 (or no) instead of fp16, "
                    "gradient clipping (--max_grad_norm 1)")


class NonFiniteGuard:
    """Counts optimiser steps whose loss or gradient was not finite (each is skipped, see `main`) and says when too
    many came in a row. Saved in checkpoints (`accelerator.register_for_checkpointing`), so a resumed run counts on."""

    def __init__(self, max_in_a_row):
        self.max_in_a_row = max_in_a_row
        self.total = 0
        self.in_a_row = 0

    def update(self, finite, step, row_ids, process_index):
        """Record one optimiser step; True when --max_nonfinite_steps non-finite steps have come in a row."""
        if finite:
            self.in_a_row = 0
            return False
        self.total += 1
        self.in_a_row += 1
        logger.warning("step %d: the loss or gradient is not finite; the update is skipped (%d in a row). Pairs on "
                       "process %d: rows %s", step, self.in_a_row, process_index, row_ids)
        return self.in_a_row >= self.max_in_a_row

    def state_dict(self):
        return {"total": self.total, "in_a_row": self.in_a_row}

    def load_state_dict(self, state):
        self.total, self.in_a_row = state["total"], state["in_a_row"]


def activation_probe(args, accelerator, models, denoiser, prompt_encoder):
    """Bytes the policy's graph holds per image at --resolution: one forward and backward (to the input only) of the
    policy as configured (dtype, autocast, checkpointing), one image at two small resolutions, extrapolated in pixel
    count (memory_budget.graph_bytes, memory_budget.extrapolate). Random draws from a generator of its own."""
    vae_config = models["vae"].config
    scale = 2 ** (len(vae_config.block_out_channels) - 1)
    generator = torch.Generator().manual_seed(0)
    measured = {}
    for side in memory_budget.probe_sizes(args.resolution // scale):
        size = side * scale
        with torch.no_grad():
            cond = prompt_encoder.encode(["a probe"], [[size, size]], [[0, 0]], (size, size))
        latents = torch.randn((1, vae_config.latent_channels, side, side), generator=generator)
        latents = latents.to(accelerator.device).requires_grad_(True)
        timesteps = torch.full((1,), 500, device=accelerator.device)  # DDPM t, or sigma 0.5 x 1000 for flows
        timesteps = timesteps if cond.kind == "unet" else timesteps.float()

        def forward():
            with accelerator.autocast():
                return model_prediction(denoiser, latents, timesteps, cond, args.loss_guidance_scale)

        measured[side] = memory_budget.graph_bytes(forward, latents, exclude=list(denoiser.parameters()))
    return memory_budget.extrapolate(measured, args.resolution // scale)


def memory_plan(args, accelerator, kind, models, denoiser, prompt_encoder, weight_dtype, cache):
    """The run's memory budget (memory_budget.Budget), its RunShape and Sizes: counted from the loaded modules,
    the optimiser's rules and the activation probe, before the reference loads."""
    parameters = dict(denoiser.named_parameters())
    base = sum(p.numel() for name, p in parameters.items() if "lora_" not in name)
    dtype_bytes = torch.finfo(weight_dtype).bits // 8
    targets = args.lora_target_modules or DEFAULT_LORA_TARGETS[MODEL_KINDS[kind][1]]
    lora_shapes = memory_budget.lora_parameter_shapes(denoiser, args.rank or 8, targets)
    sizes = memory_budget.Sizes(
        policy_bytes=memory_budget.module_bytes(denoiser),
        trainable_shapes=[tuple(p.shape) for p in parameters.values() if p.requires_grad],
        reference_bytes=base * dtype_bytes,
        frozen_bytes=memory_budget.module_bytes(*models["text_encoders"], models["vae"]),
        activation_per_image=activation_probe(args, accelerator, models, denoiser, prompt_encoder),
        lora_policy_bytes=base * dtype_bytes + 4 * sum(torch.Size(s).numel() for s in lora_shapes),
        lora_shapes=lora_shapes)
    optimizer = "adafactor" if args.use_adafactor else "adamw8bit" if args.use_8bit_adam else "adamw"
    evaluated = args.loss_timesteps or args.num_inference_steps
    shape = memory_budget.RunShape(
        loss_type=args.loss_type, batch_size=args.train_batch_size,
        chunk=evaluated if args.trajectory_chunk_size == "auto" else args.trajectory_chunk_size,
        evaluated=evaluated, guidance=args.loss_guidance_scale, optimizer=optimizer, lora=args.use_lora,
        reference_loaded=not args.use_lora and args.loss_type != "sft" and cache is None,
        processes=accelerator.num_processes, sharded=accelerator.is_fsdp2)
    limit = None
    if args.memory_limit_gib is not None:
        limit = int(args.memory_limit_gib * memory_budget.GIB)
    elif accelerator.device.type == "cuda":
        limit = torch.cuda.get_device_properties(accelerator.device).total_memory
    if args.trajectory_chunk_size == "auto":
        shape.chunk = memory_budget.largest_chunk(shape, sizes, limit)
        args.trajectory_chunk_size = shape.chunk
        logger.info("--trajectory_chunk_size auto: %d (%s)", shape.chunk, "every evaluated step: no memory limit "
                    "known" if limit is None else f"the largest that fits {memory_budget.size(limit)}")
    budget = memory_budget.plan(shape, sizes, limit)
    if cache is not None and not args.use_lora and args.loss_type != "sft":
        budget.notes.append(f"with a warm trajectory cache; a cold one loads the reference too: "
                            f"+{sizes.reference_bytes / memory_budget.GIB:.2f} GiB")
    return budget, shape, sizes


def report_budget(budget, shape, sizes, out):
    """The budget's lines, and when it does not fit, the flag changes that would (or come nearest), to `out`."""
    out(f"memory budget (one process{', ' + str(shape.processes) + ' processes' if shape.processes > 1 else ''}):")
    for line in budget.lines():
        out(line)
    if not budget.fits:
        out("flags that would bring it under the limit (each alone; the nearest first when none does):")
        for flags, other in memory_budget.alternatives(shape, sizes, budget.limit)[:6]:
            out(f"  {flags}: {memory_budget.size(other.total)}{'' if other.fits else ' (still over)'}")


def flop_counter(args, accelerator, denoiser, meter):
    """A FlopCount for the run's first optimiser step when an MFU can come of it (the card's peak is known), else
    None. Not under torch.compile, FSDP or DeepSpeed, whose graphs the counter does not see whole."""
    from accelerate.utils import DistributedType

    sharded = accelerator.distributed_type in (DistributedType.FSDP, DistributedType.DEEPSPEED)
    if meter.peak is None or args.torch_compile or sharded:
        return None
    return FlopCount(accelerator.unwrap_model(denoiser))


def apply_update(accelerator, optimizer, lr_scheduler, finite):
    """Step the optimiser and the learning-rate schedule only when the step's loss and gradient are `finite`: a
    non-finite step changes no weight and no optimiser state. With fp16 loss scaling, the scaler (which unscaled the
    gradient for clipping and saw the overflow) lowers its scale, as in accelerate's own skipped steps."""
    if finite:
        optimizer.step()
        lr_scheduler.step()
    elif accelerator.scaler is not None:
        accelerator.scaler.update()
    optimizer.zero_grad(set_to_none=True)


def all_finite(accelerator, tensors):
    """Whether every element of `tensors` is finite on every process (one collective)."""
    local = all(bool(torch.isfinite(t).all()) for t in tensors)
    return bool(accelerator.gather(torch.tensor([local], device=accelerator.device)).all())


def json_line(record):
    """One metrics.jsonl line: strict JSON, with null for a non-finite number."""
    clean = {k: v if not isinstance(v, float) or math.isfinite(v) else None for k, v in record.items()}
    return json.dumps(clean, allow_nan=False) + "\n"


def mean_metrics(accelerator, step_metrics):
    """Each metric's mean over the micro-steps of an optimiser step and over processes: one collective, one sync."""
    names = list(step_metrics[0])
    means = torch.stack([torch.stack([m[k].float() for m in step_metrics]).mean() for k in names])
    return dict(zip(names, accelerator.reduce(means, "mean").tolist()))


def require_finite_weights(accelerator, params, global_step, what):
    """Stop before writing a `what` whose trained weights are not all finite."""
    if not all_finite(accelerator, params):
        stop_run(accelerator, f"the trained weights are not finite after step {global_step}, so no {what} was "
                              f"written. Try {NONFINITE_ADVICE}, then --resume_from_checkpoint latest.")


def stop_run(accelerator, message):
    """End every process with `message` (all processes reach this together: their decisions are collective)."""
    end_processes(accelerator)
    raise SystemExit(f"error: {message}")


# ----------------------------------------------------------------------------------------------------------------
# Checkpoints, output, validation
# ----------------------------------------------------------------------------------------------------------------


def save_checkpoint(accelerator, args, global_step, settings):
    """Write checkpoint-N atomically: into a scratch folder, then renamed once complete. Its record (written last)
    holds the run's `settings` and each file's size and hash (runs.py)."""
    final = Path(args.output_dir) / f"checkpoint-{global_step}"
    scratch = Path(args.output_dir) / f".incomplete-checkpoint-{global_step}"
    if accelerator.is_main_process:
        shutil.rmtree(scratch, ignore_errors=True)
        if args.checkpoints_total_limit is not None:
            existing = runs.checkpoints(args.output_dir)
            for old in existing[: max(0, len(existing) - args.checkpoints_total_limit + 1)]:
                logger.info("removing old checkpoint %s (--checkpoints_total_limit %d)", old, args.checkpoints_total_limit)
                shutil.rmtree(old)
    accelerator.wait_for_everyone()
    accelerator.save_state(str(scratch))
    accelerator.wait_for_everyone()
    if accelerator.is_main_process:
        runs.write_checkpoint_record(scratch, global_step, settings)
        shutil.rmtree(final, ignore_errors=True)
        os.replace(scratch, final)
        logger.info("saved %s", final)
    accelerator.wait_for_everyone()


def register_model_hooks(accelerator, args, kind):
    """Checkpoints hold the model in the format the notebook loads: unet/ or transformer/ (full), or the LoRA
    safetensors file."""
    pipeline_name, subfolder, model_name = MODEL_KINDS[kind]

    def save_model_hook(models, weights, output_dir):
        for model in models:
            model = full_model(accelerator, args, kind, model)  # FSDP: every process joins in gathering the weights
            if accelerator.is_main_process:
                save_model(model, args, kind, output_dir)
            if weights:  # FSDP and DeepSpeed: accelerate saves the model in its own format and passes no weights
                weights.pop()

    def load_model_hook(models, input_dir):
        if not models:  # FSDP and DeepSpeed: accelerate has loaded the model from its own files in the checkpoint
            return
        model = accelerator.unwrap_model(models.pop())
        if args.use_lora:
            from peft import set_peft_model_state_dict

            state = diffusers_class(pipeline_name).lora_state_dict(input_dir)
            state = state[0] if isinstance(state, tuple) else state  # SD1.x/SDXL also return the alphas
            state = {k.removeprefix(f"{subfolder}."): v for k, v in state.items() if k.startswith(f"{subfolder}.")}
            incompatible = set_peft_model_state_dict(model, state, adapter_name="default")
            if incompatible is not None and getattr(incompatible, "unexpected_keys", None):
                raise ValueError(f"unexpected LoRA keys in {input_dir}: {incompatible.unexpected_keys[:5]}")
        else:
            loaded = diffusers_class(model_name).from_pretrained(input_dir, subfolder=subfolder)
            model.load_state_dict(loaded.state_dict())
            del loaded

    accelerator.register_save_state_pre_hook(save_model_hook)
    accelerator.register_load_state_pre_hook(load_model_hook)


def full_model(accelerator, args, kind, model):
    """The trained model as a plain module, for saving. Under FSDP each process holds a shard of every weight: every
    process must call this, the main process gets a plain module holding the gathered weights, the others None."""
    if not accelerator.is_fsdp2:
        return accelerator.unwrap_model(model)
    from accelerate import init_empty_weights

    state = accelerator.get_state_dict(model)  # the full state dict on the main process, {} on the others
    if not accelerator.is_main_process:
        return None
    with init_empty_weights():
        plain = diffusers_class(MODEL_KINDS[kind][2]).from_config(accelerator.unwrap_model(model).config)
        if args.use_lora:
            add_lora(plain, args)
    plain.load_state_dict(state, assign=True)
    return plain


CARD = """---
{metadata}
---

# {title}

{kind_name} fine-tuned on pairwise preferences with Inversion-DPO ({loss_type}), from
[{base}]({base_link}){data}.

| setting | value |
|---|---|
{settings}

{metrics}{grid}## Use

```python
{usage}
```

Trained with train_inversion_dpo.py; the first start's flags are in `training_config.json`, every start (resumes
included: settings, changes, code and library versions, device) in `run_history.jsonl`, every step's metrics in
`metrics.jsonl`.
"""


def model_card(args, kind, output_dir):
    """The text of output_dir/README.md: the base model, the data, the loss and its settings, the steps, the last
    metrics row, the last validation grid, and how to load the result (full model or LoRA)."""
    rows = [json.loads(line) for line in (output_dir / "metrics.jsonl").read_text().splitlines()] \
        if (output_dir / "metrics.jsonl").exists() else []
    last = rows[-1] if rows else {}
    beta = last.get("beta", args.beta_dpo)
    settings = {"loss": args.loss_type, "beta": "-" if beta is None else f"{beta:.4g}",
                "inversion steps N": args.num_inference_steps, "inversion guidance": args.inversion_guidance_scale,
                "policy steps per pair": args.loss_timesteps or args.num_inference_steps,
                "timestep weighting": args.timestep_weighting, "learning rate": args.learning_rate,
                "optimiser steps": last.get("step", 0), "pairs per process and micro-step": args.train_batch_size,
                "gradient accumulation": args.gradient_accumulation_steps, "resolution": args.resolution,
                "mixed precision": args.mixed_precision or "accelerate's", "LoRA rank": args.rank if args.use_lora
                else "- (full fine-tune)", "seed": args.seed}
    metrics = ""
    if last:
        shown = {k: last[k] for k in ("loss", "implicit_accuracy", "margin", "saturated", "score_w", "score_l")
                 if last.get(k) is not None}
        metrics = ("## Last step's metrics\n\n" + ", ".join(f"{k} {v:.4g}" for k, v in shown.items()) + "\n\n")
    grids = sorted((output_dir / "validation").glob("step-*.png")) if (output_dir / "validation").exists() else []
    grid = f"## Validation\n\n![validation grid](validation/{grids[-1].name})\n\n" if grids else ""
    pipeline = PIPELINES[kind]
    base = args.pretrained_model_name_or_path
    if args.use_lora:
        usage = (f"from diffusers import {pipeline}\npipe = {pipeline}.from_pretrained(\"{base}\")\n"
                 "pipe.load_lora_weights(\"PATH_OR_REPO\")")
    else:
        subfolder, model_class = MODEL_KINDS[kind][1:]
        usage = (f"from diffusers import {model_class}, {pipeline}\n"
                 f"model = {model_class}.from_pretrained(\"PATH_OR_REPO\", subfolder=\"{subfolder}\")\n"
                 f"pipe = {pipeline}.from_pretrained(\"{base}\", {subfolder}=model)")
    dataset = args.dataset_name or args.train_data_dir
    local_base = Path(base).exists()
    metadata = "\n".join(["license: other", "library_name: diffusers", "tags:", "- text-to-image", "- diffusers",
                           "- inversion-dpo", "- dpo" + ("\n- lora" if args.use_lora else "")]
                          + ([] if local_base else [f"base_model: {base}"]))
    return CARD.format(metadata=metadata, title=args.hub_model_id or output_dir.resolve().name,
                       kind_name={"sd": "A Stable Diffusion model", "sdxl": "SDXL", "sd3": "SD3",
                                  "flux": "FLUX.1"}[kind] + (" (LoRA)" if args.use_lora else ""),
                       loss_type=args.loss_type, base=base,
                       base_link=base if local_base else f"https://huggingface.co/{base}",
                       data=f", on {dataset}" if dataset else "",
                       settings="\n".join(f"| {k} | {v} |" for k, v in settings.items()), metrics=metrics,
                       grid=grid, usage=usage)


def write_model_card(args, kind, output_dir):
    (output_dir / "README.md").write_text(model_card(args, kind, output_dir))


def upload_to_hub(args, output_dir, repo_id):
    """--push_to_hub: output_dir to `repo_id` (huggingface_hub.upload_folder), checkpoints and logs left out."""
    import huggingface_hub

    huggingface_hub.upload_folder(repo_id=repo_id, folder_path=str(output_dir), token=args.hub_token,
                                  commit_message="End of training",
                                  ignore_patterns=["checkpoint-*/**", "checkpoint-*", ".incomplete-*", "logs/**"])
    logger.info("uploaded %s to https://huggingface.co/%s", output_dir, repo_id)


@torch.no_grad()
def log_validation(accelerator, args, models, denoiser, weight_dtype, global_step):
    """Images for --validation_prompts x --validation_seeds, as one PNG grid and in the trackers."""
    from diffusers.utils import make_image_grid

    pipeline = build_pipeline(models, accelerator.unwrap_model(denoiser), models["scheduler_config"])
    autocast = torch.autocast(accelerator.device.type, dtype=weight_dtype) if weight_dtype != torch.float32 \
        else contextlib.nullcontext()
    images = []
    with autocast:
        for prompt in args.validation_prompts:
            for seed in args.validation_seeds:
                generator = torch.Generator(device=accelerator.device).manual_seed(seed)
                images.append(pipeline(prompt, num_inference_steps=args.validation_num_inference_steps,
                                       guidance_scale=args.validation_guidance_scale, height=args.resolution,
                                       width=args.resolution, generator=generator).images[0])
    if not accelerator.is_main_process:  # FSDP: every process ran the sharded UNet, the main process writes
        return
    grid = make_image_grid(images, rows=len(args.validation_prompts), cols=len(args.validation_seeds))
    folder = Path(args.output_dir) / "validation"
    folder.mkdir(parents=True, exist_ok=True)
    grid.save(folder / f"step-{global_step:06d}.png")
    for tracker in accelerator.trackers:
        if tracker.name == "tensorboard":
            import numpy as np

            tracker.writer.add_images("validation", np.stack([np.asarray(im) for im in images]), global_step,
                                      dataformats="NHWC")
        elif tracker.name == "wandb":
            import wandb

            tracker.log({"validation": [wandb.Image(im, caption=f"{p} / seed {s}") for im, (p, s) in zip(
                images, [(p, s) for p in args.validation_prompts for s in args.validation_seeds])]})
    logger.info("validation grid written to %s", folder / f"step-{global_step:06d}.png")


def check_launch(accelerator, args):
    """Stop at once on launches that would not train as configured."""
    from accelerate.utils import DistributedType

    launched = int(os.environ.get("WORLD_SIZE", "1"))
    if launched != accelerator.num_processes:
        # e.g. an FSDP or multi-GPU accelerate config on a machine without GPUs: accelerate then sets up each
        # process as if it were alone, and they would all train the same batches into the same output_dir
        raise SystemExit(f"{launched} processes were launched, but accelerate set up a run of "
                         f"{accelerator.num_processes} ({accelerator.distributed_type}): the launch configuration "
                         "does not fit this machine (FSDP and DeepSpeed configurations need GPUs)")
    if accelerator.distributed_type == DistributedType.FSDP and not accelerator.is_fsdp2:
        raise SystemExit("FSDP1 is not supported: set fsdp_version: 2 in the accelerate config (FSDP2 is the version "
                         "tested; see docs/scaling.md, 'Scaling to several GPUs and machines')")
    if accelerator.distributed_type != DistributedType.DEEPSPEED:
        return
    if accelerator.state.deepspeed_plugin.zero_stage == 3:
        # transformers then partitions the frozen text encoders as they load, and they cannot run
        raise SystemExit("DeepSpeed ZeRO-3 is not supported: use ZeRO-1 or 2, or FSDP (fsdp_version: 2) to shard the "
                         "weights; see docs/scaling.md, 'Scaling to several GPUs and machines'")
    evaluated = args.loss_timesteps or args.num_inference_steps
    if args.trajectory_chunk_size == "auto":  # the only chunk DeepSpeed takes: every evaluated step at once
        args.trajectory_chunk_size = evaluated
    if args.loss_type not in NOISING_FORMS and args.trajectory_chunk_size < evaluated:
        # DeepSpeed takes every backward for a micro-step and steps the optimiser after it
        raise SystemExit(f"--trajectory_chunk_size {args.trajectory_chunk_size} below the {evaluated} evaluated steps "
                         "runs one backward per chunk, which DeepSpeed takes for separate micro-steps (each with an "
                         f"optimiser step): under DeepSpeed give --trajectory_chunk_size {evaluated} or more")


def end_processes(accelerator):
    """Close trackers and the process group, so that every process exits.

    With several processes, a communication worker thread can still hold the last collective's tensors after the
    collective returned, and needs the GIL to release them. If the main thread meanwhile drops the last reference to
    the process group (the DDP model is freed when main returns), it joins those threads while holding the GIL and
    the process never exits (seen with two gloo processes: 2 runs of 6 on a loaded CPU; none of 12 with this). A
    barrier, then a pause with the GIL released, lets the workers finish first."""
    if accelerator.num_processes > 1:
        accelerator.wait_for_everyone()
        time.sleep(1.0)
    accelerator.end_training()


class SaturationWatch:
    """Warns once when most pairs of the batch have been saturated (|margin| > losses.SATURATION_MARGIN: the loss
    near 0, its gradient vanishing) for `steps` optimiser steps in a row. Past that point Adam's normalised update
    turns rounding-level gradients into full-size steps, and the model drifts in no direction the data chose."""

    def __init__(self, steps=20):
        self.steps, self.in_a_row, self.warned = steps, 0, False

    def update(self, logs):
        saturated = logs.get("saturated")
        self.in_a_row = self.in_a_row + 1 if saturated is not None and saturated > 0.5 else 0
        if self.in_a_row >= self.steps and not self.warned:
            self.warned = True
            logger.warning(
                "Most pairs have had |margin| > %g for %d steps in a row: the loss is saturated, so what the model "
                "learns from here is drift, not the preference. --beta_dpo or --learning_rate is too high for this "
                "data; lower one of them.", losses.SATURATION_MARGIN, self.in_a_row)


def warn_zero_gradient(args, logs):
    """Say in plain words why a step had a gradient of exactly zero, and what to do."""
    if logs.get("margin", 0.0) != 0.0:
        logger.warning(
            "The gradient norm is exactly 0 with a DPO margin of %.4g: the loss has saturated in float32, so these "
            "pairs no longer teach anything. Lower --beta_dpo or --learning_rate.", logs["margin"])
        return
    cause = ("a LoRA adapter that starts at zero" if args.use_lora
             else "a policy and reference that compute identically (same weights, same precision)")
    logger.warning(
        "The gradient norm is exactly 0 and the loss is log 2. With --loss_type %s the policy is evaluated exactly "
        "where the reference produced its noise, so while the policy computes what the reference computes there is "
        "no gradient; here the cause is %s. Such a run moves only once something else makes the two differ: weight "
        "decay (--adam_weight_decay), or rounding differences between precisions, which is what moved the released "
        "run (fp32 policy under bf16 autocast, bf16 reference). See docs/study.md, 'Zero gradient at the start'.",
        args.loss_type, cause)


# ----------------------------------------------------------------------------------------------------------------
# The recipe
# ----------------------------------------------------------------------------------------------------------------


@dataclass
class Run:
    """What the recipe's steps hand to each other."""

    accelerator: object
    output_dir: Path
    dataloader: object = None
    bad_rows: object = None
    models: dict = None
    kind: str = None
    weight_dtype: torch.dtype = None
    denoiser: torch.nn.Module = None
    prompt_encoder: object = None
    schedule: object = None
    cache: object = None
    weights: torch.Tensor = None  # the loss's per-step weights
    train_levels: torch.Tensor = None  # noise levels of the training timesteps (diffusion_dpo, sft)
    optimizer: object = None
    lr_scheduler: object = None
    params: list = None
    steps_per_epoch: int = None
    num_epochs: int = 1
    reference: object = None
    nonfinite: object = None
    hub_repo: str = None
    resume_from: Path = None  # the checkpoint to resume from (checked intact)
    complete: int = None  # the step of a run already at or past --max_train_steps: nothing to train
    settings: dict = None  # what defines the run (runs.run_settings), recorded in every checkpoint
    start_number: int = None  # this start's number in run_history.jsonl, named by every metrics row
    global_step: int = 0
    first_epoch: int = 0
    resume_batches: int = 0


def main(args):
    # 1. Accelerator, logging, seed; the output folder: one run per folder, the checkpoint to resume from (checked
    #    intact). A run already at --max_train_steps stops here, having written nothing.
    run = start(args)
    if run.complete:
        return end_processes(run.accelerator)
    # 2. Data first: a missing dataset fails before minutes of model loading.
    run.dataloader, run.bad_rows = load_data(args, run.accelerator)
    # 3. The settings that define the run against its checkpoint's (a change stops here, before any model loads);
    #    this start appended to the run's history.
    record_start(args, run)
    # 4. Models: frozen encoders and the policy on the device, the schedule, the trajectory cache.
    place_models(args, run)
    # 5. The memory budget, before the reference loads (--memory_budget prints it and stops here).
    if memory_check(args, run):
        return end_processes(run.accelerator)
    # 6. Optimiser, learning-rate schedule, accelerate.
    prepare_optimisation(args, run)
    # 7. The reference, the hub repository, trackers (--fill_inversion_cache fills the cache and stops here).
    if prepare_reference(args, run):
        return end_processes(run.accelerator)
    # 8. Resume: the checkpoint's state and the run's position.
    resume(args, run)
    # 9. Train.
    train(args, run)
    # 10. Save the result where the notebook and `from_pretrained` look for it, the model card, the upload.
    save_outputs(args, run)
    end_processes(run.accelerator)


def start(args):
    """Step 1: the accelerator, logging, the seed, the output folder (claimed for this run), the phase log."""
    from accelerate import Accelerator
    from accelerate.utils import DataLoaderConfiguration, ProjectConfiguration, set_seed

    output_dir = Path(args.output_dir)
    accelerator = Accelerator(
        gradient_accumulation_steps=args.gradient_accumulation_steps,
        mixed_precision=args.mixed_precision,
        log_with=None if args.report_to == "none" else args.report_to,
        project_config=ProjectConfiguration(project_dir=str(output_dir), logging_dir=str(output_dir / args.logging_dir)),
        # Each process reads its own batches (a streamed dataset is split by process below), never one process
        # reading for all: batches carry lists (captions, skipped rows) that are not split across processes.
        dataloader_config=DataLoaderConfiguration(dispatch_batches=False),
    )
    check_launch(accelerator, args)
    logging.basicConfig(format="%(asctime)s %(levelname)s %(name)s: %(message)s", level=logging.INFO)
    for noisy in ("diffusers", "transformers", "datasets"):
        logging.getLogger(noisy).setLevel(logging.WARNING if accelerator.is_main_process else logging.ERROR)
    set_seed(args.seed)
    run = Run(accelerator, output_dir)
    if not (args.memory_budget or args.fill_inversion_cache):  # these two train nothing and record nothing
        run.resume_from, run.complete = on_main_process(accelerator, lambda: claim_output_dir(args))
        if run.complete is not None:
            logger.info("nothing to train: the run in %s is at step %d, and --max_train_steps is %d. Its model is in "
                        "%s (and in its checkpoints); give a larger --max_train_steps to train on.", output_dir,
                        run.complete, args.max_train_steps, output_dir)
            return run
    if accelerator.is_main_process:
        try:
            output_dir.mkdir(parents=True, exist_ok=True)
        except OSError as error:
            raise SystemExit(f"cannot write to --output_dir {output_dir}: {error}") from error
    if args.allow_tf32 and torch.cuda.is_available():
        torch.backends.cuda.matmul.allow_tf32 = True
    # seconds and peak memory of the setup's phases and the first steps' (step_meter.PhaseLog)
    PHASES.open(accelerator.device, output_dir / "memory_phases.jsonl" if accelerator.is_main_process else None,
                logger if accelerator.is_main_process else None)
    return run


def on_main_process(accelerator, decide):
    """`decide()` on the main process (a ValueError: the run stops with its message), its result on every process."""
    from accelerate.utils import broadcast_object_list

    outcome = [None, None]
    if accelerator.is_main_process:
        try:
            outcome = [decide(), None]
        except ValueError as error:
            outcome = [None, str(error)]
    if accelerator.num_processes > 1:
        broadcast_object_list(outcome)
    if outcome[1] is not None:
        end_processes(accelerator)
        raise SystemExit(f"error: {outcome[1]}")
    return outcome[0]


def claim_output_dir(args):
    """(the checkpoint to resume from or None, the run's step when it is at --max_train_steps already, else None).
    One run per output folder: a new run into a folder holding another stops, unless --overwrite_output_dir, which
    clears it first."""
    output_dir = Path(args.output_dir)
    if args.resume_from_checkpoint:
        ended = runs.ended_at(runs.read_history(output_dir))  # the run's end, past its last checkpoint maybe
        if ended is not None and ended >= args.max_train_steps and args.resume_from_checkpoint == "latest":
            return None, ended
        path = runs.resume_checkpoint(output_dir, args.resume_from_checkpoint)
        if path is None and ended is not None:
            raise ValueError(f"the run in {output_dir} ended at step {ended} and kept no checkpoint to resume "
                             "from (--checkpointing_steps above its steps): start it anew with "
                             "--overwrite_output_dir, or choose another --output_dir")
        if path is None:
            logger.info("no checkpoint in %s: the run starts at step 0", output_dir)
            return None, None
        step = runs.checkpoint_step(path)
        return path, step if step >= args.max_train_steps else None
    held = runs.run_entries(output_dir)
    if held and not args.overwrite_output_dir:
        found = runs.checkpoints(output_dir)
        raise ValueError(
            f"--output_dir {output_dir} holds a run already ({', '.join(entry.name for entry in held[:6])}). Resume it "
            f"with --resume_from_checkpoint latest{f' (its newest checkpoint is {found[-1].name})' if found else ''}, "
            "choose another --output_dir, or give --overwrite_output_dir to remove that run's files and start anew")
    if held:
        removed = runs.clear_run(output_dir, args.logging_dir)
        logger.warning("--overwrite_output_dir: removed the earlier run's %s from %s", ", ".join(removed), output_dir)
    return None, None


def load_data(args, accelerator):
    """Step 2: the preference pairs and their dataloader, and the tracker of unreadable rows."""
    from data import BadRowTracker, PreferenceDataConfig, load_preference_dataset, make_dataloader

    data_config = PreferenceDataConfig(**{f.name: getattr(args, f.name) for f in fields(PreferenceDataConfig)
                                          if hasattr(args, f.name)})
    data_config.hflip = not args.no_hflip
    try:
        dataset = load_preference_dataset(data_config)
    except ValueError as error:  # a bad or missing dataset: say what is wrong, without a traceback
        raise SystemExit(f"error: {error}") from None
    if args.streaming and accelerator.num_processes > 1:
        dataset = dataset.for_process(accelerator.process_index, accelerator.num_processes)
    train_dataloader = make_dataloader(dataset, args.train_batch_size, args.dataloader_num_workers, seed=args.seed)
    bad_rows = BadRowTracker(args.max_bad_fraction)
    return train_dataloader, bad_rows


def record_start(args, run):
    """Step 3: the settings that define the run (runs.RUN_DEFINING, the model's fingerprint, the data's size, the
    launch), compared with those the resumed checkpoint recorded (or, restarting a run that wrote no checkpoint, its
    last start's). A difference stops the run, each one named, unless --allow_changed_settings. Then the start is
    appended to run_history.jsonl, and the first start's flags written to training_config.json."""
    accelerator, output_dir = run.accelerator, run.output_dir
    if args.memory_budget or args.fill_inversion_cache:
        return

    def compare():
        try:
            size = len(run.dataloader.dataset)
        except TypeError:  # a streamed dataset has no length
            size = None
        settings = runs.run_settings(args, accelerator.num_processes, accelerator.distributed_type,
                                     accelerator.mixed_precision, size,
                                     runs.model_fingerprint(args.pretrained_model_name_or_path, args.revision,
                                                            args.cache_dir_model))
        history = runs.read_history(output_dir)
        recorded, where = runs.recorded_settings(run.resume_from, history)
        changes = runs.check_settings(recorded, settings, where, output_dir, args.allow_changed_settings)
        number = len(runs.starts(history)) + 1
        start_step = runs.checkpoint_step(run.resume_from) if run.resume_from is not None else 0
        runs.append_record(output_dir, runs.start_record(number, settings, changes, start_step, run.resume_from,
                                                        runs.device_name(accelerator.device), runs.recorded_flags(args)))
        return settings, number

    run.settings, run.start_number = on_main_process(accelerator, compare)


def place_models(args, run):
    """Step 4: load the models; frozen text encoders and VAE on the device in their dtypes; the policy (full, or its
    base with LoRA adapters) on the device, checkpointed and with its attention backend; the inversion schedule, the
    loss weights, the training noise levels, and the trajectory cache."""
    from diffusers.training_utils import cast_training_params

    accelerator, output_dir = run.accelerator, run.output_dir
    try:
        with phase("model load"):
            models = load_models(args)
    except ValueError as error:  # an unsupported model or a flag that does not apply to it
        raise SystemExit(f"error: {error}") from None
    kind = models["kind"]
    if kind in FLOW_KINDS and args.inversion_steps_offset is not None:
        raise SystemExit(f"error: --inversion_steps_offset sets a DDIM schedule; {kind} inverts on its own flow sigmas")
    if args.use_lora and args.lora_target_modules is None:
        args.lora_target_modules = DEFAULT_LORA_TARGETS[MODEL_KINDS[kind][1]]
    if kind == "sd3" and accelerator.is_fsdp2:
        # accelerate (1.15) loads FSDP2 shards from the model's state dict and takes every entry for a sharded
        # parameter; SD3's transformer also holds a persistent buffer (pos_embed.pos_embed), which FSDP2 does not shard
        raise SystemExit("error: FSDP2 cannot prepare SD3's transformer here (accelerate expects every state-dict "
                         "entry to be a sharded parameter; its pos_embed buffer is not). Train SD3 with DDP or "
                         "DeepSpeed ZeRO-2, with --use_lora if it does not fit (docs/flow_models.md, 'SD3 and FLUX').")
    if kind == "flux" and not args.use_lora and not accelerator.is_fsdp2:
        logger.warning("full fine-tuning FLUX: its 12B transformer, a frozen reference copy and the optimiser state "
                       "do not fit one GPU; use --use_lora, or FSDP (docs/scaling.md, 'Scaling to several GPUs and machines')")
    config = output_dir / runs.CONFIG_FILE
    if accelerator.is_main_process and not config.exists():  # the first start's flags; later starts: the history
        config.write_text(json.dumps({**runs.recorded_flags(args), "model_kind": kind}, indent=2))
    weight_dtype = {"fp16": torch.float16, "bf16": torch.bfloat16}.get(accelerator.mixed_precision, torch.float32)
    vae_dtype = weight_dtype if args.pretrained_vae_model_name_or_path else torch.float32
    denoiser = models["denoiser"]
    text_encoders = [encoder for encoder in models["text_encoders"] if encoder is not None]
    for module in (*text_encoders, models["vae"]):
        module.requires_grad_(False).eval()
    models["vae"].to(accelerator.device, dtype=vae_dtype)
    for encoder in text_encoders:
        encoder.to(accelerator.device, dtype=weight_dtype)
    inversion_config = inversion_scheduler_config(args, models["scheduler_config"])
    schedule = make_schedule(args, models, inversion_config)
    cache = None
    if args.inversion_cache_dir:
        cache = make_cache(args, models, inversion_config, schedule, weight_dtype, vae_dtype)  # before any training
        if args.random_crop:
            logger.warning("--random_crop with --inversion_cache_dir: every new crop is a new cache entry")
    if args.use_lora:
        denoiser.requires_grad_(False).to(accelerator.device, dtype=weight_dtype)
        add_lora(denoiser, args)
        cast_training_params(denoiser, dtype=torch.float32)
    else:
        denoiser.to(accelerator.device)
    if args.gradient_checkpointing:
        denoiser.enable_gradient_checkpointing()
    if args.enable_xformers_memory_efficient_attention:
        denoiser.enable_xformers_memory_efficient_attention()
    prompt_encoder = make_prompt_encoder(args, models)
    weights = step_weights(schedule, args.timestep_weighting).to(accelerator.device)
    # The noise levels of training timesteps, for diffusion_dpo and sft: a(t) (DDPM), or sigma (flows).
    train_levels = (flow_training_sigmas if kind in FLOW_KINDS else training_alphas)(models["scheduler_config"])
    run.models, run.kind, run.weight_dtype, run.denoiser = models, kind, weight_dtype, denoiser
    run.prompt_encoder, run.schedule, run.cache = prompt_encoder, schedule, cache
    run.weights, run.train_levels = weights, train_levels


def memory_check(args, run):
    """Step 5: the memory budget, stated before the reference loads (and --trajectory_chunk_size auto from it); the
    probe runs the model eagerly, so the model is compiled after it. True for --memory_budget: printed, stop."""
    accelerator = run.accelerator
    budget, run_shape, sizes = memory_plan(args, accelerator, run.kind, run.models, run.denoiser, run.prompt_encoder,
                                           run.weight_dtype, run.cache)
    if args.memory_budget:
        if accelerator.is_main_process:
            report_budget(budget, run_shape, sizes, print)
        return True
    if accelerator.is_main_process:
        report_budget(budget, run_shape, sizes, logger.info)
        if not budget.fits:
            logger.warning("the expected peak, %s, exceeds %s: see the flags above (--memory_budget prints this "
                           "and exits)", memory_budget.size(budget.total), memory_budget.size(budget.limit))
    compile_model(run.denoiser, args)  # for LoRA, the reference too: the same module with its adapters off
    return False


def prepare_optimisation(args, run):
    """Step 6: the optimiser over the trainable parameters, the learning-rate schedule, accelerate's wrapping, the
    epochs, and the hooks that save and load the model in checkpoints."""
    from diffusers.optimization import get_scheduler

    accelerator, denoiser, train_dataloader, kind = run.accelerator, run.denoiser, run.dataloader, run.kind
    if args.scale_lr:
        args.learning_rate *= args.gradient_accumulation_steps * args.train_batch_size * accelerator.num_processes
    params = [p for p in denoiser.parameters() if p.requires_grad]
    if args.init_perturbation:
        perturb(params, args.init_perturbation, args.seed)
    optimizer = make_optimizer(args, params)
    steps_per_epoch = None
    if not args.streaming:
        steps_per_epoch = math.ceil(math.ceil(len(train_dataloader) / accelerator.num_processes)
                                    / args.gradient_accumulation_steps)
    if args.max_train_steps is None:
        args.max_train_steps = args.num_train_epochs * steps_per_epoch
    lr_scheduler = get_scheduler(args.lr_scheduler, optimizer,
                                 num_warmup_steps=args.lr_warmup_steps * accelerator.num_processes,
                                 num_training_steps=args.max_train_steps * accelerator.num_processes,
                                 num_cycles=args.lr_num_cycles, power=args.lr_power)
    denoiser, optimizer, train_dataloader, lr_scheduler = accelerator.prepare(denoiser, optimizer, train_dataloader,
                                                                          lr_scheduler)
    params = list(denoiser.parameters())  # FSDP replaces the parameters with shards; clipping skips those without grad
    if steps_per_epoch is not None:
        steps_per_epoch = math.ceil(len(train_dataloader) / args.gradient_accumulation_steps)
        num_epochs = math.ceil(args.max_train_steps / steps_per_epoch)
    else:
        num_epochs = 1
    register_model_hooks(accelerator, args, kind)
    run.denoiser, run.optimizer, run.dataloader, run.lr_scheduler = denoiser, optimizer, train_dataloader, \
        lr_scheduler
    run.params, run.steps_per_epoch, run.num_epochs = params, steps_per_epoch, num_epochs


def prepare_reference(args, run):
    """Step 7: the frozen reference (a separate copy, loaded now unless a trajectory cache may make it unnecessary;
    for LoRA the policy with its adapters off; on the device, no offloading per call), then --fill_inversion_cache
    (True: filled, stop), the hub repository, the trackers, and the state that checkpoints keep besides the model."""
    accelerator, denoiser, kind, output_dir = run.accelerator, run.denoiser, run.kind, run.output_dir
    weight_dtype, cache = run.weight_dtype, run.cache
    if args.use_lora:
        reference = Reference(lora_model=accelerator.unwrap_model(denoiser))
    else:
        reference = Reference(load=lambda: load_reference(args, kind, accelerator.device, weight_dtype))
        if cache is None and args.loss_type != "sft":
            with phase("reference load"):
                reference.load()  # now: a reference that cannot load fails before any training
    run.reference = reference
    if args.fill_inversion_cache:
        with phase("cache fill"):
            fill_cache(args, accelerator, run.dataloader, reference, run.prompt_encoder, run.models["vae"],
                       run.schedule, cache)
        return True
    hub_repo = None
    if args.push_to_hub and accelerator.is_main_process:  # created now: a bad token or name fails before training
        import huggingface_hub

        hub_repo = huggingface_hub.create_repo(args.hub_model_id or output_dir.resolve().name, exist_ok=True,
                                               token=args.hub_token).repo_id
    if accelerator.is_main_process:
        accelerator.init_trackers(args.tracker_project_name, config={k: v for k, v in vars(args).items()
                                                                   if isinstance(v, (int, float, str, bool))})

    nonfinite = NonFiniteGuard(args.max_nonfinite_steps)
    accelerator.register_for_checkpointing(nonfinite)
    accelerator.register_for_checkpointing(BetaRule(args))  # the anchored form's rule: its beta, kept on resume
    run.hub_repo, run.nonfinite = hub_repo, nonfinite
    return False


def resume(args, run):
    """Step 8: the checkpoint chosen in step 1 (if any): its state and the run's position (step, epoch, batch)."""
    accelerator, steps_per_epoch, path = run.accelerator, run.steps_per_epoch, run.resume_from
    global_step, first_epoch, resume_batches = 0, 0, 0
    if path is not None:
        logger.info("resuming from %s", path)
        accelerator.load_state(str(path))
        set_peak_learning_rate(run.lr_scheduler, args.learning_rate)
        global_step = runs.checkpoint_step(path)
        if steps_per_epoch is not None:
            first_epoch = global_step // steps_per_epoch
            resume_batches = (global_step % steps_per_epoch) * args.gradient_accumulation_steps
    run.global_step, run.first_epoch, run.resume_batches = global_step, first_epoch, resume_batches


def train(args, run):
    """Step 9: the loop. Each micro-batch: the training step (training.py) under accumulation; each optimiser step:
    clipping, the update (skipped when not finite), its metrics row, checkpoints, validation."""
    from tqdm.auto import tqdm

    accelerator, output_dir, denoiser, models = run.accelerator, run.output_dir, run.denoiser, run.models
    train_dataloader, bad_rows, optimizer, lr_scheduler = run.dataloader, run.bad_rows, run.optimizer, \
        run.lr_scheduler
    reference, prompt_encoder, schedule, cache = run.reference, run.prompt_encoder, run.schedule, run.cache
    weights, train_levels, params, nonfinite = run.weights, run.train_levels, run.params, run.nonfinite
    weight_dtype, num_epochs, first_epoch, resume_batches = run.weight_dtype, run.num_epochs, run.first_epoch, \
        run.resume_batches
    global_step = run.global_step
    logger.info("%d pairs per optimiser step (%d per process x %d accumulation x %d processes), %d steps, loss %s",
                args.train_batch_size * args.gradient_accumulation_steps * accelerator.num_processes,
                args.train_batch_size, args.gradient_accumulation_steps, accelerator.num_processes,
                args.max_train_steps, args.loss_type)
    progress = tqdm(range(args.max_train_steps), initial=global_step, desc="steps",
                    disable=not accelerator.is_local_main_process)
    metrics_file = output_dir / "metrics.jsonl"
    step_metrics, step_rows = [], []
    zero_gradient_warned = False
    saturation = SaturationWatch()
    meter = StepMeter(accelerator.device, peak_tflops(accelerator.device, args.peak_tflops))
    flop_count, flops_per_step = flop_counter(args, accelerator, denoiser, meter), None
    profile = StepProfile(args.profile_step, accelerator.device) if accelerator.is_main_process else None
    started = time.perf_counter()
    denoiser.train()
    try:
        for epoch in range(first_epoch, num_epochs):
            if hasattr(train_dataloader, "set_epoch"):
                train_dataloader.set_epoch(epoch)
            batches = train_dataloader
            if epoch == first_epoch and resume_batches:
                batches = accelerator.skip_first_batches(train_dataloader, resume_batches)
            for batch in batches:
                if global_step >= args.max_train_steps:  # also a run that resumed at its end: no step past it
                    break
                bad_rows.update(batch)
                pairs = torch.tensor([len(batch["captions"])], device=accelerator.device)
                if accelerator.gather(pairs).min() == 0:  # every process skips together, so DDP stays in step
                    logger.warning("skipping a batch whose rows were all unreadable")
                    continue
                # Random draws are a function of the run's position, not of RNG history: a resumed run repeats them.
                meter.start()
                PHASES.step = global_step + 1
                if profile is not None:
                    profile.start(global_step + 1)
                position = (args.seed, global_step, len(step_metrics), accelerator.process_index)
                generator = torch.Generator().manual_seed(hash(position) & (2**63 - 1))
                with accelerator.accumulate(denoiser):
                    with flop_count or contextlib.nullcontext():
                        output = training_step(args, accelerator, denoiser, reference, prompt_encoder, models["vae"],
                                               batch, schedule, weights, train_levels, generator, cache)
                    step_metrics.append(output.metrics)
                    step_rows += batch["row_ids"].tolist()
                    if accelerator.sync_gradients:
                        grad_norm = float(accelerator.clip_grad_norm_(params, args.max_grad_norm or float("inf")))
                        # Reduced over processes (a NaN anywhere makes the mean NaN): every process decides alike.
                        logs = mean_metrics(accelerator, step_metrics)
                        finite = math.isfinite(logs["loss"]) and math.isfinite(grad_norm)
                        with phase("optimiser step"):
                            apply_update(accelerator, optimizer, lr_scheduler, finite)
                        if flop_count is not None:  # counted over the first optimiser step only
                            flops_per_step, flop_count = flop_count.model_flops, None
                        measured = meter.stop(flops_per_step)
                        if profile is not None and profile.stop(output_dir):
                            logger.info("profiled step %d: profile_step_%d.txt and .json in %s", global_step + 1,
                                        global_step + 1, output_dir)
                if not accelerator.sync_gradients:
                    continue

                global_step += 1
                progress.update(1)
                too_many_nonfinite = nonfinite.update(finite, global_step, step_rows, accelerator.process_index)
                step_metrics, step_rows = [], []
                logs.update(grad_norm=grad_norm, lr=lr_scheduler.get_last_lr()[0], epoch=epoch,
                            bad_rows=bad_rows.bad, nonfinite_steps=nonfinite.total, beta=args.beta_dpo,
                            elapsed_s=time.perf_counter() - started, **measured)
                logs["zero_gradient"] = float(logs["grad_norm"] == 0.0)
                if cache is not None:
                    logs.update(cache.summary())
                if logs["zero_gradient"] and not zero_gradient_warned:
                    warn_zero_gradient(args, logs)
                    zero_gradient_warned = True
                saturation.update(logs)
                progress.set_postfix(loss=f"{logs['loss']:.4g}", acc=f"{logs.get('implicit_accuracy', 0):.2f}",
                                     lr=f"{logs['lr']:.3g}")
                accelerator.log(logs, step=global_step)
                if accelerator.is_main_process:
                    with open(metrics_file, "a") as f:
                        f.write(json_line({"step": global_step, "start": run.start_number, **logs}))
                if too_many_nonfinite:
                    progress.close()
                    last = runs.checkpoints(output_dir)
                    stop_run(accelerator, f"stopped at step {global_step}: {nonfinite.in_a_row} steps in a row had a "
                             f"non-finite loss or gradient (--max_nonfinite_steps {args.max_nonfinite_steps}). "
                             f"Each was skipped and nothing non-finite was saved; the last checkpoint is "
                             f"{last[-1] if last else 'none'}. Try {NONFINITE_ADVICE}, then "
                             "--resume_from_checkpoint latest.")
                if global_step % args.checkpointing_steps == 0 and nonfinite.in_a_row:
                    logger.warning("no checkpoint at step %d: its step was not finite (the last good one is kept "
                                   "for --resume_from_checkpoint latest)", global_step)
                elif global_step % args.checkpointing_steps == 0:
                    require_finite_weights(accelerator, params, global_step, "checkpoint")
                    with phase("checkpoint save"):
                        save_checkpoint(accelerator, args, global_step, run.settings)
                if args.validation_prompts and global_step % args.validation_steps == 0 and (
                        accelerator.is_main_process or accelerator.is_fsdp2):  # FSDP: each process has a shard
                    with phase("validation"):
                        log_validation(accelerator, args, models, denoiser, weight_dtype, global_step)
                if global_step >= args.max_train_steps:
                    break
            if global_step >= args.max_train_steps:
                break
    except torch.OutOfMemoryError as error:
        raise SystemExit(f"out of memory at step {global_step + 1} (phase {PHASES.failed_in}): {error}\n"
                         "Flags that reduce memory (--memory_budget shows what each part needs): "
                         + "; ".join(MEMORY_FLAGS)) from error
    run.global_step = global_step


def save_outputs(args, run):
    """Step 10: the final model (checked finite; gathered under FSDP), optionally the whole pipeline, the model card,
    and with --push_to_hub the upload."""
    accelerator, output_dir, kind, models = run.accelerator, run.output_dir, run.kind, run.models
    require_finite_weights(accelerator, run.params, run.global_step, "final model")
    final_model = full_model(accelerator, args, kind, run.denoiser)  # FSDP: every process joins in gathering weights
    if accelerator.is_main_process:
        save_model(final_model, args, kind, str(output_dir))
        if args.save_pipeline:
            if args.use_lora:  # the pipeline holds plain weights with the adapter merged in
                final_model.fuse_lora()
                final_model.unload_lora()
            build_pipeline(models, final_model, models["scheduler_config"]) \
                .save_pretrained(output_dir)
        write_model_card(args, kind, output_dir)
        if run.start_number is not None:
            runs.append_record(output_dir, runs.end_record(run.start_number, run.global_step))
        logger.info("training finished after %d steps; output in %s", run.global_step, output_dir)
        if args.push_to_hub:
            upload_to_hub(args, output_dir, run.hub_repo)


def fill_cache(args, accelerator, dataloader, reference, prompt_encoder, vae, schedule, cache):
    """--fill_inversion_cache: one pass over the data (each process its share), storing every image's encoding and,
    for the trajectory forms, its trajectory."""
    from tqdm.auto import tqdm

    for batch in tqdm(dataloader, desc="filling the trajectory cache", disable=not accelerator.is_local_main_process):
        if not batch["captions"]:
            continue
        keys = image_keys(args, cache, batch)
        latents, cond = encode_pairs(args, accelerator, prompt_encoder, vae, batch, cache, keys)
        if args.loss_type not in NOISING_FORMS:
            invert_pairs(args, reference, latents, cond, prompt_encoder.unconditional(cond), schedule, cache, keys)
    accelerator.wait_for_everyone()
    logger.info("trajectory cache %s filled on process %d: %s", args.inversion_cache_dir, accelerator.process_index,
                cache.summary())


if __name__ == "__main__":
    main(parse_args())
