"""One training step of every loss form, shared by the trainer, the benchmarks and the tests: the frozen reference,
encoding a batch of pairs, inverting it (or reading the cache), the policy's errors along the trajectories, the
Inversion-DPO losses (with the chunked gradient) and the baselines' noising losses, the anchored form's beta rule.
Functions take the trainer's parsed arguments (`args`); the loss formulas themselves are in losses.py.
"""

import contextlib
import logging
from dataclasses import replace

import torch

import losses
from inversion import (
    FlowSchedule,
    InversionSchedule,
    draw_training_levels,
    invert,
    noised_trajectory,
    predict_on_trajectory,
    standardised_trajectory,
    training_noise,
)
from models import FLOW_KINDS, Conditioning, model_prediction, reference_mode, sdxl_time_ids
from step_meter import phase

logger = logging.getLogger("train_inversion_dpo")

# --beta_dpo when not given; the anchored form's None: the relative rule (--relative_beta, BetaRule)
DEFAULT_BETA = {"inversion_dpo": 2000.0, "inversion_dpo_official": 2000.0, "inversion_dpo_exact": 2000.0,
                "inversion_dpo_x0": None, "diffusion_dpo": 5000.0, "sft": None}


RELATIVE_BETA = 40.0  # kappa of the anchored form's rule beta = kappa / R (docs/study.md, "Choosing a loss")


PAPER_FORMS = ("inversion_dpo", "inversion_dpo_official")


AT_END_FORMS = ("inversion_dpo_exact", "inversion_dpo_x0")  # evaluated at x_i, with the reference's own term there


NOISING_FORMS = ("diffusion_dpo", "sft")  # random noising of the clean latent, no inversion


def make_schedule(args, models, inversion_config):
    """The inversion's N steps: DDIM timesteps from the scheduler config (UNets), or the flow pipeline's own sampling
    sigmas at the training resolution, run upward (SD3, FLUX)."""
    if models["kind"] in FLOW_KINDS:
        vae_scale = 2 ** (len(models["vae"].config.block_out_channels) - 1)
        return FlowSchedule.for_pipeline(models["kind"], inversion_config, args.num_inference_steps,
                                         args.resolution // vae_scale)
    return InversionSchedule.from_scheduler_config(inversion_config, args.num_inference_steps)


def step_weights(schedule, weighting):
    """w_i of each inversion step: DDPM's weighting, or for flows the same weight matched by SNR (losses.py)."""
    if isinstance(schedule, FlowSchedule):
        return losses.flow_timestep_weights(schedule.sigmas[1:], weighting)
    return losses.timestep_weights(schedule.alphas[1:], weighting)


def inversion_scheduler_config(args, scheduler_config):
    """The model's scheduler config with --inversion_steps_offset applied: the inversion schedule and the trajectory
    cache's key are built from it (validation sampling keeps the model's own config)."""
    config = dict(scheduler_config)
    if args.inversion_steps_offset is not None:
        config["steps_offset"] = args.inversion_steps_offset
    return config


class Reference:
    """The frozen reference: a separate copy of the base model loaded on first use (with a trajectory cache, a run
    whose trajectories are all cached never loads it), or for LoRA the policy itself with its adapters switched off."""

    def __init__(self, load=None, lora_model=None):
        self._load, self._model, self.lora_model = load, None, lora_model

    @property
    def model(self):
        return self.lora_model if self.lora_model is not None else self.load()

    def load(self):
        if self._model is None:
            self._model = self._load()
        return self._model

    def context(self):
        return reference_mode(self.lora_model) if self.lora_model is not None else contextlib.nullcontext()


@torch.no_grad()
def perturb(params, scale, seed):
    """--init_perturbation: w += scale * rms(w) * n (scale * n where w is all zeros), n ~ N(0, 1) drawn on the CPU from
    `seed`, so every process and every resume start from the same weights."""
    generator = torch.Generator().manual_seed(seed)
    for p in params:
        noise = torch.randn(p.shape, generator=generator).to(p.device, p.dtype)
        rms = p.float().pow(2).mean().sqrt()
        p.add_(noise * (scale * rms if rms > 0 else scale))


@torch.no_grad()
def encode_images(vae, pixel_values):
    """VAE latents as the pipelines make them: (z - shift_factor) * scaling_factor (SD3 and FLUX VAEs have a shift,
    the others none). The posterior mean: a trajectory is a function of the image alone."""
    latents = vae.encode(pixel_values.to(vae.device, vae.dtype)).latent_dist.mode()
    return (latents.float() - (getattr(vae.config, "shift_factor", None) or 0.0)) * vae.config.scaling_factor


def loss_targets(args, trajectories):
    """(rows, N, C, H, W): what a prediction at each step is compared with: the stored e_i (v_i for flows), or for
    the anchored form x_i's noise relative to x_0, eps^_i (its velocity v^_i for flows)."""
    if args.loss_type == "inversion_dpo_x0":
        return trajectories.anchored_target()
    return trajectories.noise


def target_name(args):
    """Which of the reference's stored errors (trajectory_cache.REFERENCE_TARGETS) the loss compares with."""
    return "anchored" if args.loss_type == "inversion_dpo_x0" else "step"


def reference_errors(args, reference, trajectories, cond, uncond):
    """{target: (rows, N)}: the reference's squared error at every x_i under the loss guidance, against e_i ("step")
    and eps^_i ("anchored"). N reference passes per image (twice each with guidance), no gradient."""
    with torch.no_grad(), reference.context():
        prediction = predict_on_trajectory(reference.model, trajectories, cond, uncond, args.loss_guidance_scale,
                                           at="end", chunk_size=args.trajectory_chunk_size)
    return {"step": losses.squared_error(prediction, trajectories.noise, batch_dims=2),
            "anchored": losses.squared_error(prediction, trajectories.anchored_target(), batch_dims=2)}


def policy_errors(policy, trajectories, targets, cond, uncond, args, at, steps):
    """(rows, K) squared errors of the policy against `targets` at the trajectory points of `steps`."""
    prediction = predict_on_trajectory(policy, trajectories, cond, uncond, args.loss_guidance_scale, at=at,
                                       steps=steps, chunk_size=args.trajectory_chunk_size)
    return losses.squared_error(prediction, targets[:, steps], batch_dims=2)


def trajectory_loss(args, accelerator, policy, trajectories, cond, uncond, weights, generator):
    """An Inversion-DPO loss and its gradient. `trajectories`, `cond`, `uncond`: the B winners, then the B losers.

    The policy is evaluated at every step, or at --loss_timesteps steps drawn by `generator` as
    --loss_timestep_sampling says, each weighted so that the score is unbiased (`losses.draw_loss_steps`). With
    --trajectory_chunk_size K below that count the gradient is computed chunk by chunk: pass 1 takes every policy
    error without gradient, the loss, and dL/d(error) for each (image, step); pass 2 recomputes K steps at a time
    with gradient and backpropagates sum(dL/d(error) * error). Same gradient as one graph, memory of one chunk; under
    DDP only the last backward synchronises.
    """
    if args.beta_dpo is None:  # the anchored form's rule, from the first batch (BetaRule)
        BetaRule(args).calibrate(accelerator, trajectories, weights)
    at = "end" if args.loss_type in AT_END_FORMS else "start"
    targets = loss_targets(args, trajectories)
    steps, step_weights = torch.arange(trajectories.num_steps), weights
    if args.loss_timesteps is not None:
        steps, step_weights = losses.draw_loss_steps(weights, args.loss_timesteps, args.loss_timestep_sampling,
                                                     generator)
        step_weights = step_weights.to(weights.device)

    def loss_of(errors):
        errors_w, errors_l = errors.chunk(2)
        if args.loss_type in AT_END_FORMS:
            reference_w, reference_l = trajectories.reference_errors[target_name(args)][:, steps].chunk(2)
            loss_fn = losses.inversion_dpo_exact if args.loss_type == "inversion_dpo_exact" else losses.inversion_dpo_x0
            return loss_fn(errors_w, reference_w, errors_l, reference_l, step_weights, args.beta_dpo)
        loss_fn = losses.inversion_dpo if args.loss_type == "inversion_dpo" else losses.inversion_dpo_official
        return loss_fn(errors_w, errors_l, step_weights, args.beta_dpo)

    if args.trajectory_chunk_size >= len(steps):
        with phase("loss pass"):
            output = loss_of(policy_errors(policy, trajectories, targets, cond, uncond, args, at, steps))
        with phase("backward"):
            accelerator.backward(output.loss)
        return output

    with phase("loss pass"), torch.no_grad():
        errors = policy_errors(policy, trajectories, targets, cond, uncond, args, at, steps)
    errors.requires_grad_(True)
    with torch.enable_grad():
        output = loss_of(errors)
        (factor,) = torch.autograd.grad(output.loss, errors)
    chunks = torch.arange(len(steps)).split(args.trajectory_chunk_size)  # positions in `steps`
    with phase("backward"):  # each chunk's policy pass again, with its graph, then its backward
        for index, positions in enumerate(chunks):
            with contextlib.nullcontext() if index == len(chunks) - 1 else accelerator.no_sync(policy):
                chunk_errors = policy_errors(policy, trajectories, targets, cond, uncond, args, at, steps[positions])
                accelerator.backward((factor[:, positions] * chunk_errors).sum())
    output.loss = output.loss.detach()
    return output


def noising_loss(args, accelerator, policy, reference, latents_w, latents_l, cond, train_levels, generator):
    """diffusion_dpo and sft: one random training noise level per pair (DDPM: t uniform; flows: the model's
    logit-normal training density), the same noise for winner and loser; errors against eps (DDPM) or the velocity
    eps - x_0 (flows). FLUX takes --loss_guidance_scale as its guidance embedding."""
    flow = cond.kind != "unet"
    guidance = args.loss_guidance_scale if cond.kind == "flux" else None
    device = latents_w.device
    levels, timesteps = draw_training_levels(train_levels, latents_w.shape[0], flow, generator)
    noise = torch.randn(latents_w.shape, generator=generator).to(device)
    levels, timesteps = levels.to(device), timesteps.to(device)
    with phase("loss pass"):
        output = noising_loss_value(args, policy, reference, latents_w, latents_l, cond, levels, timesteps, noise,
                                    flow, guidance)
    with phase("backward"):
        accelerator.backward(output.loss)  # accelerate divides by the accumulation steps
    return output


def noising_loss_value(args, policy, reference, latents_w, latents_l, cond, levels, timesteps, noise, flow, guidance):
    """The forward half of `noising_loss`: the policy's (and for diffusion_dpo the reference's) errors, the loss."""
    if args.loss_type == "sft":
        noisy, target = training_noise(latents_w, noise, levels, flow)
        output = losses.sft(losses.squared_error(model_prediction(policy, noisy, timesteps, cond, guidance), target))
    else:
        noisy, target = training_noise(torch.cat([latents_w, latents_l]), noise.repeat(2, 1, 1, 1), levels.repeat(2),
                                       flow)
        both, timesteps2 = Conditioning.cat([cond, cond]), timesteps.repeat(2)
        policy_pred = model_prediction(policy, noisy, timesteps2, both, guidance)
        with torch.no_grad():
            with reference.context():
                reference_pred = model_prediction(reference.model, noisy, timesteps2, both, guidance)
        policy_w, policy_l = losses.squared_error(policy_pred, target).chunk(2)
        reference_w, reference_l = losses.squared_error(reference_pred, target).chunk(2)
        output = losses.diffusion_dpo(policy_w, reference_w, policy_l, reference_l, args.beta_dpo)
    return output


class BetaRule:
    """The anchored form's default temperature (`--beta_dpo` not given): beta = --relative_beta / R, R the
    reference's step-weighted error on the first step's trajectories, averaged over every process
    (`losses.reference_scale`), then fixed for the run. `trajectory_loss` calibrates it while `args.beta_dpo` is
    unset and writes it there, where the losses read it; the run's instance saves it in checkpoints
    (`accelerator.register_for_checkpointing`), so a resumed run keeps the same beta."""

    def __init__(self, args):
        self.args = args
        self.active = args.beta_dpo is None and args.loss_type == "inversion_dpo_x0"

    def calibrate(self, accelerator, trajectories, weights):
        if not self.active or self.args.beta_dpo is not None:
            return
        local = losses.reference_scale(trajectories.reference_errors[target_name(self.args)], weights)
        scale = accelerator.reduce(local.reshape(1).to(accelerator.device), "mean").item()
        self.args.beta_dpo = losses.relative_beta(self.args.relative_beta, scale)
        logger.info("beta %.4g = --relative_beta %g / R, R = %.4g (the reference's step-weighted error on the first "
                    "batch's trajectories)", self.args.beta_dpo, self.args.relative_beta, scale)

    def state_dict(self):
        return {"beta": self.args.beta_dpo if self.active else None}

    def load_state_dict(self, state):
        if self.active and state.get("beta") is not None:
            self.args.beta_dpo = state["beta"]


def pair_conditioning(args, prompt_encoder, batch):
    """The captions' conditioning for the winner rows, then the loser rows: they share the caption, encoded once;
    SDXL's time_ids (original size, crop) are each image's own."""
    target = (args.resolution, args.resolution)
    cond_w = prompt_encoder.encode(batch["captions"], batch["original_sizes_w"], batch["crop_top_lefts_w"], target)
    cond_l = cond_w
    if cond_w.time_ids is not None:
        time_ids = sdxl_time_ids(batch["original_sizes_l"], batch["crop_top_lefts_l"], target)
        cond_l = replace(cond_w, time_ids=time_ids.to(cond_w.time_ids.device))
    return Conditioning.cat([cond_w, cond_l])


def image_keys(args, cache, batch):
    """The cache's encoding key of each image, winners then losers: its pixels (after crop and flip), caption and,
    for SDXL's time_ids, original size, crop and target size."""
    keys = []
    for role in ("w", "l"):
        for b, caption in enumerate(batch["captions"]):
            ids = [batch[f"original_sizes_{role}"][b].tolist(), batch[f"crop_top_lefts_{role}"][b].tolist(),
                   args.resolution]
            keys.append(cache.image_key(batch[f"pixel_values_{role}"][b], caption, ids))
    return keys


def encode_pairs(args, accelerator, prompt_encoder, vae, batch, cache, keys):
    """Latents x_0 (2B, C, H, W) and conditioning of the winners, then the losers: from the cache's encodings when it
    holds them (no VAE, no text encoder), else encoded."""

    def encode(rows):  # the VAE on the winners, then the losers: the peak memory of B images, not 2B
        latents = torch.cat([encode_images(vae, batch["pixel_values_w"]), encode_images(vae, batch["pixel_values_l"])])
        return latents[rows], pair_conditioning(args, prompt_encoder, batch).select(rows)

    if cache is None:
        return encode(slice(None))
    return cache.encodings(keys, encode, prompt_encoder.kind, accelerator.device)


def invert_pairs(args, reference, latents, cond, uncond, schedule, cache=None, keys=None):
    """Trajectories of `latents` under the reference, with the reference's errors for the exact and anchored forms:
    read from the cache (`keys`: each image's encoding key) when it holds them, else computed. With --anchor_points
    standardised the path is moved onto the sampler's statistics (`standardised_trajectory`) and the reference's
    errors are taken there; the cache stores the inversion and those errors (its key names the setting)."""
    standardise = args.anchor_points == "standardised"

    def points(trajectories):
        return standardised_trajectory(trajectories) if standardise else trajectories

    def invert_rows(rows):
        with reference.context():
            return invert(reference.model, latents[rows], cond.select(rows),
                          None if uncond is None else uncond.select(rows), schedule, args.inversion_guidance_scale)

    def errors_of(trajectories, rows):
        return reference_errors(args, reference, points(trajectories), cond.select(rows),
                                None if uncond is None else uncond.select(rows))

    errors = errors_of if args.loss_type in AT_END_FORMS else None
    if cache is None:
        trajectories = invert_rows(slice(None))
        if errors:
            trajectories.reference_errors = errors(trajectories, slice(None))
    else:
        trajectories = cache.trajectories(keys, latents, schedule, invert_rows, errors)
    if standardise:
        trajectories = replace(points(trajectories), reference_errors=trajectories.reference_errors)
    return trajectories


def training_step(args, accelerator, model, reference, prompt_encoder, vae, batch, schedule, weights, train_levels,
                  generator, cache):
    """Encode, invert (reference, no gradient), evaluate the policy, backpropagate. Returns the `LossOutput`. With a
    warm cache the first two are reads, and the step runs the policy alone (diffusion_dpo: with the reference).

    `generator` draws the noise and timesteps of diffusion_dpo and sft, and the --loss_timesteps subset."""
    keys = None if cache is None else image_keys(args, cache, batch)
    with phase("encoding"):
        latents, cond = encode_pairs(args, accelerator, prompt_encoder, vae, batch, cache, keys)
    if args.loss_type in NOISING_FORMS:
        latents_w, latents_l = latents.chunk(2)
        cond_w = cond.select(slice(0, len(latents_w)))  # the winner's time_ids for both, as Diffusion-DPO
        return noising_loss(args, accelerator, model, reference, latents_w, latents_l, cond_w, train_levels, generator)
    uncond = prompt_encoder.unconditional(cond)
    if args.anchor_points == "noised":  # the diagnostic: forward noisings at the inversion's levels
        noise = torch.randn((len(latents), schedule.num_steps, *latents.shape[1:]), generator=generator)
        trajectories = noised_trajectory(latents, noise.to(latents.device), schedule)
        trajectories.reference_errors = reference_errors(args, reference, trajectories, cond, uncond)
    else:  # the inversion path (standardised or not: invert_pairs)
        with phase("inversion" if cache is None else "cache read"):  # a cache miss inverts inside the read
            trajectories = invert_pairs(args, reference, latents, cond, uncond, schedule, cache, keys)
    return trajectory_loss(args, accelerator, model, trajectories, cond, uncond, weights, generator)
