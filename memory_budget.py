"""What a run will hold on the card, stated before the reference loads (the trainer's log, and `--memory_budget`,
which prints it and exits): the bytes of every part, their sum against the card's memory, and the flag changes that
would bring it under.

The parts are counted, not assumed: the loaded modules' parameter bytes, gradient bytes of the trainable parameters,
the optimiser's state from its rules per parameter, the reference as the policy's parameter count in the
mixed-precision dtype, and the activations the policy's graph holds for one image, measured by a probe (one forward
and backward of the real model at two small resolutions, extrapolated in pixel count) times the images in one graph.
The probe measures what the allocator held on a CUDA card, and the bytes of the tensors autograd saved elsewhere.
What is left out (the no-gradient passes' passing activations, allocator fragmentation) is the stated margin's job.
"""

from dataclasses import dataclass, field

import torch

GIB = 2**30
MARGIN = 0.10  # of the sum: passing activations of the no-gradient passes, kernel workspaces, fragmentation
OPTIMIZERS = ("adamw", "adamw8bit", "adafactor")


def size(value):
    """Bytes as GiB, or MiB below one GiB."""
    return f"{value / GIB:.2f} GiB" if value >= GIB else f"{value / 2**20:.1f} MiB"


def module_bytes(*modules):
    """Bytes of the parameters and buffers of `modules` (each storage once)."""
    seen, total = set(), 0
    for module in modules:
        if module is None:
            continue
        for tensor in (*module.parameters(), *module.buffers()):
            key = (tensor.device, tensor.untyped_storage().data_ptr())
            if key not in seen:
                seen.add(key)
                total += tensor.untyped_storage().nbytes()
    return total


def optimizer_state_bytes(shapes, optimizer):
    """Bytes of the optimiser's state for parameters of these shapes (float32 trainable parameters):
    AdamW two float32 moments per element; 8-bit AdamW (bitsandbytes) two uint8 moments, plus a float32 scale per
    block of 2048; Adafactor (transformers, beta1 None) a float32 row and column second moment for a parameter of
    two or more dimensions (factored over its last two), a full one for the others."""
    if optimizer not in OPTIMIZERS:
        raise ValueError(f"optimizer must be one of {OPTIMIZERS}, got {optimizer!r}")
    total = 0
    for shape in shapes:
        numel = 1
        for size in shape:
            numel *= size
        if optimizer == "adamw":
            total += 8 * numel
        elif optimizer == "adamw8bit":
            total += 2 * numel + 2 * 4 * -(-numel // 2048)
        elif len(shape) >= 2:
            rows = numel // shape[-1]  # the shape without its last dimension
            columns = numel // shape[-2]  # without the one before
            total += 4 * (rows + columns)
        else:
            total += 4 * numel
    return total


def lora_parameter_shapes(model, rank, targets):
    """Shapes of the LoRA A and B matrices peft adds to the Linear layers of `model` whose name ends in one of
    `targets` (comma-separated or a list)."""
    if isinstance(targets, str):
        targets = [t.strip() for t in targets.split(",")]
    shapes = []
    for name, module in model.named_modules():
        if isinstance(module, torch.nn.Linear) and any(name == t or name.endswith("." + t) for t in targets):
            shapes += [(rank, module.in_features), (module.out_features, rank)]
    return shapes


def graph_bytes(forward, inputs, exclude=()):
    """Bytes the graph of `forward()` holds for its backward: on a CUDA card, the allocator's peak over the forward
    and a backward to `inputs` (no parameter gradients are made) above what it held before; elsewhere the bytes of
    the distinct storages autograd saved, less those of the tensors in `exclude` (the model's parameters, which are
    counted already)."""
    device = inputs.device
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        before = torch.cuda.memory_allocated(device)
        torch.cuda.reset_peak_memory_stats(device)
        output = forward()
        torch.autograd.grad(output.float().square().mean(), inputs)
        del output
        torch.cuda.synchronize(device)
        return torch.cuda.max_memory_allocated(device) - before
    saved = {}

    def pack(tensor):
        storage = tensor.untyped_storage()
        saved[(storage.device, storage.data_ptr())] = storage.nbytes()
        return tensor

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda tensor: tensor):
        output = forward()
    for tensor in exclude:
        saved.pop((tensor.untyped_storage().device, tensor.untyped_storage().data_ptr()), None)
    torch.autograd.grad(output.float().square().mean(), inputs)
    return sum(saved.values())


def probe_sizes(latent_size):
    """The latent sides the activation probe runs at: a quarter and a half of `latent_size`, multiples of 8 (what
    every supported model's down-sampling and patching divides), at least 8 and at most `latent_size`."""
    def round8(value):
        return min(latent_size, max(8, 8 * round(value / 8)))

    return sorted({round8(latent_size / 4), round8(latent_size / 2)})


def extrapolate(measured, latent_size):
    """Bytes per image at `latent_size` from {side: bytes}: a line in pixel count through two probes (intercept
    at least 0), through the origin for one."""
    sides = sorted(measured)
    if len(sides) == 1:
        return measured[sides[0]] * latent_size**2 / sides[0] ** 2
    (a, bytes_a), (b, bytes_b) = (sides[0], measured[sides[0]]), (sides[-1], measured[sides[-1]])
    slope = (bytes_b - bytes_a) / (b**2 - a**2)
    if slope <= 0:  # rounding-level differences: proportional to the larger probe
        return bytes_b * latent_size**2 / b**2
    return max(0.0, bytes_a - slope * a**2) + slope * latent_size**2


def images_per_graph(loss_type, batch_size, chunk, evaluated, guidance):
    """Images in the policy's largest graph of one micro-step: the winners and losers (2B) times the steps held at
    once (the chunk, or every evaluated step when it is larger), twice under classifier-free guidance;
    diffusion_dpo 2B, sft B."""
    if loss_type == "sft":
        return batch_size
    if loss_type == "diffusion_dpo":
        return 2 * batch_size
    return 2 * batch_size * min(chunk, evaluated) * (2 if guidance != 1 else 1)


@dataclass
class Budget:
    """The expected peak of one process, part by part (bytes), and the memory it must fit in (bytes, or None)."""

    parts: dict
    limit: int | None = None
    notes: list = field(default_factory=list)

    @property
    def total(self):
        subtotal = sum(self.parts.values())
        return int(subtotal * (1 + MARGIN))

    @property
    def fits(self):
        return self.limit is None or self.total <= self.limit

    def lines(self):
        rows = [f"  {name:<38} {size(value):>12}" for name, value in self.parts.items()]
        margin = f"margin ({MARGIN:.0%})"
        rows.append(f"  {margin:<38} {size(self.total - sum(self.parts.values())):>12}")
        rows.append(f"  {'expected peak':<38} {size(self.total):>12}"
                    + (" (no memory limit known)" if self.limit is None else f" of {size(self.limit)}"
                       + (" (fits)" if self.fits else " (DOES NOT FIT)")))
        return rows + [f"  {note}" for note in self.notes]


@dataclass
class RunShape:
    """What the budget depends on, besides the modules: the trainer's settings that size a run."""

    loss_type: str
    batch_size: int
    chunk: int
    evaluated: int  # policy-evaluated steps per pair: --loss_timesteps, else N
    guidance: float  # the loss's classifier-free guidance
    optimizer: str  # one of OPTIMIZERS
    lora: bool
    reference_loaded: bool  # a separate reference copy on the card (full fine-tune without a warm cache)
    processes: int = 1
    sharded: bool = False  # FSDP: the policy's weights, gradients and optimiser state split over the processes


@dataclass
class Sizes:
    """The counted sizes a budget adds up (bytes; shapes of float32 trainable parameters)."""

    policy_bytes: int  # the policy's parameters and buffers as they sit on the card
    trainable_shapes: list
    reference_bytes: int  # a separate reference copy: the policy's parameters in the mixed-precision dtype
    frozen_bytes: int  # text encoders and VAE
    activation_per_image: float  # the probe's, at the run's resolution
    lora_policy_bytes: int = 0  # as a LoRA run would hold them: the base in the mixed-precision dtype, the adapters
    lora_shapes: list = field(default_factory=list)  # in float32; the adapters' shapes at the run's rank and targets


def plan(shape, sizes, limit=None):
    """The Budget of a run of `shape` with these `sizes`."""
    policy, trainable = sizes.policy_bytes, sizes.trainable_shapes
    numel = sum(torch.Size(s).numel() for s in trainable)
    split = shape.processes if shape.sharded else 1
    parts = {
        "policy weights": policy // split,
        "gradients (float32)": 4 * numel // split,
        f"optimiser state ({shape.optimizer})": optimizer_state_bytes(trainable, shape.optimizer) // split,
        # DDP reduces gradients through buckets of their own (accelerate's default: not views of the gradients)
        "DDP gradient buckets": 4 * numel if shape.processes > 1 and not shape.sharded else 0,
        "reference copy": sizes.reference_bytes if shape.reference_loaded else 0,
        "text encoders and VAE": sizes.frozen_bytes,
    }
    images = images_per_graph(shape.loss_type, shape.batch_size, shape.chunk, shape.evaluated, shape.guidance)
    parts[f"activations ({images} images in one graph)"] = int(sizes.activation_per_image * images)
    return Budget(parts, limit)


def alternatives(shape, sizes, limit):
    """[(flags, Budget)] for the changes that cut memory and apply to this run (each alone, then LoRA with a warm
    cache and chunk 1), the ones that fit first."""
    from dataclasses import replace

    options = []
    if shape.chunk > 1 and shape.loss_type not in ("diffusion_dpo", "sft"):
        options.append(("--trajectory_chunk_size 1", replace(shape, chunk=1), sizes))
    if shape.reference_loaded:
        options.append(("--inversion_cache_dir (filled first: --fill_inversion_cache)",
                        replace(shape, reference_loaded=False), sizes))
    if shape.optimizer != "adafactor":
        options.append(("--use_adafactor", replace(shape, optimizer="adafactor"), sizes))
    if shape.optimizer == "adamw":
        options.append(("--use_8bit_adam", replace(shape, optimizer="adamw8bit"), sizes))
    if not shape.lora and sizes.lora_shapes:
        lora = replace(sizes, policy_bytes=sizes.lora_policy_bytes, trainable_shapes=sizes.lora_shapes)
        options.append(("--use_lora", replace(shape, lora=True, reference_loaded=False), lora))
        options.append(("--use_lora --inversion_cache_dir --trajectory_chunk_size 1",
                        replace(shape, lora=True, reference_loaded=False, chunk=1), lora))
    if not shape.sharded and not shape.lora:
        for processes in (2, 4, 8):
            options.append((f"FSDP over {processes} GPUs (accelerate config fsdp_version: 2)",
                            replace(shape, sharded=True, processes=processes), sizes))
    budgets = [(flags, plan(run, run_sizes, limit)) for flags, run, run_sizes in options]
    return sorted(budgets, key=lambda item: (not item[1].fits, item[1].total))


def largest_chunk(shape, sizes, limit):
    """The largest chunk K in 1..evaluated whose budget fits `limit` bytes; 1 when none does (the least memory there
    is), every evaluated step when the limit is unknown."""
    from dataclasses import replace

    if limit is None:
        return shape.evaluated
    fitting = [k for k in range(1, shape.evaluated + 1) if plan(replace(shape, chunk=k), sizes, limit).fits]
    return max(fitting, default=1)
