"""DDIM inversion by a frozen reference UNet, and the conditioning it runs on.

Pure tensor code (no accelerate, no argparse, no file I/O). The maths follows the project's method spec:

* Inverse timesteps tau_1 < ... < tau_N come from the model's own scheduler config through diffusers'
  `DDIMInverseScheduler` (clip_sample forced off); a(t) is the cumulative alpha product; the level before tau_i is
  tau_i - T // N, or the scheduler's initial alpha when that index is negative.
* One DDIM step moves x between noise levels a_from -> a_to along a given noise e (`ddim_step`): inversion runs it
  upward with e_i = eps~_ref(x_{i-1}, tau_i); the same function run downward with the stored e_i returns x_{i-1}.
* eps~(x, t) = e_u + g * (e_c - e_u) is the guided prediction (`guided_noise_prediction`); g = 1 runs the
  conditional half alone.

Shapes: a batch of B images; latents (B, C, H, W); a trajectory holds x_0..x_N as (B, N+1, C, H, W).
All timestep maths runs in float32 whatever dtype the UNet computes in.
"""

from dataclasses import dataclass, replace

import torch
from diffusers import DDIMInverseScheduler


# ----------------------------------------------------------------------------------------------------------------
# Conditioning
# ----------------------------------------------------------------------------------------------------------------


@dataclass
class Conditioning:
    """What a UNet is conditioned on, one row per sample.

    prompt_embeds: (B, L, D) text encoder states. For SDXL, both encoders' penultimate states concatenated.
    pooled_prompt_embeds: (B, P) SDXL only: the projected pooled output of text encoder 2.
    time_ids: (B, 6) SDXL only: original (h, w), crop (top, left), target (h, w).
    """

    prompt_embeds: torch.Tensor
    pooled_prompt_embeds: torch.Tensor | None = None
    time_ids: torch.Tensor | None = None

    def __post_init__(self):
        batch = self.prompt_embeds.shape[0]
        for name in ("pooled_prompt_embeds", "time_ids"):
            value = getattr(self, name)
            if value is not None and value.shape[0] != batch:
                raise ValueError(
                    f"Conditioning.{name} has batch size {value.shape[0]} but prompt_embeds has {batch}; "
                    "every field needs one row per sample"
                )
        if (self.pooled_prompt_embeds is None) != (self.time_ids is None):
            raise ValueError("SDXL conditioning needs both pooled_prompt_embeds and time_ids (or neither for SD1.x/2.x)")

    def __len__(self):
        return self.prompt_embeds.shape[0]

    def _map(self, fn):
        return Conditioning(*(None if t is None else fn(t) for t in self._fields()))

    def _fields(self):
        return (self.prompt_embeds, self.pooled_prompt_embeds, self.time_ids)

    def repeat_interleave(self, repeats):
        """Each row repeated `repeats` times in place: rows b, b, ..., b+1, b+1, ..."""
        return self._map(lambda t: t.repeat_interleave(repeats, dim=0))

    def select(self, index):
        """The rows at `index` (an int slice, a list or a tensor of indices)."""
        return self._map(lambda t: t[index])

    def to(self, *args, **kwargs):
        return self._map(lambda t: t.to(*args, **kwargs))

    @staticmethod
    def cat(parts):
        fields = list(zip(*(part._fields() for part in parts)))
        return Conditioning(*(None if field[0] is None else torch.cat(field) for field in fields))

    def unet_kwargs(self, dtype):
        """Keyword arguments for `UNet2DConditionModel.forward`, cast to the UNet's dtype."""
        kwargs = {"encoder_hidden_states": self.prompt_embeds.to(dtype)}
        if self.pooled_prompt_embeds is not None:
            kwargs["added_cond_kwargs"] = {
                "text_embeds": self.pooled_prompt_embeds.to(dtype),
                "time_ids": self.time_ids.to(dtype),
            }
        return kwargs


def sdxl_time_ids(original_sizes, crop_top_lefts, target_size):
    """SDXL micro-conditioning, (B, 6): original (h, w) + crop (top, left) + target (h, w), as float32.

    original_sizes and crop_top_lefts are (B, 2) tensors; target_size is an (h, w) pair shared by the batch.
    """
    original_sizes = torch.as_tensor(original_sizes, dtype=torch.float32)
    crop_top_lefts = torch.as_tensor(crop_top_lefts, dtype=torch.float32)
    if original_sizes.shape != crop_top_lefts.shape or original_sizes.ndim != 2 or original_sizes.shape[1] != 2:
        raise ValueError(
            f"original_sizes {tuple(original_sizes.shape)} and crop_top_lefts {tuple(crop_top_lefts.shape)} "
            "must both be (B, 2)"
        )
    target = torch.tensor(target_size, dtype=torch.float32).expand(len(original_sizes), 2)
    return torch.cat([original_sizes, crop_top_lefts, target], dim=1)


class PromptEncoder:
    """Captions -> `Conditioning`, for SDXL (two tokenizers and encoders) or SD1.x/2.x (one).

    SDXL: each encoder's penultimate hidden state, concatenated on the feature axis; the pooled projection of encoder
    2; time_ids from each sample's original size and crop. SD1.x/2.x: the last hidden state of its one encoder.

    The unconditional branch of guidance is all zeros when `zero_unconditional` (SDXL's
    `force_zeros_for_empty_prompt`, the default for SDXL) and the embedding of the empty caption otherwise
    (the default for SD1.x/2.x).
    """

    def __init__(self, tokenizers, text_encoders, zero_unconditional=None):
        if len(tokenizers) != len(text_encoders) or len(tokenizers) not in (1, 2):
            raise ValueError(
                f"expected 1 (SD1.x/2.x) or 2 (SDXL) tokenizer/text-encoder pairs, got {len(tokenizers)} tokenizers "
                f"and {len(text_encoders)} text encoders"
            )
        self.tokenizers = list(tokenizers)
        self.text_encoders = list(text_encoders)
        self.is_sdxl = len(text_encoders) == 2
        self.zero_unconditional = self.is_sdxl if zero_unconditional is None else zero_unconditional

    @property
    def device(self):
        return self.text_encoders[0].device

    def _token_ids(self, tokenizer, captions):
        return tokenizer(
            list(captions),
            padding="max_length",
            max_length=tokenizer.model_max_length,
            truncation=True,
            return_tensors="pt",
        ).input_ids.to(self.device)

    @torch.no_grad()
    def _embed(self, captions):
        if not self.is_sdxl:
            (tokenizer,), (encoder,) = self.tokenizers, self.text_encoders
            return encoder(self._token_ids(tokenizer, captions))[0].float(), None
        states = []
        for tokenizer, encoder in zip(self.tokenizers, self.text_encoders):
            output = encoder(self._token_ids(tokenizer, captions), output_hidden_states=True)
            states.append(output.hidden_states[-2])
        pooled = output.text_embeds  # the projection head of the last encoder (CLIPTextModelWithProjection)
        return torch.cat(states, dim=-1).float(), pooled.float()

    def encode(self, captions, original_sizes=None, crop_top_lefts=None, target_size=None):
        """Conditioning for `captions` (a list of B strings, one per sample).

        SDXL also needs `original_sizes` and `crop_top_lefts` ((B, 2) each, (h, w) and (top, left)) and the
        `target_size` (h, w) the images were cropped to.
        """
        if isinstance(captions, str):
            raise ValueError("captions must be a list of strings, one per sample, not a single string")
        prompt_embeds, pooled = self._embed(captions)
        if not self.is_sdxl:
            return Conditioning(prompt_embeds)
        if original_sizes is None or crop_top_lefts is None or target_size is None:
            raise ValueError("SDXL conditioning needs original_sizes, crop_top_lefts and target_size for its time_ids")
        time_ids = sdxl_time_ids(original_sizes, crop_top_lefts, target_size).to(prompt_embeds.device)
        if len(time_ids) != len(captions):
            raise ValueError(f"{len(captions)} captions but {len(time_ids)} original sizes; give one per sample")
        return Conditioning(prompt_embeds, pooled, time_ids)

    def unconditional(self, cond):
        """The unconditional counterpart of `cond` (same batch size and time_ids)."""
        if self.zero_unconditional:
            pooled = None if cond.pooled_prompt_embeds is None else torch.zeros_like(cond.pooled_prompt_embeds)
            return Conditioning(torch.zeros_like(cond.prompt_embeds), pooled, cond.time_ids)
        prompt_embeds, pooled = self._embed([""])
        batch = len(cond)
        pooled = None if pooled is None else pooled.expand(batch, -1)
        return Conditioning(prompt_embeds.expand(batch, -1, -1), pooled, cond.time_ids)


# ----------------------------------------------------------------------------------------------------------------
# Noise prediction
# ----------------------------------------------------------------------------------------------------------------


def _compute_dtype(unet):
    return next(unet.parameters()).dtype


def guided_noise_prediction(unet, latents, timesteps, cond, uncond, guidance_scale):
    """eps~(x, t) = e_u + g * (e_c - e_u) as float32, with both halves in one UNet call; g = 1 runs only e_c.

    latents: (B, C, H, W); timesteps: a scalar or (B,) tensor; cond, uncond: `Conditioning` of batch B
    (uncond is unused, and may be None, when g = 1).
    """
    batch = latents.shape[0]
    if len(cond) != batch:
        raise ValueError(f"latents have batch size {batch} but the conditioning has {len(cond)}; give one per sample")
    timesteps = torch.as_tensor(timesteps, device=latents.device).reshape(-1).expand(batch)
    dtype = _compute_dtype(unet)
    # One memory layout for every call: convolution kernels round differently on strided or channels-last inputs,
    # and the policy must see bit-for-bit the inputs the reference saw during inversion.
    latents = latents.contiguous()
    if guidance_scale == 1:
        return unet(latents.to(dtype), timesteps, **cond.unet_kwargs(dtype)).sample.float()
    if uncond is None or len(uncond) != batch:
        raise ValueError(f"guidance scale {guidance_scale} needs unconditional conditioning of batch size {batch}")
    both = Conditioning.cat([uncond, cond])
    prediction = unet(
        torch.cat([latents, latents]).to(dtype), torch.cat([timesteps, timesteps]), **both.unet_kwargs(dtype)
    ).sample.float()
    uncond_pred, cond_pred = prediction.chunk(2)
    return uncond_pred + guidance_scale * (cond_pred - uncond_pred)


# ----------------------------------------------------------------------------------------------------------------
# Schedule and DDIM step
# ----------------------------------------------------------------------------------------------------------------


@dataclass
class InversionSchedule:
    """The N inverse DDIM steps: timesteps tau_1..tau_N (ascending) and the noise levels a(tau_0)..a(tau_N)."""

    timesteps: torch.Tensor  # (N,) int64
    alphas: torch.Tensor  # (N + 1,) float32, alphas[i] = a(tau_i); alphas[0] is the level before tau_1

    @property
    def num_steps(self):
        return len(self.timesteps)

    @classmethod
    def from_scheduler_config(cls, scheduler_config, num_steps):
        """The schedule of `num_steps` inversion steps for a model whose scheduler config is `scheduler_config`.

        Any diffusers scheduler config of the model works (SDXL ships an Euler one): its betas, steps_offset and
        set_alpha_to_one are read, clip_sample is forced off, and spacings other than "trailing" run as "leading".
        """
        config = dict(scheduler_config)
        prediction_type = config.get("prediction_type", "epsilon")
        if prediction_type != "epsilon":
            raise ValueError(
                f"the model's scheduler predicts {prediction_type!r}; DDIM inversion here needs an epsilon-prediction "
                "model (prediction_type='epsilon')"
            )
        num_train_timesteps = config.get("num_train_timesteps", 1000)
        if not isinstance(num_steps, int) or not 1 <= num_steps <= num_train_timesteps:
            raise ValueError(
                f"the number of inversion steps must be an integer from 1 to {num_train_timesteps} "
                f"(the model's training timesteps), got {num_steps!r}"
            )
        if config.get("timestep_spacing") != "trailing":
            config["timestep_spacing"] = "leading"
        scheduler = DDIMInverseScheduler.from_config(config, clip_sample=False)
        scheduler.set_timesteps(num_steps)
        timesteps = scheduler.timesteps.clone().long()
        if int(timesteps.max()) >= num_train_timesteps:
            raise ValueError(
                f"{num_steps} inversion steps with steps_offset {config.get('steps_offset', 0)} reach timestep "
                f"{int(timesteps.max())}, past the model's last ({num_train_timesteps - 1}); use fewer steps"
            )
        alphas_cumprod = scheduler.alphas_cumprod.float()
        first_previous = int(timesteps[0]) - num_train_timesteps // num_steps
        start = alphas_cumprod[first_previous] if first_previous >= 0 else scheduler.initial_alpha_cumprod
        alphas = torch.cat([torch.as_tensor(start, dtype=torch.float32).reshape(1), alphas_cumprod[timesteps]])
        return cls(timesteps=timesteps, alphas=alphas)


def training_alphas(scheduler_config):
    """a(t) for every training timestep t = 0..T-1 of the model's noise schedule, (T,) float32."""
    return DDIMInverseScheduler.from_config(dict(scheduler_config)).alphas_cumprod.float()


def ddim_step(latents, noise, alpha_from, alpha_to):
    """Deterministic DDIM move of `latents` from noise level a_from to a_to along `noise`:

        x_to = sqrt(a_to) * (x_from - sqrt(1 - a_from) * e) / sqrt(a_from) + sqrt(1 - a_to) * e

    With a_from = a(tau_{i-1}), a_to = a(tau_i) and e = e_i this is inversion step i; with the levels swapped it is
    the DDIM sampling step back, which lands exactly on x_{i-1}. Computed in float32.
    """
    latents, noise = latents.float(), noise.float()
    alpha_from = torch.as_tensor(alpha_from, dtype=torch.float32, device=latents.device)
    alpha_to = torch.as_tensor(alpha_to, dtype=torch.float32, device=latents.device)
    predicted_clean = (latents - (1 - alpha_from).sqrt() * noise) / alpha_from.sqrt()
    return alpha_to.sqrt() * predicted_clean + (1 - alpha_to).sqrt() * noise


def forward_noise(latents, noise, alphas):
    """Diffusion forward process x_t = sqrt(a_t) * x_0 + sqrt(1 - a_t) * eps, with one a_t per sample (B,)."""
    alphas = alphas.float().reshape(-1, *([1] * (latents.ndim - 1)))
    return alphas.sqrt() * latents.float() + (1 - alphas).sqrt() * noise.float()


def anchored_noise(latents, alphas):
    """The effective noise of each trajectory point relative to the clean latent, the anchored form's target:

        eps^_i = (x_i - sqrt(a(tau_i)) * x_0) / sqrt(1 - a(tau_i)),  so that x_i = sqrt(a) x_0 + sqrt(1 - a) eps^_i

    latents: (B, N+1, ...) holding x_0..x_N; alphas: (N+1,) a(tau_0)..a(tau_N). Returns (B, N, ...) for i = 1..N,
    float32.
    """
    latents = latents.float()
    alphas = torch.as_tensor(alphas, dtype=torch.float32, device=latents.device)[1:]
    alphas = alphas.reshape(1, -1, *([1] * (latents.ndim - 2)))
    return (latents[:, 1:] - alphas.sqrt() * latents[:, :1]) / (1 - alphas).sqrt()


# ----------------------------------------------------------------------------------------------------------------
# Trajectories
# ----------------------------------------------------------------------------------------------------------------


@dataclass
class Trajectory:
    """The DDIM inversion path of B images under the reference model.

    latents: (B, N+1, C, H, W) float32, x_0..x_N.
    noise: (B, N, C, H, W) float32, e_i = eps~_ref(x_{i-1}, tau_i) for i = 1..N.
    timesteps: (N,) tau_1..tau_N.  alphas: (N+1,) a(tau_0)..a(tau_N).
    noise_at_end: (B, N, C, H, W) float32 or None, eps~_ref(x_i, tau_i): the reference term of the exact form.
    """

    latents: torch.Tensor
    noise: torch.Tensor
    timesteps: torch.Tensor
    alphas: torch.Tensor
    noise_at_end: torch.Tensor | None = None

    @property
    def num_steps(self):
        return self.noise.shape[1]

    def __len__(self):
        return self.latents.shape[0]

    def select(self, index):
        """The trajectories of the images at `index`."""
        at_end = None if self.noise_at_end is None else self.noise_at_end[index]
        return replace(self, latents=self.latents[index], noise=self.noise[index], noise_at_end=at_end)


def predict_on_trajectory(unet, trajectory, cond, uncond, guidance_scale, at="start", steps=None, chunk_size=None):
    """eps~(x, tau_i) of `unet` at trajectory points, (B, K, C, H, W) float32 for the K steps in `steps`.

    at="start" evaluates x_{i-1} (the point inversion step i started from: the paper form), at="end" evaluates x_i
    (the exact form). `steps` are 0-based step indices (default: all N). Up to `chunk_size` steps of every image go
    through the UNet in one call (default: all K at once).
    """
    if at not in ("start", "end"):
        raise ValueError(f"at must be 'start' or 'end', got {at!r}")
    batch, num_steps = len(trajectory), trajectory.num_steps
    if len(cond) != batch:
        raise ValueError(f"{batch} trajectories but conditioning for {len(cond)}; give one per image")
    steps = torch.arange(num_steps) if steps is None else torch.as_tensor(steps).reshape(-1).cpu()
    if len(steps) == 0 or int(steps.min()) < 0 or int(steps.max()) >= num_steps:
        raise ValueError(f"steps must be non-empty indices in [0, {num_steps}), got {steps.tolist()}")
    chunk_size = len(steps) if chunk_size is None else chunk_size
    if chunk_size < 1:
        raise ValueError(f"chunk_size must be at least 1, got {chunk_size}")
    offset = 0 if at == "start" else 1
    device = trajectory.latents.device
    predictions = []
    for chunk in steps.split(chunk_size):
        k = len(chunk)
        points = trajectory.latents[:, chunk + offset].flatten(0, 1)  # (B*k, C, H, W): image-major
        timesteps = trajectory.timesteps[chunk].to(device).repeat(batch)
        prediction = guided_noise_prediction(
            unet,
            points,
            timesteps,
            cond.repeat_interleave(k),
            None if uncond is None else uncond.repeat_interleave(k),
            guidance_scale,
        )
        predictions.append(prediction.unflatten(0, (batch, k)))
    return torch.cat(predictions, dim=1)


@torch.no_grad()
def ddim_invert(unet, latents, cond, uncond, schedule, guidance_scale, with_noise_at_end=False, chunk_size=None):
    """Invert clean latents x_0 (B, C, H, W) to noise with the frozen `unet`, one DDIM step per schedule step:

        e_i = eps~(x_{i-1}, tau_i);   x_i = ddim_step(x_{i-1}, e_i, a(tau_{i-1}), a(tau_i))

    `with_noise_at_end` also evaluates eps~(x_i, tau_i) for every i (N more calls, `chunk_size` steps per call), the
    reference term of the exact form. Returns a `Trajectory`.
    """
    if latents.ndim != 4:
        raise ValueError(f"latents must be (B, C, H, W), got shape {tuple(latents.shape)}")
    x = latents.float()
    points, noise = [x], []
    timesteps = schedule.timesteps.to(latents.device)
    alphas = schedule.alphas.to(latents.device)
    for i in range(schedule.num_steps):
        e = guided_noise_prediction(unet, x, timesteps[i], cond, uncond, guidance_scale)
        x = ddim_step(x, e, alphas[i], alphas[i + 1])
        points.append(x)
        noise.append(e)
    trajectory = Trajectory(torch.stack(points, 1), torch.stack(noise, 1), timesteps, alphas)
    if with_noise_at_end:
        trajectory.noise_at_end = predict_on_trajectory(
            unet, trajectory, cond, uncond, guidance_scale, at="end", chunk_size=chunk_size
        )
    return trajectory


# ----------------------------------------------------------------------------------------------------------------
# Rectified flows (SD3/SD3.5, FLUX): Euler inversion in velocity space (METHOD.md section 7)
# ----------------------------------------------------------------------------------------------------------------


@dataclass
class FlowSchedule:
    """The N upward Euler steps of a flow inversion: noise levels 0 = sigma_0 < sigma_1 < ... < sigma_N."""

    sigmas: torch.Tensor  # (N + 1,) float32, ascending from 0
    num_train_timesteps: int = 1000

    @property
    def num_steps(self):
        return len(self.sigmas) - 1

    @property
    def timesteps(self):
        """(N,) the model's timestep input at sigma_1..sigma_N (sigma * num_train_timesteps, as the pipelines pass)."""
        return self.sigmas[1:] * self.num_train_timesteps

    @classmethod
    def from_scheduler_config(cls, scheduler_config, num_steps, mu=None):
        """The model's own N sampling sigmas (its FlowMatchEulerDiscreteScheduler config: shift, or with dynamic
        shifting the resolution-dependent `mu` the pipeline computes), run upward from 0."""
        from diffusers import FlowMatchEulerDiscreteScheduler

        scheduler = FlowMatchEulerDiscreteScheduler.from_config(dict(scheduler_config))
        if scheduler.config.use_dynamic_shifting and mu is None:
            raise ValueError("this model's scheduler shifts its sigmas with the image size; pass the pipeline's mu "
                             "for the training resolution")
        if not isinstance(num_steps, int) or num_steps < 1:
            raise ValueError(f"the number of inversion steps must be a positive integer, got {num_steps!r}")
        scheduler.set_timesteps(num_steps, mu=mu)
        sigmas = scheduler.sigmas.float().flip(0)  # the sampler's sigmas end at 0; inversion starts there
        if sigmas[0] != 0 or not bool((sigmas[1:] > sigmas[:-1]).all()):
            raise ValueError(f"expected sigmas rising from 0, got {sigmas.tolist()}")
        return cls(sigmas=sigmas, num_train_timesteps=scheduler.config.num_train_timesteps)


def euler_step(latents, velocity, sigma_from, sigma_to):
    """x_to = x_from + (sigma_to - sigma_from) * v in float32: upward it is inversion step i (v = v_i); downward
    with the same v it is the sampler's Euler step, which lands exactly back on x_from."""
    return latents.float() + (float(sigma_to) - float(sigma_from)) * velocity.float()


@torch.no_grad()
def flow_invert(velocity, latents, schedule):
    """Invert clean latents x_0 (B, ...) along the flow of the frozen reference, one Euler step per sigma:

        v_i = velocity(x_{i-1}, sigma_i);   x_i = x_{i-1} + (sigma_i - sigma_{i-1}) v_i

    `velocity(x, timesteps)` is the reference's (guided) velocity at model timesteps (B,) = sigma * T. Returns
    (points (B, N+1, ...) x_0..x_N, velocities (B, N, ...) v_1..v_N), float32.
    """
    x = latents.float()
    points, velocities = [x], []
    for i in range(schedule.num_steps):
        timesteps = schedule.timesteps[i].expand(len(x)).to(x.device)
        v = velocity(x, timesteps).float()
        x = euler_step(x, v, schedule.sigmas[i], schedule.sigmas[i + 1])
        points.append(x)
        velocities.append(v)
    return torch.stack(points, 1), torch.stack(velocities, 1)


def anchored_velocity(points, sigmas):
    """The anchored form's flow target v^_i = (x_i - x_0) / sigma_i = eps^_i - x_0, where eps^_i is x_i's noise
    relative to x_0 (x_i = (1 - sigma_i) x_0 + sigma_i eps^_i exactly). points (B, N+1, ...), sigmas (N+1,):
    returns (B, N, ...) for i = 1..N, float32."""
    points = points.float()
    sigmas = torch.as_tensor(sigmas, dtype=torch.float32, device=points.device)[1:]
    sigmas = sigmas.reshape(1, -1, *([1] * (points.ndim - 2)))
    return (points[:, 1:] - points[:, :1]) / sigmas


def flow_forward(latents, noise, sigmas):
    """The flow's forward process x_sigma = (1 - sigma) x_0 + sigma * eps, one sigma per sample (B,); float32.
    Its velocity target (what the model is trained to predict there) is eps - x_0."""
    sigmas = torch.as_tensor(sigmas, dtype=torch.float32, device=latents.device).reshape(-1, *([1] * (latents.ndim - 1)))
    return (1 - sigmas) * latents.float() + sigmas * noise.float()


def logit_normal_sigmas(count, generator=None, mean=0.0, std=1.0):
    """`count` training noise levels from SD3's logit-normal density: sigma = sigmoid(n), n ~ N(mean, std^2)."""
    return torch.sigmoid(mean + std * torch.randn(count, generator=generator))
