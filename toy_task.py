"""A toy text-to-image task with a computable preference, for the demo and the alignment benchmark.

Images are 32x32: a grey background with one square, red or blue, at a random place. The toy model is the tiny
SDXL-shaped pipeline of `tiny_models.py` (or with `kind="sd3"` its SD3-shaped rectified flow) with its VAE and UNet
(transformer) trained here, briefly and reproducibly, on that distribution under three captions ("a square",
"a warm square", "a cool square"). Two preference tasks, each with its own base model:

- colour: caption "a square", the red square preferred over the blue one. Its base model saw both colours equally
  often under every caption, so it draws red and blue about equally;
- warmcool: "a warm square" prefers red and "a cool square" prefers blue, in one dataset, so a loss that ignores
  the captions cannot learn it (half the pairs pull each way). Its base model (OUT_DIR/model_warmcool) saw warm
  squares red 90% of the time and cool squares 10% (CAPTION_LEAN): without such a link its UNet ignores the
  captions and no loss, Diffusion-DPO and supervised fine-tuning included, moved it in the study's budget; with a
  70/30 lean it read them weakly (57% preferred colour) and no loss learned the task reliably either.

The preference rate of a model is the fraction of its samples in the preferred colour of their caption. Each pairs
folder holds `pairs.jsonl` and `pairs_swapped.jsonl` (winner and loser exchanged): training on both, everything else
equal, gives the preference effect (METHOD.md section 6). Everything runs on a CPU; nothing is downloaded.

    python toy_task.py build OUT_DIR          # the toy model (OUT_DIR/model) and pairs (OUT_DIR/pairs)
    python toy_task.py build OUT_DIR --task warmcool   # its base model and pairs (OUT_DIR/{model,pairs}_warmcool)
    python toy_task.py build OUT_DIR --kind sd3   # the same task for a rectified-flow (SD3-shaped) toy
    python toy_task.py evaluate OUT_DIR RUN   # preference rate of the base model and of a trained run (--task)
    python toy_task.py build OUT_DIR --task compose [--kind sd3]   # the compositional toy (compose_toy.py):
                                              # OUT_DIR/model_compose (model_compose_sd3), OUT_DIR/pairs_compose
"""

import argparse
import json
import os
import shutil
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image
from tqdm.auto import tqdm

import startup  # noqa: F401  (before diffusers: quiets two start-up warnings)
from models import PromptEncoder, SD3PromptEncoder, model_prediction
from inversion import draw_training_levels, flow_training_sigmas, training_alphas, training_noise
from tiny_models import build_tiny_sd3, build_tiny_sdxl

SIZE = 32
CAPTION = "a square"
TASKS = {"colour": {"a square": "red"}, "warmcool": {"a warm square": "red", "a cool square": "blue"},
         "background": {"a square": "light"}, "count": {"a square": "two"}, "position": {"a square": "left"},
         "size": {"a square": "big"}, "orientation": {"a square": "wide"}}
TRAINING_CAPTIONS = ("a square", "a warm square", "a cool square")
# The warmcool task's toy is trained with its captions leaning to their colour (P(red) per caption; the others 1/2),
# so that its UNet reads them; the colour task's toy draws the colour independently of the caption.
CAPTION_LEAN = {"a warm square": 0.9, "a cool square": 0.1}
COLOURS = {"red": (220, 40, 40), "blue": (40, 40, 220)}
BACKGROUND = (128, 128, 128)
SHADES = {"light": (200, 200, 200), "dark": (64, 64, 64)}  # the background task's two backgrounds
COMPLETE = "complete.json"  # written last into a finished model or dataset folder
MAX_TOKENS = 16  # T5 tokens of the SD3-shaped toy's captions (train_inversion_dpo.py --max_sequence_length 16)


def render(colour, rng):
    """One 32x32 image: a square of side 10-16 px in `colour` at a random place on grey."""
    image = Image.new("RGB", (SIZE, SIZE), BACKGROUND)
    side = int(rng.integers(10, 17))
    top, left = (int(v) for v in rng.integers(0, SIZE - side + 1, size=2))
    image.paste(COLOURS[colour], (left, top, left + side, top + side))
    return image


def render_background(shade, rng):
    """One 32x32 image: a red or blue square of side 10-16 px at a random place on a light or dark background."""
    image = Image.new("RGB", (SIZE, SIZE), SHADES[shade])
    side = int(rng.integers(10, 17))
    top, left = (int(v) for v in rng.integers(0, SIZE - side + 1, size=2))
    image.paste(COLOURS[str(rng.choice(["red", "blue"]))], (left, top, left + side, top + side))
    return image


def render_count(count, rng):
    """One 32x32 image: one or two squares (side 8-11 px, each red or blue) on grey, two at least 3 px apart."""
    image = Image.new("RGB", (SIZE, SIZE), BACKGROUND)
    placed = []
    while len(placed) < {"one": 1, "two": 2}[count]:
        side = int(rng.integers(8, 12))
        top, left = (int(v) for v in rng.integers(0, SIZE - side + 1, size=2))
        box = (left, top, left + side, top + side)
        if all(box[0] >= b[2] + 3 or b[0] >= box[2] + 3 or box[1] >= b[3] + 3 or b[1] >= box[3] + 3 for b in placed):
            placed.append(box)
    for box in placed:
        image.paste(COLOURS[str(rng.choice(["red", "blue"]))], box)
    return image


def render_position(half, rng):
    """One 32x32 image: a red or blue square of side 8-14 px on grey, wholly in the left or the right half."""
    image = Image.new("RGB", (SIZE, SIZE), BACKGROUND)
    side = int(rng.integers(8, 15))
    top = int(rng.integers(0, SIZE - side + 1))
    left = int(rng.integers(0, SIZE // 2 - side + 1)) + (SIZE // 2 if half == "right" else 0)
    image.paste(COLOURS[str(rng.choice(["red", "blue"]))], (left, top, left + side, top + side))
    return image


def render_size(size, rng):
    """One 32x32 image: a red or blue square on grey, big (side 15-18 px) or small (side 6-9 px), at a random place."""
    image = Image.new("RGB", (SIZE, SIZE), BACKGROUND)
    side = int(rng.integers(15, 19) if size == "big" else rng.integers(6, 10))
    top, left = (int(v) for v in rng.integers(0, SIZE - side + 1, size=2))
    image.paste(COLOURS[str(rng.choice(["red", "blue"]))], (left, top, left + side, top + side))
    return image


def render_orientation(orientation, rng):
    """One 32x32 image: a red or blue bar on grey, 14-18 px long and 5-8 px thick, lying (wide) or standing (tall),
    at a random place."""
    image = Image.new("RGB", (SIZE, SIZE), BACKGROUND)
    long, short = int(rng.integers(14, 19)), int(rng.integers(5, 9))
    width, height = (long, short) if orientation == "wide" else (short, long)
    top, left = int(rng.integers(0, SIZE - height + 1)), int(rng.integers(0, SIZE - width + 1))
    image.paste(COLOURS[str(rng.choice(["red", "blue"]))], (left, top, left + width, top + height))
    return image


def foreground_mask(pixels, threshold=48):
    """(B, H, W) bool: pixels that differ from the grey background by more than `threshold` (0-255) in a channel."""
    grey = torch.tensor(BACKGROUND, dtype=torch.float32).view(1, 3, 1, 1)
    return ((pixels.float() + 1) * 127.5 - grey).abs().amax(dim=1) > threshold


def is_big(pixels):
    """Per image (B,): True where the foreground covers more than 135 px, the geometric mean of the largest small
    square's area (9 x 9 = 81 px) and the smallest big one's (15 x 15 = 225 px)."""
    return foreground_mask(pixels).flatten(1).sum(dim=1) > 135


def is_wide(pixels):
    """Per image (B,): True where the foreground spreads more across than down (its columns' variance exceeds its
    rows'); an empty image counts as not."""
    mask = foreground_mask(pixels).float()  # (B, H, W)
    mass = mask.sum(dim=(1, 2)).clamp(min=1)
    index = torch.arange(pixels.shape[-1], dtype=torch.float32)

    def variance(profile):  # profile (B, L): the mask summed over the other axis
        mean = (profile * index).sum(dim=1) / mass
        return (profile * (index - mean[:, None]) ** 2).sum(dim=1) / mass

    return (mask.sum(dim=(1, 2)) > 0) & (variance(mask.sum(dim=1)) > variance(mask.sum(dim=2)))


def to_tensor(images):
    """PIL images -> (B, 3, H, W) float32 in [-1, 1]."""
    return torch.from_numpy(np.stack([np.asarray(im) for im in images])).permute(0, 3, 1, 2).float() / 127.5 - 1


def is_red(pixels):
    """Per image (B,): True where red dominates blue over the whole image, pixels (B, 3, H, W) in [-1, 1]."""
    return (pixels[:, 0] - pixels[:, 2]).mean(dim=(1, 2)) > 0


def has_light_background(pixels):
    """Per image (B,): True where the median pixel (grey level, mean of the channels) is lighter than mid-way
    between the two shades; a square covers at most a quarter of the image, so the median is the background's."""
    grey = (pixels.mean(dim=1).flatten(1) + 1) * 127.5
    return grey.median(dim=1).values > (SHADES["light"][0] + SHADES["dark"][0]) / 2


def object_count(pixels, threshold=48, min_pixels=12):
    """Per image (B,): how many separate objects are drawn, pixels (B, 3, H, W) in [-1, 1]. A pixel is foreground
    where a channel differs from the grey background by more than `threshold` (0-255 units); objects are its
    4-connected components of at least `min_pixels` pixels (smaller specks are not counted)."""
    grey = torch.tensor(BACKGROUND, dtype=torch.float32).view(1, 3, 1, 1)
    foreground = ((pixels.float() + 1) * 127.5 - grey).abs().amax(dim=1) > threshold  # (B, H, W)
    big = foreground[0].numel() + 1
    labels = torch.where(foreground, torch.arange(foreground[0].numel()).view(foreground.shape[1:]) + 0, big)
    labels = labels.expand_as(foreground).clone()
    while True:  # every foreground pixel takes the smallest label among itself and its foreground neighbours
        padded = F.pad(labels, (1, 1, 1, 1), value=big)
        neighbours = torch.stack([padded[:, 1:-1, 1:-1], padded[:, :-2, 1:-1], padded[:, 2:, 1:-1],
                                  padded[:, 1:-1, :-2], padded[:, 1:-1, 2:]]).amin(dim=0)
        updated = torch.where(foreground, neighbours, big)
        if torch.equal(updated, labels):
            break
        labels = updated
    counts = []
    for image in labels:
        _, sizes = image[image < big].unique(return_counts=True)
        counts.append(int((sizes >= min_pixels).sum()))
    return torch.tensor(counts)


def on_the_left(pixels, threshold=48):
    """Per image (B,): True where the foreground (pixels differing from the grey background by more than `threshold`
    in a channel, 0-255 units) has its centre of mass in the left half; an empty image counts as not."""
    grey = torch.tensor(BACKGROUND, dtype=torch.float32).view(1, 3, 1, 1)
    foreground = (((pixels.float() + 1) * 127.5 - grey).abs().amax(dim=1) > threshold).float()  # (B, H, W)
    columns = torch.arange(pixels.shape[-1], dtype=torch.float32) + 0.5
    mass = foreground.sum(dim=(1, 2))
    centre = (foreground.sum(dim=1) * columns).sum(dim=1) / mass.clamp(min=1)
    return (mass > 0) & (centre < pixels.shape[-1] / 2)


# The toy properties: the two values each base model sees equally often, the renderer of one image, and the rule
# that reads from its pixels whether a sample has the preferred value (the first one).
PROPERTIES = {
    "colour": {"values": ("red", "blue"), "render": render, "detect": lambda pixels: is_red(pixels)},
    "background": {"values": ("light", "dark"), "render": render_background, "detect": has_light_background},
    "count": {"values": ("two", "one"), "render": render_count, "detect": lambda pixels: object_count(pixels) >= 2},
    "position": {"values": ("left", "right"), "render": render_position, "detect": on_the_left},
    "size": {"values": ("big", "small"), "render": render_size, "detect": is_big},
    "orientation": {"values": ("wide", "tall"), "render": render_orientation, "detect": is_wide},
}


def task_property(task):
    """The property a task's pairs differ in (warmcool: the colour)."""
    return "colour" if task == "warmcool" else task


def training_images(count, seed, task="colour"):
    """`count` images of `task`'s property, its two values equally often."""
    spec = PROPERTIES[task_property(task)]
    rng = np.random.default_rng(seed)
    values = rng.permutation(list(spec["values"]) * (count // 2))
    return to_tensor([spec["render"](value, rng) for value in values])


def _atomic_folder(final, build, settings=None):
    """Run build(scratch) and move scratch to `final` with a completion marker that records `settings`; a half-built
    folder is never used, and a complete one is reused only if it was built with the same settings."""
    final = Path(final)
    settings = {"size": SIZE, **(settings or {})}
    marker = final / COMPLETE
    if marker.is_file():
        built = json.loads(marker.read_text())
        if {key: built.get(key) for key in settings} == settings:
            return final
        print(f"{final} was built with other settings ({built}); building it again with {settings}")
    scratch = final.with_name(final.name + ".incomplete")
    shutil.rmtree(scratch, ignore_errors=True)
    shutil.rmtree(final, ignore_errors=True)
    scratch.mkdir(parents=True)
    build(scratch)
    (scratch / COMPLETE).write_text(json.dumps(settings))
    os.replace(scratch, final)
    return final


def train_vae(vae, images, steps, generator, progress):
    optimizer = torch.optim.Adam(vae.parameters(), lr=2e-3)
    for _ in progress(range(steps), desc="toy VAE"):
        batch = images[torch.randint(0, len(images), (32,), generator=generator)]
        posterior = vae.encode(batch).latent_dist
        reconstruction = vae.decode(posterior.mean + 0.05 * torch.randn(posterior.mean.shape, generator=generator))
        loss = F.mse_loss(reconstruction.sample, batch) + 1e-6 * posterior.kl().mean()
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    vae.eval().requires_grad_(False)
    with torch.no_grad():
        latents = vae.encode(images).latent_dist.mean
    if vae.config.shift_factor is not None:  # SD3/FLUX-style VAEs: centred, then scaled
        vae.register_to_config(shift_factor=float(latents.mean()))
        latents = latents - vae.config.shift_factor
    vae.register_to_config(scaling_factor=float(1.0 / latents.std()))
    return latents * vae.config.scaling_factor


def is_flow(pipe):
    return getattr(pipe, "transformer", None) is not None


def encode_latents(pipe, images):
    """VAE latents as the pipelines (and the trainer) make them."""
    latents = pipe.vae.encode(images).latent_dist.mean
    return (latents - (pipe.vae.config.shift_factor or 0.0)) * pipe.vae.config.scaling_factor


def caption_conditioning(pipe, captions):
    """The conditioning of `captions` at the toy size, and its unconditional counterpart."""
    if is_flow(pipe):
        encoder = SD3PromptEncoder([pipe.tokenizer, pipe.tokenizer_2, pipe.tokenizer_3],
                                   [pipe.text_encoder, pipe.text_encoder_2, pipe.text_encoder_3], MAX_TOKENS,
                                   pipe.transformer.config.joint_attention_dim)
        cond = encoder.encode(list(captions))
        return cond, encoder.unconditional(cond)
    encoder = PromptEncoder([pipe.tokenizer, pipe.tokenizer_2], [pipe.text_encoder, pipe.text_encoder_2])
    count = len(captions)
    cond = encoder.encode(list(captions), [[SIZE, SIZE]] * count, [[0, 0]] * count, (SIZE, SIZE))
    return cond, encoder.unconditional(cond)


def lean_to_captions(x0, picks, latents, red, generator):
    """`x0` (rows of `latents`) with each row whose caption (index `picks` into TRAINING_CAPTIONS) is in CAPTION_LEAN
    redrawn from `latents`: a red square (`red` per latent) with the caption's probability, else a blue one."""
    x0 = x0.clone()
    for caption, p_red in CAPTION_LEAN.items():
        leaning = (picks == TRAINING_CAPTIONS.index(caption)).nonzero().flatten()
        want_red = torch.rand(len(leaning), generator=generator) < p_red
        for colour_red in (True, False):
            pool, picked = (red == colour_red).nonzero().flatten(), leaning[want_red == colour_red]
            x0[picked] = latents[pool[torch.randint(0, len(pool), (len(picked),), generator=generator)]]
    return x0


def train_unet(pipe, latents, steps, generator, progress, red=None, captions=None):
    """Denoiser training on the toy latents (epsilon prediction for the UNet; for the SD3-shaped flow, velocity
    prediction at its logit-normal training noise levels), each under a caption drawn independently of its colour,
    with 10% unconditional captions (zeros for SDXL, the empty caption for SD3, as their pipelines' guidance).
    With `red` (per latent, True for a red square), a caption of CAPTION_LEAN gets a red square with its
    probability instead. With `captions` (one per latent), each latent is trained under its own caption."""
    names = sorted(set(captions)) if captions is not None else list(TRAINING_CAPTIONS)
    cond, uncond = caption_conditioning(pipe, names)
    choices = [cond.select(slice(k, k + 1)) for k in range(len(names))] + [uncond.select(slice(0, 1))]
    own = torch.tensor([names.index(caption) for caption in captions]) if captions is not None else None
    flow = is_flow(pipe)
    levels = (flow_training_sigmas if flow else training_alphas)(pipe.scheduler.config)
    model = (pipe.transformer if flow else pipe.unet).train()
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3, weight_decay=0.0)
    batch_size = 64
    for step in progress(range(steps), desc="toy denoiser"):
        rows_drawn = torch.randint(0, len(latents), (batch_size,), generator=generator)
        x0 = latents[rows_drawn]
        noise = torch.randn(x0.shape, generator=generator)
        level, timesteps = draw_training_levels(levels, batch_size, flow, generator)
        drop = torch.rand(batch_size, generator=generator) < 0.1
        picks = torch.randint(0, len(names), (batch_size,), generator=generator) if own is None else own[rows_drawn]
        picks[drop] = len(names)
        if red is not None:
            x0 = lean_to_captions(x0, picks, latents, red, generator)
        rows = type(cond).cat([choices[k] for k in picks.tolist()])
        noisy, target = training_noise(x0, noise, level, flow)
        loss = F.mse_loss(model_prediction(model, noisy, timesteps, rows), target)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        for group in optimizer.param_groups:  # cosine decay to 0
            group["lr"] = 1e-3 * 0.5 * (1 + np.cos(np.pi * (step + 1) / steps))
    model.eval().requires_grad_(False)


def build_model(folder, seed=0, vae_steps=200, unet_steps=700, progress=tqdm, kind="sdxl", lean=False,
                prop="colour"):
    """The toy pipeline ("sdxl", or the rectified flow "sd3") in diffusers format at `folder` (built once; a complete
    folder is reused), trained on images of property `prop` (PROPERTIES; its two values equally often). `lean`:
    captions lean to their colour as CAPTION_LEAN says (the warmcool task's toy)."""

    def build(scratch):
        generator = torch.Generator().manual_seed(seed)
        pipe = {"sdxl": build_tiny_sdxl, "sd3": build_tiny_sd3}[kind](seed=seed)
        images = training_images(2048, seed, prop)
        latents = train_vae(pipe.vae, images, vae_steps, generator, progress)
        train_unet(pipe, latents, unet_steps, generator, progress, red=is_red(images) if lean else None)
        pipe.save_pretrained(scratch)

    settings = {"seed": seed, "vae_steps": vae_steps, "unet_steps": unet_steps, "kind": kind,
                "lean": CAPTION_LEAN if lean else False}
    return _atomic_folder(folder, build, settings if prop == "colour" else {**settings, "property": prop})


def model_folder(out_dir, task="colour", name="model"):
    """The base model (`name` "pairs": the pairs) of `task` in a toy folder: OUT_DIR/model for the colour task,
    OUT_DIR/model_TASK for the others (the warmcool task's captions lean, CAPTION_LEAN; the background and count
    tasks' models are trained on their own property)."""
    return Path(out_dir) / (name if task == "colour" else f"{name}_{task}")


def build_task_model(out_dir, task="colour", **kwargs):
    """Build (once) the base model of `task` under `out_dir` (build_model's keyword arguments pass through)."""
    prop = task_property(task)
    return build_model(model_folder(out_dir, task), lean=task == "warmcool", prop=prop, **kwargs)


def task_captions(task, count):
    """The caption of each of `count` pairs or samples of `task`: its captions in turn."""
    if task not in TASKS:
        raise ValueError(f"unknown toy task {task!r}; choose one of {', '.join(TASKS)}")
    captions = list(TASKS[task])
    return [captions[i % len(captions)] for i in range(count)]


def build_pairs(folder, count=512, seed=1, task="colour"):
    """`count` pairs of `task` as PNGs (the property's two values each, e.g. a red and a blue square) and two jsonl
    manifests: pairs.jsonl with the caption's preferred value as winner, pairs_swapped.jsonl with winner and loser
    exchanged. Returns pairs.jsonl."""
    values = PROPERTIES[task_property(task)]["values"]
    render_value = PROPERTIES[task_property(task)]["render"]

    def build(scratch):
        rng = np.random.default_rng(seed)
        rows, swapped = [], []
        for i, caption in enumerate(task_captions(task, count)):
            files = {value: f"{i:05d}_{value}.png" for value in values}
            for value in values:
                render_value(value, rng).save(scratch / files[value])
            preferred = TASKS[task][caption]
            other = next(value for value in values if value != preferred)
            rows.append({"caption": caption, "chosen": files[preferred], "rejected": files[other]})
            swapped.append({"caption": caption, "chosen": files[other], "rejected": files[preferred]})
        (scratch / "pairs.jsonl").write_text("".join(json.dumps(row) + "\n" for row in rows))
        (scratch / "pairs_swapped.jsonl").write_text("".join(json.dumps(row) + "\n" for row in swapped))

    return _atomic_folder(folder, build, {"count": count, "seed": seed, "task": task}) / "pairs.jsonl"


def load_pipeline(model_folder, run_folder=None):
    """The toy pipeline, with the UNet or transformer (or LoRA) of a training run's output folder when given. UNet
    toys sample with DDIM, flow toys with their own Euler scheduler."""
    from diffusers import DDIMScheduler, DiffusionPipeline

    from evaluate import tuned_pipeline

    pipe = DiffusionPipeline.from_pretrained(model_folder)
    if run_folder is not None:
        pipe = tuned_pipeline(pipe, run_folder)
    if not is_flow(pipe):
        pipe.scheduler = DDIMScheduler.from_config(pipe.scheduler.config)
    pipe.set_progress_bar_config(disable=True)
    return pipe


@torch.no_grad()
def sample(pipe, count, seed=0, guidance_scale=1.0, steps=20, batch_size=64, desc=None, captions=None):
    """`count` images (B, 3, 32, 32) in [-1, 1] for `captions` (one each; default all CAPTION); image k always starts
    from the same noise for a given seed."""
    captions = captions or [CAPTION] * count
    images = []
    for start in tqdm(range(0, count, batch_size), desc=desc, disable=desc is None):
        n = min(batch_size, count - start)
        generator = torch.Generator().manual_seed(seed * 1_000_003 + start)
        extra = {"max_sequence_length": MAX_TOKENS} if is_flow(pipe) else {}
        out = pipe(captions[start : start + n], height=SIZE, width=SIZE, num_inference_steps=steps,
                   guidance_scale=guidance_scale, generator=generator, output_type="pt", **extra).images
        images.append(out * 2 - 1)
    return torch.cat(images)


def prefers(images, captions, task):
    """Per image (B,): True where it has the preferred value of its caption under `task` (read from its pixels)."""
    spec = PROPERTIES[task_property(task)]
    wanted_first = torch.tensor([TASKS[task][caption] == spec["values"][0] for caption in captions])
    return spec["detect"](images) == wanted_first


def preference_rate(pipe, count, task="colour", seed=0, steps=20):
    """Fraction of `count` samples (fixed seeds; the task's captions in turn) in their caption's preferred colour."""
    captions = task_captions(task, count)
    return prefers(sample(pipe, count, seed=seed, steps=steps, captions=captions), captions, task).float().mean().item()


@torch.no_grad()
def heldout_denoising_loss(pipe, count=256, seed=12345, task="colour"):
    """Mean denoising error (epsilon; velocity for a flow toy) on fresh images of both values of `task`'s property
    under the three captions, at the model's training noise levels: does the model still fit the data?"""
    images = training_images(count, seed, task)
    latents = encode_latents(pipe, images)
    generator = torch.Generator().manual_seed(seed)
    flow = is_flow(pipe)
    levels = (flow_training_sigmas if flow else training_alphas)(pipe.scheduler.config)
    level, timesteps = draw_training_levels(levels, count, flow, generator)
    noise = torch.randn(latents.shape, generator=generator)
    cond, _ = caption_conditioning(pipe, [TRAINING_CAPTIONS[i % len(TRAINING_CAPTIONS)] for i in range(count)])
    noisy, target = training_noise(latents, noise, level, flow)
    model = pipe.transformer if flow else pipe.unet
    return F.mse_loss(model_prediction(model, noisy, timesteps, cond), target).item()


def image_grid(rows, columns=16):
    """PIL grid: one row of `columns` images per tensor in `rows`."""
    tiles = [((row[:columns] + 1) * 127.5).clamp(0, 255).byte().permute(0, 2, 3, 1).numpy() for row in rows]
    canvas = np.full((len(rows) * (SIZE + 2), columns * (SIZE + 2), 3), 255, dtype=np.uint8)
    for r, row in enumerate(tiles):
        for c, tile in enumerate(row):
            canvas[r * (SIZE + 2) : r * (SIZE + 2) + SIZE, c * (SIZE + 2) : c * (SIZE + 2) + SIZE] = tile
    return Image.fromarray(canvas)


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    commands = parser.add_subparsers(dest="command", required=True)
    build = commands.add_parser("build", help="build the toy model and the preference pairs (once)")
    build.add_argument("out_dir")
    build.add_argument("--task", choices=[*TASKS, "compose"], default="colour",
                       help="which preference the pairs encode (compose: the compositional toy, compose_toy.py)")
    build.add_argument("--kind", choices=["sdxl", "sd3"], default="sdxl", help="UNet toy, or rectified-flow toy")
    build.add_argument("--vae_steps", type=int, default=None,
                       help="training steps of the toy VAE (batch 32; default 200, compose 300)")
    build.add_argument("--unet_steps", type=int, default=None,
                       help="training steps of the toy denoiser (batch 64; default 700, compose 4000)")
    evaluate = commands.add_parser("evaluate", help="preference rate before and after training")
    evaluate.add_argument("out_dir")
    evaluate.add_argument("run_dir")
    evaluate.add_argument("--samples", type=int, default=256)
    evaluate.add_argument("--seed", type=int, default=0)
    evaluate.add_argument("--task", choices=[*TASKS, "compose"], default="colour",
                          help="whose preferred colour is counted (compose: compositional accuracy)")
    evaluate.add_argument("--kind", choices=["sdxl", "sd3"], default="sdxl",
                          help="compose: which toy's base model the run was trained from")
    args = parser.parse_args()
    try:
        run(args)
    except OSError as error:  # a read-only or full output location
        raise SystemExit(f"error: cannot write {error.filename or args.out_dir}: {error.strerror}. "
                         "Free some space, or choose another folder.") from None


def run(args):
    out_dir = Path(args.out_dir)
    if args.task == "compose":
        return run_compose(args, out_dir)
    if args.command == "build":
        model = build_task_model(out_dir, args.task, kind=args.kind, vae_steps=args.vae_steps or 200,
                                 unet_steps=args.unet_steps or 700)
        print(f"toy model: {model}")
        print(f"preference pairs: {build_pairs(model_folder(out_dir, args.task, 'pairs'), task=args.task)}")
        return
    results, rows = {}, []
    for name, run_dir in (("base", None), ("tuned", args.run_dir)):
        pipe = load_pipeline(model_folder(out_dir, args.task), run_dir)
        captions = task_captions(args.task, args.samples)
        images = sample(pipe, args.samples, seed=args.seed, desc=f"sampling {name}", captions=captions)
        results[name] = {"preference_rate": prefers(images, captions, args.task).float().mean().item(),
                         "heldout_denoising_loss": heldout_denoising_loss(pipe)}
        rows.append(images)
    grid_path = Path(args.run_dir) / "before_after.png"
    image_grid(rows).save(grid_path)
    (Path(args.run_dir) / "preference_rate.json").write_text(json.dumps(results, indent=2))
    what = "red squares" if args.task == "colour" else "squares in their caption's preferred colour"
    print(f"preference rate (fraction of {what} in {args.samples} samples, same seeds):")
    print(f"  base  {results['base']['preference_rate']:.1%}   tuned {results['tuned']['preference_rate']:.1%}")
    print(f"held-out denoising loss: base {results['base']['heldout_denoising_loss']:.4f}   "
          f"tuned {results['tuned']['heldout_denoising_loss']:.4f}")
    print(f"before/after grid (top row base, bottom row tuned): {grid_path}")


def run_compose(args, out_dir):
    """The compositional toy: its base model and pairs (build), or the compositional accuracy of the base model and
    of a run on the trained and the held-out captions (evaluate)."""
    import compose_toy

    model = model_folder(out_dir, "compose" if args.kind == "sdxl" else f"compose_{args.kind}")
    if args.command == "build":
        steps = {"vae_steps": args.vae_steps or 300, "unet_steps": args.unet_steps or 4000}
        print(f"toy model: {compose_toy.build_model(model, kind=args.kind, **steps)}")
        print(f"preference pairs: {compose_toy.build_pairs(model_folder(out_dir, 'compose', 'pairs'))}")
        return
    trained, heldout = compose_toy.split_captions()
    splits = {"heldout": heldout, "trained": trained[:: len(trained) // len(heldout)]}  # as many of each
    per_caption = max(1, args.samples // len(heldout))
    results = {}
    for name, run_dir in (("base", None), ("tuned", args.run_dir)):
        pipe = load_pipeline(model, run_dir)
        results[name] = {split: compose_toy.accuracy(pipe, scenes, per_caption, seed=args.seed)
                         for split, scenes in splits.items()}
    (Path(args.run_dir) / "compositional_accuracy.json").write_text(json.dumps(results, indent=2))
    print("compositional accuracy (samples that show exactly their caption's scene):")
    for split in ("trained", "heldout"):
        print(f"  {split:8s} base {results['base'][split]:.1%}   tuned {results['tuned'][split]:.1%}")


if __name__ == "__main__":
    main()
