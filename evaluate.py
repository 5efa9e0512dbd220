#!/usr/bin/env python
"""Base model against a trained one: the same prompts and seeds, scored, with win rates and 95% intervals.

    python evaluate.py --base stabilityai/stable-diffusion-xl-base-1.0 --tuned out/checkpoint-2000 \
        --prompts prompts.txt --out_dir eval/

--tuned is a trainer output_dir or checkpoint-N folder (a full UNet under unet/, a full SD3/FLUX transformer under
transformer/, or a LoRA file), or a hub id of such a model. Images go to out_dir/images/{base,tuned}/ and are
skipped when already there, so an interrupted evaluation resumes. Scores: PickScore, CLIP score and the LAION aesthetic predictor through transformers; HPSv2 and ImageReward
when their packages are installed. Every scorer id can be a local folder, for offline use. The report
(out_dir/report.json and report.md) gives per scorer the mean score of each model and the win rate of tuned over base
(a tie counts one half), each with a bootstrap 95% interval over the prompt-seed pairs, plus a grid of a few prompts.
"""

import argparse
import copy
import json
import logging
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from tqdm.auto import tqdm

import startup  # noqa: F401  (before diffusers: quiets two start-up warnings)

logger = logging.getLogger("evaluate")

PROMPT_SETS = {  # name -> (hub dataset, split, caption column)
    "parti": ("nateraw/parti-prompts", "train", "Prompt"),
    "hpdv2": ("ymhao/HPDv2", "test", "prompt"),
    "pickapic": ("yuvalkirstain/pickapic_v2", "test_unique", "caption"),
}
OPTIONAL_SCORERS = {"hpsv2": "hpsv2", "imagereward": "ImageReward"}  # scorer -> package that provides it


# ----------------------------------------------------------------------------------------------------------------
# Statistics
# ----------------------------------------------------------------------------------------------------------------


def wins(base_scores, tuned_scores):
    """Per pair: 1 where tuned scores higher, 0.5 on a tie, 0 where base scores higher."""
    base_scores, tuned_scores = np.asarray(base_scores, float), np.asarray(tuned_scores, float)
    if base_scores.shape != tuned_scores.shape or base_scores.ndim != 1:
        raise ValueError(f"need one base and one tuned score per pair, got {base_scores.shape} and {tuned_scores.shape}")
    return (tuned_scores > base_scores) + 0.5 * (tuned_scores == base_scores)


def mean_with_interval(values, num_resamples=2000, seed=0):
    """(mean, low, high): the mean and its percentile-bootstrap 95% interval over the values' resamples."""
    values = np.asarray(values, float)
    indices = np.random.default_rng(seed).integers(0, len(values), size=(num_resamples, len(values)))
    resampled = values[indices].mean(axis=1)
    return float(values.mean()), float(np.percentile(resampled, 2.5)), float(np.percentile(resampled, 97.5))


# ----------------------------------------------------------------------------------------------------------------
# Models
# ----------------------------------------------------------------------------------------------------------------


def load_base(model, device, dtype):
    from diffusers import DiffusionPipeline

    pipe = DiffusionPipeline.from_pretrained(model, dtype=dtype).to(device)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def tuned_pipeline(base, tuned):
    """A pipeline sharing the base's text encoders and VAE, with its own denoiser (the UNet of SD1.x/2.x and SDXL,
    the transformer of SD3 and FLUX) carrying the trained weights.

    `tuned`: a folder with unet/ or transformer/ (full fine-tune) or pytorch_lora_weights.safetensors (LoRA), as the
    trainer writes into output_dir and every checkpoint-N/, or a hub id of a diffusers model of the base's class.
    """
    name = "transformer" if getattr(base, "transformer", None) is not None else "unet"
    denoiser = getattr(base, name)
    folder = Path(tuned)
    components = dict(base.components)
    if (folder / "pytorch_lora_weights.safetensors").is_file():
        components[name] = copy.deepcopy(denoiser)
        pipe = type(base)(**components)
        pipe.load_lora_weights(str(folder))
    else:
        trained = type(denoiser).from_pretrained(str(tuned), subfolder=name, dtype=denoiser.dtype)
        components[name] = trained.to(denoiser.device)
        pipe = type(base)(**components)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def _unit(features):
    """Unit-length projected features; transformers 5 returns them as an output's pooler_output."""
    features = features if isinstance(features, torch.Tensor) else features.pooler_output
    return torch.nn.functional.normalize(features.float(), dim=-1)


class ClipScorer:
    """A CLIP-style model scoring (image, prompt) pairs by the cosine of their embeddings times `scale`.

    PickScore: yuvalkirstain/PickScore_v1 with the laion/CLIP-ViT-H-14-laion2B-s32B-b79K processor, scaled by the
    model's own logit scale. CLIP score: an OpenAI CLIP, 100 x max(cosine, 0).
    """

    def __init__(self, model, processor, device, clip_score=False):
        from transformers import AutoProcessor, CLIPModel

        self.model = CLIPModel.from_pretrained(model).to(device).eval()
        self.processor = AutoProcessor.from_pretrained(processor)
        self.device = device
        self.clip_score = clip_score

    @torch.no_grad()
    def embed_images(self, images):
        pixels = self.processor(images=images, return_tensors="pt")["pixel_values"].to(self.device)
        return _unit(self.model.get_image_features(pixel_values=pixels))

    @torch.no_grad()
    def __call__(self, images, prompts):
        text = self.processor(text=prompts, padding=True, truncation=True, return_tensors="pt").to(self.device)
        text_embeds = _unit(self.model.get_text_features(**text))
        cosine = (self.embed_images(images) * text_embeds).sum(-1)
        if self.clip_score:
            return (100 * cosine.clamp(min=0)).cpu().numpy()
        return (self.model.logit_scale.exp() * cosine).cpu().numpy()


class AestheticScorer:
    """The LAION aesthetic predictor: an MLP on normalised CLIP image embeddings (768 -> 1024 -> 128 -> 64 -> 16 -> 1).

    `head` is its weight file (.pth or .safetensors, keys layers.{0,2,4,6,7}.{weight,bias}); `clip` the CLIP whose
    image embeddings it reads (openai/clip-vit-large-patch14 for the published head).
    """

    def __init__(self, head, clip, device):
        self.clip = ClipScorer(clip, clip, device)
        if str(head).endswith(".safetensors"):
            from safetensors.torch import load_file

            state = load_file(head)
        else:
            state = torch.load(head, map_location="cpu", weights_only=True)
        widths = [state["layers.0.weight"].shape[1]] + [state[f"layers.{i}.weight"].shape[0] for i in (0, 2, 4, 6, 7)]
        layers = []
        for index, (width_in, width_out) in enumerate(zip(widths, widths[1:])):
            layers.append(torch.nn.Linear(width_in, width_out))
            if index < 3:
                layers.append(torch.nn.Dropout(0.0))
        self.head = torch.nn.Sequential(*layers)
        self.head.load_state_dict({k.removeprefix("layers."): v for k, v in state.items()})
        self.head.to(device).eval()

    @torch.no_grad()
    def __call__(self, images, prompts):
        return self.head(self.clip.embed_images(images).float()).squeeze(-1).cpu().numpy()


def optional_scorer(name, device):
    """HPSv2 or ImageReward through their own packages; None (and the reason) when the package is missing."""
    try:
        if name == "hpsv2":
            import hpsv2

            return (lambda images, prompts: np.array([hpsv2.score(im, p, hps_version="v2.1")[0]
                                                      for im, p in zip(images, prompts)])), None
        import ImageReward

        model = ImageReward.load("ImageReward-v1.0", device=device)
        return (lambda images, prompts: np.array([model.score(p, im) for im, p in zip(images, prompts)])), None
    except ImportError:
        return None, f"package {OPTIONAL_SCORERS[name]} is not installed (pip install {OPTIONAL_SCORERS[name]})"


# ----------------------------------------------------------------------------------------------------------------
# Prompts, generation, report
# ----------------------------------------------------------------------------------------------------------------


def load_prompts(source, limit=None):
    """Prompts from a .txt (one a line) or .jsonl (key prompt, caption or text) file, or a named hub set."""
    if source in PROMPT_SETS:
        import datasets

        name, split, column = PROMPT_SETS[source]
        prompts = list(datasets.load_dataset(name, split=split)[column])
    else:
        path = Path(source)
        if not path.is_file():
            raise SystemExit(f"--prompts {source}: no such file, and not one of {', '.join(PROMPT_SETS)}")
        if path.suffix == ".jsonl":
            rows = [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
            prompts = [next(row[k] for k in ("prompt", "caption", "text") if k in row) for row in rows]
        else:
            prompts = [line.strip() for line in path.read_text().splitlines() if line.strip()]
    return prompts[:limit] if limit else prompts


def generate(pipe, jobs, folder, args, desc):
    """Generate every (index, prompt, seed) job whose PNG is not in `folder` yet; returns how many were made."""
    folder.mkdir(parents=True, exist_ok=True)
    todo = [job for job in jobs if not (folder / image_name(job)).is_file()]
    for start in tqdm(range(0, len(todo), args.batch_size), desc=desc):
        batch = todo[start : start + args.batch_size]
        generators = [torch.Generator(device=pipe.device).manual_seed(seed) for _, _, seed in batch]
        images = pipe([prompt for _, prompt, _ in batch], generator=generators, num_inference_steps=args.steps,
                      guidance_scale=args.guidance_scale, height=args.resolution, width=args.resolution).images
        for job, image in zip(batch, images):
            image.save(folder / image_name(job))
    return len(todo)


def image_name(job):
    index, _, seed = job
    return f"{index:05d}_seed{seed}.png"


def scorers_from_args(args, device):
    scorers, skipped = {}, {}
    for name in args.scorers:
        if name == "pickscore":
            scorers[name] = ClipScorer(args.pickscore_model, args.pickscore_processor, device)
        elif name == "clip":
            scorers[name] = ClipScorer(args.clip_model, args.clip_model, device, clip_score=True)
        elif name == "aesthetic" and args.aesthetic_head is None:
            skipped[name] = ("needs --aesthetic_head, the weight file of the LAION aesthetic MLP "
                             "(sac+logos+ava1-l14-linearMSE)")
            logger.warning("scorer aesthetic skipped: %s", skipped[name])
        elif name == "aesthetic":
            scorers[name] = AestheticScorer(args.aesthetic_head, args.aesthetic_clip_model, device)
        else:
            scorer, reason = optional_scorer(name, device)
            if scorer is None:
                logger.warning("scorer %s skipped: %s", name, reason)
                skipped[name] = reason
            else:
                scorers[name] = scorer
    return scorers, skipped


def report(jobs, out_dir, scorers, skipped, args):
    results = {"pairs": len(jobs), "scorers": {}, "skipped_scorers": skipped}
    for name, scorer in scorers.items():
        scores = {}
        for model in ("base", "tuned"):
            values = []
            for start in range(0, len(jobs), args.batch_size):
                batch = jobs[start : start + args.batch_size]
                images = [Image.open(out_dir / "images" / model / image_name(job)).convert("RGB") for job in batch]
                values.append(scorer(images, [prompt for _, prompt, _ in batch]))
            scores[model] = np.concatenate(values)
        entry = {f"{model}_mean": mean_with_interval(scores[model], args.bootstrap, args.seed) for model in scores}
        entry["win_rate"] = mean_with_interval(wins(scores["base"], scores["tuned"]), args.bootstrap, args.seed)
        results["scorers"][name] = entry
    lines = [f"{len(jobs)} prompt-seed pairs; mean [95% bootstrap interval].", "",
             "| scorer | base | tuned | win rate of tuned |", "|---|---|---|---|"]
    fmt = lambda v: f"{v[0]:.4g} [{v[1]:.4g}, {v[2]:.4g}]"  # noqa: E731
    for name, entry in results["scorers"].items():
        lines.append(f"| {name} | {fmt(entry['base_mean'])} | {fmt(entry['tuned_mean'])} | {fmt(entry['win_rate'])} |")
    lines += [f"| {name} | skipped: {reason} | | |" for name, reason in skipped.items()]
    (out_dir / "report.json").write_text(json.dumps(results, indent=2))
    (out_dir / "report.md").write_text("\n".join(lines) + "\n")
    return results, lines


def save_grid(jobs, out_dir, count):
    """First `count` jobs: base on the top row, tuned below."""
    from diffusers.utils import make_image_grid

    shown = jobs[:count]
    images = [Image.open(out_dir / "images" / model / image_name(job)) for model in ("base", "tuned") for job in shown]
    make_image_grid(images, rows=2, cols=len(shown)).save(out_dir / "grid.png")


def parse_args(input_args=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--base", required=True, help="Base pipeline: hub id or local folder.")
    parser.add_argument("--tuned", required=True, help="Trainer output_dir, checkpoint-N folder, or hub id of a UNet.")
    parser.add_argument("--prompts", required=True,
                        help=f"A .txt or .jsonl file, or a hub prompt set: {', '.join(PROMPT_SETS)}.")
    parser.add_argument("--max_prompts", type=int, default=None)
    parser.add_argument("--seeds", type=int, nargs="+", default=[0])
    parser.add_argument("--out_dir", default="evaluation")
    parser.add_argument("--steps", type=int, default=25)
    parser.add_argument("--guidance_scale", type=float, default=5.0)
    parser.add_argument("--resolution", type=int, default=1024)
    parser.add_argument("--batch_size", type=int, default=4)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--dtype", default="float16" if torch.cuda.is_available() else "float32",
                        choices=["float32", "float16", "bfloat16"])
    parser.add_argument("--scorers", nargs="+", default=["pickscore", "clip", "aesthetic", "hpsv2", "imagereward"],
                        choices=["pickscore", "clip", "aesthetic", *OPTIONAL_SCORERS])
    parser.add_argument("--pickscore_model", default="yuvalkirstain/PickScore_v1")
    parser.add_argument("--pickscore_processor", default="laion/CLIP-ViT-H-14-laion2B-s32B-b79K")
    parser.add_argument("--clip_model", default="openai/clip-vit-large-patch14")
    parser.add_argument("--aesthetic_head", default=None,
                        help="Weight file of the LAION aesthetic MLP (sac+logos+ava1-l14-linearMSE); without it "
                             "the aesthetic scorer is skipped and reported.")
    parser.add_argument("--aesthetic_clip_model", default="openai/clip-vit-large-patch14")
    parser.add_argument("--bootstrap", type=int, default=2000, help="Bootstrap resamples for the intervals.")
    parser.add_argument("--grid_images", type=int, default=8,
                        help="Prompt-seed pairs shown in grid.png (base above, tuned below).")
    parser.add_argument("--seed", type=int, default=0, help="Seed of the bootstrap.")
    return parser.parse_args(input_args)


def main(args):
    logging.basicConfig(format="%(levelname)s %(name)s: %(message)s", level=logging.INFO)
    out_dir = Path(args.out_dir)
    prompts = load_prompts(args.prompts, args.max_prompts)
    jobs = [(index, prompt, seed) for index, prompt in enumerate(prompts) for seed in args.seeds]
    dtype = getattr(torch, args.dtype)
    base = load_base(args.base, args.device, dtype)
    made = generate(base, jobs, out_dir / "images" / "base", args, "base")
    made += generate(tuned_pipeline(base, args.tuned), jobs, out_dir / "images" / "tuned", args, "tuned")
    logger.info("%d images generated, %d already there", made, 2 * len(jobs) - made)
    scorers, skipped = scorers_from_args(args, args.device)
    _, lines = report(jobs, out_dir, scorers, skipped, args)
    save_grid(jobs, out_dir, args.grid_images)
    print("\n".join(lines))
    print(f"report: {out_dir / 'report.md'}, {out_dir / 'report.json'}; grid: {out_dir / 'grid.png'}")


if __name__ == "__main__":
    main(parse_args())
