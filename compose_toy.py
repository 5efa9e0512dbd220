"""The compositional toy: two squares in a 32x32 scene, captioned with what is drawn ("a big red square left of a
small blue square"), and a detector that reads the composition back from the pixels by a fixed rule.

Two sizes (big: a side of 12-13 px, small: 7-8 px) and four colours (red, green, blue, yellow), the two squares in
different colours, the first left of or above the second: 96 captions. Sizes, not shapes: the toy's VAE holds a
32x32 image in 4x4 latents, and its samples of 10 px squares, circles and triangles were alike blobs (a first build
drew the colours and the relation of 92% of its samples as captioned, and the shapes of 12%). `split_captions` holds
some captions out from the base model's training (new combinations of words it knows), to measure whether a model
follows captions it never saw.

The detector (`read_scenes`) never looks at the caption: it finds the foreground's connected components, and with
exactly two of them reads each one's colour (the nearest of the four, if near enough), its size (its pixel count
against the geometric mean of the largest small and the smallest big square) and which is left of or above the
other (the larger of the two offsets between their centres). A missing, merged or extra object, or a colour far from
all four, reads as no scene, which follows no caption.
"""

import itertools
import json
from dataclasses import dataclass

import numpy as np
import torch
from PIL import Image, ImageDraw

SIZE = 32
BACKGROUND = (128, 128, 128)
COLOURS = {"red": (220, 40, 40), "green": (40, 170, 40), "blue": (40, 40, 220), "yellow": (230, 210, 40)}
SIZES = {"big": (12, 14), "small": (7, 9)}  # a square's side in pixels: 12-13 and 7-8
RELATIONS = ("left of", "above")
WORDS = ("a", *SIZES, *COLOURS, "square", "left", "of", "above")  # every word of every caption
FOREGROUND_THRESHOLD = 48  # a channel this far (0-255) from the grey background marks a foreground pixel
MIN_PIXELS = 12  # smaller components are specks, not objects
MAX_COLOUR_DISTANCE = 110  # a component's mean colour farther than this (RGB, 0-255) from every colour: unknown
BIG_PIXELS = 96  # more pixels than this: a big square (8 x 8 = 64 and 12 x 12 = 144; their geometric mean 96)


@dataclass(frozen=True)
class Scene:
    """Two squares, (size, colour) each, the first `relation` ("left of" or "above") the second."""

    first: tuple
    second: tuple
    relation: str

    @property
    def caption(self):
        return f"a {' '.join(self.first)} square {self.relation} a {' '.join(self.second)} square"

    @classmethod
    def from_caption(cls, caption):
        words = caption.split()
        if len(words) == 10 and words[4:6] == ["left", "of"]:
            relation, rest = "left of", words[6:]
        elif len(words) == 9 and words[4] == "above":
            relation, rest = "above", words[5:]
        else:
            raise ValueError(f"not a caption of the compositional toy: {caption!r}")
        scene = cls((words[1], words[2]), (rest[1], rest[2]), relation)
        if words[0] != "a" or rest[0] != "a" or words[3] != "square" or rest[3] != "square" or \
                not all(size in SIZES and colour in COLOURS for size, colour in scene.objects):
            raise ValueError(f"not a caption of the compositional toy: {caption!r}")
        return scene

    @property
    def objects(self):
        return (self.first, self.second)


def all_scenes():
    """Every scene of the toy, in a fixed order: distinct colours, any sizes, both relations."""
    return [Scene((z1, c1), (z2, c2), relation)
            for relation in RELATIONS for c1, c2 in itertools.permutations(COLOURS, 2)
            for z1, z2 in itertools.product(SIZES, SIZES)]


def split_captions(heldout=24, seed=0):
    """(trained scenes, held-out scenes): `heldout` scenes drawn at random, every word still in the trained ones."""
    scenes = all_scenes()
    rng = np.random.default_rng(seed)
    while True:
        picked = set(rng.choice(len(scenes), heldout, replace=False).tolist())
        trained = [scene for i, scene in enumerate(scenes) if i not in picked]
        if {word for scene in trained for word in scene.caption.split()} == set(WORDS):
            return trained, [scene for i, scene in enumerate(scenes) if i in picked]


# ---------------------------------------------------------------------------------------------------------------
# Drawing
# ---------------------------------------------------------------------------------------------------------------


def draw_square(draw, fill, left, top, side):
    """A side x side square in RGB `fill` at (left, top)."""
    draw.rectangle((left, top, left + side - 1, top + side - 1), fill=fill)


def render(scene, rng):
    """One 32x32 image of `scene`: for "left of" the first square wholly in the left half and the second in the
    right, for "above" the first in the top half and the second in the bottom, their centres at most 3 px apart
    across (so that the relation is the larger offset); at least 1 px of background between them and the border."""
    image = Image.new("RGB", (SIZE, SIZE), BACKGROUND)
    draw = ImageDraw.Draw(image)
    half = SIZE // 2
    centre = None
    for index, (size, colour) in enumerate(scene.objects):
        side = int(rng.integers(*SIZES[size]))
        along = int(rng.integers(1, half - side)) + (half + 1 if index else 0)  # inside its half, 1 px from the middle
        if centre is None:
            across = int(rng.integers(1, SIZE - side))
            centre = across + side / 2
        else:  # the second square's centre within 3 px of the first's line
            across = min(max(1, round(centre - side / 2) + int(rng.integers(-3, 4))), SIZE - side - 1)
        left, top = (along, across) if scene.relation == "left of" else (across, along)
        draw_square(draw, COLOURS[colour], left, top, side)
    return image


LOSER_KINDS = ("swap colours", "swap positions", "replace object")


def corrupt(scene, kind, rng):
    """The scene with one compositional error: the squares' colours exchanged, their places exchanged, or one
    square replaced by one of a colour not in the scene; always a scene that differs from `scene`."""
    (z1, c1), (z2, c2) = scene.objects
    if kind == "swap colours":
        return Scene((z1, c2), (z2, c1), scene.relation)
    if kind == "swap positions":
        if scene.first == scene.second:
            raise ValueError("no scene has two identical objects")
        return Scene(scene.second, scene.first, scene.relation)
    if kind == "replace object":
        index = int(rng.integers(2))
        size = scene.objects[index][0]
        new = (size, str(rng.choice([c for c in COLOURS if c not in (c1, c2)])))
        return Scene(new, scene.second, scene.relation) if index == 0 else Scene(scene.first, new, scene.relation)
    raise ValueError(f"unknown corruption {kind!r}; choose one of {', '.join(LOSER_KINDS)}")


def loser_kind(scene, rng):
    """A corruption that changes `scene` (swapping the colours of two squares of one size would exchange their
    places, so that one is not drawn for them)."""
    kinds = [kind for kind in LOSER_KINDS if not (kind == "swap colours" and scene.first[0] == scene.second[0])]
    return str(rng.choice(kinds))


# ---------------------------------------------------------------------------------------------------------------
# Reading a scene from pixels
# ---------------------------------------------------------------------------------------------------------------


def foreground(pixels):
    """(B, H, W) bool from (B, 3, H, W) in [-1, 1]: pixels that differ from the grey background."""
    grey = torch.tensor(BACKGROUND, dtype=torch.float32).view(1, 3, 1, 1)
    return ((pixels.float() + 1) * 127.5 - grey).abs().amax(dim=1) > FOREGROUND_THRESHOLD


def component_labels(mask):
    """(B, H, W) int64: each 4-connected component of `mask` labelled by its smallest flat pixel index; background
    pixels hold H * W."""
    height, width = mask.shape[1:]
    none = height * width
    labels = torch.where(mask, torch.arange(none).view(height, width), none)
    while True:  # every foreground pixel takes the smallest label among itself and its foreground neighbours
        padded = torch.nn.functional.pad(labels, (1, 1, 1, 1), value=none)
        neighbours = torch.stack([padded[:, 1:-1, 1:-1], padded[:, :-2, 1:-1], padded[:, 2:, 1:-1],
                                  padded[:, 1:-1, :-2], padded[:, 1:-1, 2:]]).amin(dim=0)
        updated = torch.where(mask, neighbours, none)
        if torch.equal(updated, labels):
            return labels
        labels = updated


def components(pixels, min_pixels=MIN_PIXELS):
    """Per image, its objects: [{"pixels", "colour", "centre" (row, column), "box" (top, left, height, width)}],
    components of at least `min_pixels` pixels, in reading order."""
    labels = component_labels(foreground(pixels))
    values = (pixels.float() + 1) * 127.5
    found = []
    for image, image_labels in zip(values, labels):
        objects = []
        ids, sizes = image_labels[image_labels < image_labels.numel()].unique(return_counts=True)
        for label, size in zip(ids.tolist(), sizes.tolist()):
            if size < min_pixels:
                continue
            rows, columns = (image_labels == label).nonzero(as_tuple=True)
            top, left = int(rows.min()), int(columns.min())
            objects.append({"pixels": size, "colour": image[:, rows, columns].mean(dim=1),
                            "centre": (rows.float().mean().item(), columns.float().mean().item()),
                            "box": (top, left, int(rows.max()) - top + 1, int(columns.max()) - left + 1)})
        found.append(objects)
    return found


def colour_name(rgb):
    names = list(COLOURS)
    distances = torch.stack([(rgb - torch.tensor(COLOURS[name], dtype=torch.float32)).norm() for name in names])
    best = int(distances.argmin())
    return names[best] if distances[best] <= MAX_COLOUR_DISTANCE else None


def size_name(obj):
    return "big" if obj["pixels"] > BIG_PIXELS else "small"


def read_scenes(pixels):
    """The scene each image shows, or None (not exactly two objects, or an object of no known colour)."""
    scenes = []
    for objects in components(pixels):
        colours = [colour_name(obj["colour"]) for obj in objects]
        if len(objects) != 2 or None in colours:
            scenes.append(None)
            continue
        described = [(size_name(obj), colour) for colour, obj in zip(colours, objects)]
        (row_a, column_a), (row_b, column_b) = (obj["centre"] for obj in objects)
        if abs(column_a - column_b) >= abs(row_a - row_b):
            relation, a_first = "left of", column_a < column_b
        else:
            relation, a_first = "above", row_a < row_b
        first, second = described if a_first else described[::-1]
        scenes.append(Scene(first, second, relation))
    return scenes


def follows(pixels, captions):
    """(B,) bool: whether each image shows exactly the scene of its caption."""
    return torch.tensor([read == Scene.from_caption(caption) for read, caption in zip(read_scenes(pixels), captions)])


# ---------------------------------------------------------------------------------------------------------------
# The base models and the preference pairs
# ---------------------------------------------------------------------------------------------------------------

MATCH = 1.0  # the fraction of the base model's training images that show their caption; the rest have one error
GUIDANCE = 3.0  # classifier-free guidance when sampling the toy, as text-to-image models are sampled


def training_set(count, seed, match=MATCH):
    """(images (B, 3, 32, 32) in [-1, 1], captions): trained captions in turn; each image shows its caption's scene
    with probability `match`, else the scene with one compositional error (LOSER_KINDS)."""
    from toy_task import to_tensor

    trained, _ = split_captions()
    rng = np.random.default_rng(seed)
    images, captions = [], []
    for i in range(count):
        scene = trained[i % len(trained)]
        drawn = scene if rng.random() < match else corrupt(scene, loser_kind(scene, rng), rng)
        images.append(render(drawn, rng))
        captions.append(scene.caption)
    return to_tensor(images), captions


def build_model(folder, kind="sdxl", seed=0, vae_steps=300, unet_steps=4000, match=MATCH, count=4096,
                progress=None):
    """The compositional toy's base model ("sdxl": the tiny SDXL-shaped pipeline; "sd3": its rectified flow) at
    `folder`, built once (a complete folder with the same settings is reused): whole-word tokens for the toy's
    words, its VAE and denoiser trained on `training_set`, the text encoders left random and frozen."""
    from tqdm.auto import tqdm

    from tiny_models import build_tiny_sd3, build_tiny_sdxl
    from toy_task import _atomic_folder, train_unet, train_vae

    def build(scratch):
        generator = torch.Generator().manual_seed(seed)
        pipe = {"sdxl": build_tiny_sdxl, "sd3": build_tiny_sd3}[kind](seed=seed, words=WORDS)
        images, captions = training_set(count, seed, match)
        latents = train_vae(pipe.vae, images, vae_steps, generator, progress or tqdm)
        train_unet(pipe, latents, unet_steps, generator, progress or tqdm, captions=captions)
        pipe.save_pretrained(scratch)

    settings = {"task": "compose", "kind": kind, "seed": seed, "vae_steps": vae_steps, "unet_steps": unet_steps,
                "match": match, "count": count}
    return _atomic_folder(folder, build, settings)


def build_pairs(folder, count=504, seed=1):
    """`count` preference pairs over the trained captions in turn: the winner drawn as its caption says, the loser
    the same scene with one compositional error (colours swapped, places swapped, or an object replaced; each
    image its own draw of sizes and places). pairs.jsonl, and pairs_swapped.jsonl with winner and loser exchanged.
    Returns pairs.jsonl."""
    from toy_task import _atomic_folder

    def build(scratch):
        trained, _ = split_captions()
        rng = np.random.default_rng(seed)
        rows, swapped = [], []
        for i in range(count):
            scene = trained[i % len(trained)]
            kind = loser_kind(scene, rng)
            winner, loser = f"{i:05d}_coherent.png", f"{i:05d}_{kind.replace(' ', '_')}.png"
            render(scene, rng).save(scratch / winner)
            render(corrupt(scene, kind, rng), rng).save(scratch / loser)
            rows.append({"caption": scene.caption, "chosen": winner, "rejected": loser})
            swapped.append({"caption": scene.caption, "chosen": loser, "rejected": winner})
        (scratch / "pairs.jsonl").write_text("".join(json.dumps(row) + "\n" for row in rows))
        (scratch / "pairs_swapped.jsonl").write_text("".join(json.dumps(row) + "\n" for row in swapped))

    return _atomic_folder(folder, build, {"task": "compose", "count": count, "seed": seed}) / "pairs.jsonl"


def accuracy(pipe, scenes, per_caption=4, seed=0, steps=20, guidance_scale=GUIDANCE):
    """The fraction of samples that show their caption's scene exactly: `per_caption` samples of each scene's
    caption, fixed seeds (toy_task.sample)."""
    from toy_task import sample

    captions = [scene.caption for scene in scenes for _ in range(per_caption)]
    images = sample(pipe, len(captions), seed=seed, steps=steps, captions=captions, guidance_scale=guidance_scale)
    return follows(images, captions).float().mean().item()
