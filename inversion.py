"""Inversion by a frozen reference model (DDIM for UNets, Euler for rectified flows); the networks are called through
models.py.

Pure tensor code (no accelerate, no argparse, no file I/O). The maths follows the project's method spec:

* Inverse timesteps tau_1 < ... < tau_N come from the model's own scheduler config through diffusers'
  `DDIMInverseScheduler` (clip_sample forced off); a(t) is the cumulative alpha product; the level before tau_i is
  tau_i - T // N, or the scheduler's initial alpha when that index is negative.
* One DDIM step moves x between noise levels a_from -> a_to along a given noise e (`ddim_step`): inversion runs it
  upward with e_i = eps~_ref(x_{i-1}, tau_i); the same function run downward with the stored e_i returns x_{i-1}.
* eps~(x, t) = e_u + g * (e_c - e_u) is the guided prediction (`guided_noise_prediction`); g = 1 runs the
  conditional half alone.
* Rectified flows (SD3, FLUX; METHOD.md section 7): `FlowSchedule` holds the model's own sampling sigmas run
  upward from 0, inversion steps are Euler steps along the reference's velocity, and `models.model_prediction`
  calls each network (UNet, SD3 transformer, FLUX transformer) as its pipeline does, so the same trajectory code
  serves all.

Shapes: a batch of B images; latents (B, C, H, W); a trajectory holds x_0..x_N as (B, N+1, C, H, W).
All timestep maths runs in float32 whatever dtype the UNet computes in.
"""

from dataclasses import dataclass, replace

import torch
from diffusers import DDIMInverseScheduler

from models import guided_noise_prediction


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

    def step(self, latents, noise, i):
        """Inversion step i + 1 (0-based i): x_{i+1} = ddim_step(x_i, e_{i+1}, a(tau_i), a(tau_{i+1}))."""
        alphas = self.alphas.to(latents.device)
        return ddim_step(latents, noise, alphas[i], alphas[i + 1])

    def anchored_target(self, points):
        """The anchored form's targets for trajectory points (B, N+1, ...): `anchored_noise`."""
        return anchored_noise(points, self.alphas)


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
    """The inversion path of B images under the reference model (DDIM, or Euler for flows).

    latents: (B, N+1, C, H, W) float32, x_0..x_N.
    noise: (B, N, C, H, W) float32, the reference's guided prediction at x_{i-1} for i = 1..N: the noise e_i (DDIM)
        or the velocity v_i (flows) that step i moved along.
    schedule: the `InversionSchedule` or `FlowSchedule` it was inverted on.
    noise_at_end: (B, N, C, H, W) float32 or None, the reference's prediction at x_i: the reference term of the exact
        and anchored forms.
    reference_errors: None, or {target: (B, N) float32}: the reference's squared error at x_i (mean over elements)
        against each loss target, "step" (e_i / v_i: the exact form) and "anchored" (eps^_i / v^_i). All the exact
        and anchored forms need of the reference: a few numbers per step instead of a prediction.
    """

    latents: torch.Tensor
    noise: torch.Tensor
    schedule: "InversionSchedule | FlowSchedule"
    noise_at_end: torch.Tensor | None = None
    reference_errors: dict | None = None

    @classmethod
    def from_noise(cls, latents, noise, schedule):
        """The trajectory that starts at x_0 = `latents` (B, C, H, W) and moves along `noise` (B, N, ...): the same
        steps as `invert_path`, so stored noise rebuilds the inverted points bit for bit. float32."""
        points = [latents.float()]
        noise = noise.float()
        for i in range(schedule.num_steps):
            points.append(schedule.step(points[-1], noise[:, i], i))
        return cls(torch.stack(points, 1), noise, schedule)

    @property
    def num_steps(self):
        return self.noise.shape[1]

    @property
    def timesteps(self):
        """(N,) the model's timestep input at steps 1..N."""
        return self.schedule.timesteps

    def anchored_target(self):
        """(B, N, ...) the anchored form's targets: eps^_i (DDIM) or v^_i (flows)."""
        return self.schedule.anchored_target(self.latents)

    def __len__(self):
        return self.latents.shape[0]

    def select(self, index):
        """The trajectories of the images at `index`."""
        at_end = None if self.noise_at_end is None else self.noise_at_end[index]
        errors = None if self.reference_errors is None else {k: v[index] for k, v in self.reference_errors.items()}
        return replace(self, latents=self.latents[index], noise=self.noise[index], noise_at_end=at_end,
                       reference_errors=errors)


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


def invert_path(predict, latents, schedule):
    """The inversion loop: from x_0 (B, ...) up the schedule, one step along the model's own prediction each time:

        e_i = predict(x_{i-1}, timesteps (B,) at step i);   x_i = schedule.step(x_{i-1}, e_i, i - 1)

    (a DDIM step for an `InversionSchedule`, an Euler step for a `FlowSchedule`). Returns (points (B, N+1, ...)
    x_0..x_N, predictions (B, N, ...) e_1..e_N), float32."""
    x = latents.float()
    points, predictions = [x], []
    for i in range(schedule.num_steps):
        timesteps = schedule.timesteps[i].expand(len(x)).to(x.device)
        e = predict(x, timesteps).float()
        x = schedule.step(x, e, i)
        points.append(x)
        predictions.append(e)
    return torch.stack(points, 1), torch.stack(predictions, 1)


@torch.no_grad()
def invert(model, latents, cond, uncond, schedule, guidance_scale, with_noise_at_end=False, chunk_size=None):
    """Invert clean latents x_0 (B, C, H, W) with the frozen `model` (`invert_path` along its guided prediction):
    DDIM inversion on an `InversionSchedule`, Euler inversion of the flow on a `FlowSchedule`.

    `with_noise_at_end` also evaluates the model at every x_i (N more calls, `chunk_size` steps per call), the
    reference term of the exact and anchored forms. Returns a `Trajectory`.
    """
    if latents.ndim != 4:
        raise ValueError(f"latents must be (B, C, H, W), got shape {tuple(latents.shape)}")

    def predict(x, timesteps):
        return guided_noise_prediction(model, x, timesteps, cond, uncond, guidance_scale)

    trajectory = Trajectory(*invert_path(predict, latents, schedule), schedule)
    if with_noise_at_end:
        trajectory.noise_at_end = predict_on_trajectory(
            model, trajectory, cond, uncond, guidance_scale, at="end", chunk_size=chunk_size
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
    def from_scheduler_config(cls, scheduler_config, num_steps, mu=None, sampler_sigmas=None):
        """The model's own N sampling sigmas (its FlowMatchEulerDiscreteScheduler config: shift, or with dynamic
        shifting the resolution-dependent `mu` the pipeline computes), run upward from 0. `sampler_sigmas`: the
        unshifted sigmas the pipeline passes to `set_timesteps`, if it passes any (FluxPipeline does)."""
        from diffusers import FlowMatchEulerDiscreteScheduler

        scheduler = FlowMatchEulerDiscreteScheduler.from_config(dict(scheduler_config))
        if scheduler.config.use_dynamic_shifting and mu is None:
            raise ValueError("this model's scheduler shifts its sigmas with the image size; pass the pipeline's mu "
                             "for the training resolution")
        if not isinstance(num_steps, int) or num_steps < 1:
            raise ValueError(f"the number of inversion steps must be a positive integer, got {num_steps!r}")
        if sampler_sigmas is not None:
            scheduler.set_timesteps(sigmas=list(sampler_sigmas), mu=mu)
        else:
            scheduler.set_timesteps(num_steps, mu=mu)
        sigmas = scheduler.sigmas.float().flip(0)  # the sampler's sigmas end at 0; inversion starts there
        if sigmas[0] != 0 or not bool((sigmas[1:] > sigmas[:-1]).all()):
            raise ValueError(f"expected sigmas rising from 0, got {sigmas.tolist()}")
        return cls(sigmas=sigmas, num_train_timesteps=scheduler.config.num_train_timesteps)

    @classmethod
    def for_pipeline(cls, kind, scheduler_config, num_steps, latent_size):
        """The schedule `StableDiffusion3Pipeline` ("sd3") or `FluxPipeline` ("flux") samples with at `num_steps`
        steps, for square latents of side `latent_size`: FLUX passes sigmas linspace(1, 1/N, N) and, like SD3 with
        dynamic shifting, shifts them by mu, linear in the number of image tokens (`flow_shift_mu`)."""
        config = dict(scheduler_config)
        tokens = (latent_size // 2) ** 2  # 2x2 patches: FLUX's packing, SD3's patch size
        mu = flow_shift_mu(config, tokens) if config.get("use_dynamic_shifting") else None
        sampler_sigmas = None
        if kind == "flux" and not config.get("use_flow_sigmas"):
            sampler_sigmas = torch.linspace(1.0, 1.0 / num_steps, num_steps, dtype=torch.float64).tolist()
        return cls.from_scheduler_config(config, num_steps, mu=mu, sampler_sigmas=sampler_sigmas)

    def step(self, latents, velocity, i):
        """Inversion step i + 1 (0-based i): x_{i+1} = euler_step(x_i, v_{i+1}, sigma_i, sigma_{i+1})."""
        return euler_step(latents, velocity, self.sigmas[i], self.sigmas[i + 1])

    def anchored_target(self, points):
        """The anchored form's targets for trajectory points (B, N+1, ...): `anchored_velocity`."""
        return anchored_velocity(points, self.sigmas)


def flow_shift_mu(scheduler_config, image_tokens):
    """The pipelines' resolution-dependent shift (diffusers' `calculate_shift`): mu linear in the number of image
    tokens, base_shift at base_image_seq_len and max_shift at max_image_seq_len."""
    base_len, max_len = scheduler_config.get("base_image_seq_len", 256), scheduler_config.get("max_image_seq_len", 4096)
    base_shift, max_shift = scheduler_config.get("base_shift", 0.5), scheduler_config.get("max_shift", 1.15)
    slope = (max_shift - base_shift) / (max_len - base_len)
    return image_tokens * slope + base_shift - slope * base_len


def euler_step(latents, velocity, sigma_from, sigma_to):
    """x_to = x_from + (sigma_to - sigma_from) * v in float32: upward it is inversion step i (v = v_i); downward
    with the same v it is the sampler's Euler step, which lands exactly back on x_from."""
    return latents.float() + (float(sigma_to) - float(sigma_from)) * velocity.float()


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


def flow_training_sigmas(scheduler_config):
    """(T,) the sigma of each training timestep index of a flow model's scheduler, as diffusers' SD3 and FLUX
    training scripts read them (the static shift applied; none with dynamic shifting)."""
    from diffusers import FlowMatchEulerDiscreteScheduler

    return FlowMatchEulerDiscreteScheduler.from_config(dict(scheduler_config)).sigmas.float()


def draw_training_levels(levels, count, flow, generator):
    """`count` random training noise levels for the Diffusion-DPO and SFT baselines, and the model's timestep input
    at each: DDPM t uniform over `levels` = `training_alphas` (returns a(t), t); flows an index from SD3's
    logit-normal density into `levels` = `flow_training_sigmas`, as diffusers' scripts draw it (returns sigma,
    sigma * T)."""
    size = len(levels)
    if flow:
        index = (logit_normal_sigmas(count, generator) * size).long().clamp(max=size - 1)
        return levels[index], levels[index] * size
    timesteps = torch.randint(0, size, (count,), generator=generator)
    return levels[timesteps], timesteps


def training_noise(latents, noise, levels, flow):
    """Noised latents and the training target at one level per row (B,): DDPM x_t = sqrt(a) x_0 + sqrt(1 - a) eps
    with target eps; flows x = (1 - sigma) x_0 + sigma eps with target the velocity eps - x_0. float32."""
    if flow:
        return flow_forward(latents, noise, levels), noise.float() - latents.float()
    return forward_noise(latents, noise, levels), noise.float()


def noised_trajectory(latents, noise, schedule):
    """A diagnostic stand-in for the inversion path: x_0 (B, C, H, W) noised to each of the schedule's N levels with
    independent noise z (B, N, C, H, W), DDIM x_i = sqrt(a_i) x_0 + sqrt(1 - a_i) z_i, flows x_i = (1 - sigma_i) x_0
    + sigma_i z_i: the points Diffusion-DPO trains at, at the inversion's levels. The anchored targets of these
    points are z_i (DDIM) and z_i - x_0 (flows). `noise` fills the trajectory's step-noise field; no inversion step
    joins these points. float32."""
    flow = isinstance(schedule, FlowSchedule)
    levels = (schedule.sigmas if flow else schedule.alphas)[1:].to(latents.device)
    batch, num_steps = noise.shape[:2]
    x0 = latents.float().unsqueeze(1).expand(-1, num_steps, *latents.shape[1:]).flatten(0, 1)
    noisy, _ = training_noise(x0, noise.flatten(0, 1), levels.repeat(batch), flow)
    points = torch.cat([latents.float().unsqueeze(1), noisy.unflatten(0, (batch, num_steps))], dim=1)
    return Trajectory(points, noise.float(), schedule)


def standardised_trajectory(trajectory):
    """The inversion path moved onto the sampling distribution's statistics: each point's noise relative to x_0,
    eps^_i (DDIM x_i = sqrt(a_i) x_0 + sqrt(1 - a_i) eps^_i; flows x_i = (1 - sigma_i) x_0 + sigma_i eps^_i), is
    standardised per image, step and channel over the spatial positions (mean 0, standard deviation 1, as a draw of
    the sampler's starting noise has), and the point rebuilt from it. The inversion's spatial pattern stays; its
    channel offsets and shrunken scale (which follow the image: docs/study.md, 'Settings that transfer') go. The anchored
    targets of the new points are the standardised eps^_i (DDIM) and eps^_i - x_0 (flows). Candidate for the anchored
    form (--anchor_points standardised); the step noise and stored reference terms no longer belong to these points
    and are dropped. float32."""
    # contiguous: a reduction's rounding follows the memory layout, and an inverted path and the same path rebuilt
    # from the cache's noise are laid out differently
    schedule, points = trajectory.schedule, trajectory.latents.float().contiguous()
    flow = isinstance(schedule, FlowSchedule)
    x0 = points[:, :1]
    shape = (1, -1, *([1] * (points.ndim - 2)))
    if flow:
        keep = (1 - schedule.sigmas[1:].to(points.device)).reshape(shape)
        spread = schedule.sigmas[1:].to(points.device).reshape(shape)
    else:
        alphas = schedule.alphas[1:].to(points.device).float()
        keep, spread = alphas.sqrt().reshape(shape), (1 - alphas).sqrt().reshape(shape)
    noise = (points[:, 1:] - keep * x0) / spread
    spatial = tuple(range(3, points.ndim))
    noise = (noise - noise.mean(spatial, keepdim=True)) / noise.std(spatial, keepdim=True).clamp_min(1e-6)
    rebuilt = torch.cat([x0, keep * x0 + spread * noise], dim=1)
    return Trajectory(rebuilt, trajectory.noise, schedule)
