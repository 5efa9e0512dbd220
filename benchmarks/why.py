"""Why does a form follow the preference or not? Per-timestep decomposition of its score on held-out pairs.

For the runs of the alignment study (benchmarks/alignment.py; colour task, training seed 0, trained for and
against the preference), take each trajectory form's trained UNet and the base (reference) UNet, invert the
held-out pairs with the reference exactly as the trainer does, and split the form's score S = (1/N) sum_i w_i
(E_i(theta) - E_i(ref)) into its winner and loser terms per inversion step i (for the paper and released forms
E_i(ref) = 0: the reference's error at its own inversion points vanishes). The margin is -beta/2 (S_w - S_l).
Also, for every form, the change in denoising error on fresh red and blue squares at three noise levels (what
sampling depends on): did training move the model on the colours, at which noise levels, or only along the
trajectories?

    python benchmarks/why.py --work_dir /tmp/inversion-dpo-alignment   # after the study; about a minute

Writes benchmarks/results/why{,_quick}.md and .json.
"""

import argparse
import json
import sys
from pathlib import Path

import numpy as np
import torch
from PIL import Image

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "benchmarks"))

import startup  # noqa: E402,F401  (before diffusers: quiets two start-up warnings)

import losses  # noqa: E402
import toy_task  # noqa: E402
from alignment import RESULTS, name_of  # noqa: E402
from inversion import (InversionSchedule, forward_noise, invert,  # noqa: E402
                       predict_on_trajectory, training_alphas)

POINT = {"inversion_dpo": "start", "inversion_dpo_official": "start", "inversion_dpo_exact": "end",
         "inversion_dpo_x0": "end"}


def latents_of(pipe, folder, files):
    images = toy_task.to_tensor([Image.open(folder / name).convert("RGB") for name in files])
    return pipe.vae.encode(images).latent_dist.mode() * pipe.vae.config.scaling_factor


@torch.no_grad()
def decompose(base, tuned_unet, spec, manifest):
    """Per step i: mean over pairs of w_i (E_i(theta) - E_i(ref)) for winners and for losers, and the margin."""
    rows = [json.loads(line) for line in manifest.read_text().splitlines()]
    latents = torch.cat([latents_of(base, manifest.parent, [r["chosen"] for r in rows]),
                         latents_of(base, manifest.parent, [r["rejected"] for r in rows])])
    captions = [r["caption"] for r in rows] * 2
    cond, uncond = toy_task.caption_conditioning(base, captions)
    schedule = InversionSchedule.from_scheduler_config(base.scheduler.config, 10)
    trajectory = invert(base.unet, latents, cond, uncond, schedule, 1.0, with_noise_at_end=True)
    loss = spec["loss"]
    target = trajectory.anchored_target() if loss == "inversion_dpo_x0" else trajectory.noise
    policy = predict_on_trajectory(tuned_unet, trajectory, cond, uncond, 1.0, at=POINT[loss])
    errors = losses.squared_error(policy, target, batch_dims=2)
    if POINT[loss] == "end":
        reference = losses.squared_error(trajectory.noise_at_end, target, batch_dims=2)
    else:
        reference = torch.zeros_like(errors)
    weights = losses.timestep_weights(schedule.alphas[1:], spec["weighting"])
    terms = (errors - reference) * weights / schedule.num_steps  # (2B, N): summing over steps gives S
    terms_w, terms_l = terms.chunk(2)
    sign = 1.0 if loss == "inversion_dpo_official" else -1.0
    margin = sign * spec["beta"] / 2 * (terms_w.sum(1) - terms_l.sum(1))
    return {"timesteps": schedule.timesteps.tolist(), "winner": terms_w.mean(0).tolist(),
            "loser": terms_l.mean(0).tolist(), "S_w": terms_w.sum(1).mean().item(), "S_l": terms_l.sum(1).mean().item(),
            "margin": margin.mean().item(), "accuracy": (margin > 0).float().mean().item()}


NOISE_LEVELS = (100, 500, 900)  # training timesteps: little, half and mostly noise


@torch.no_grad()
def value_errors(pipe, reference_unet, images, caption=toy_task.CAPTION, seed=99):
    """Policy minus reference denoising error on fresh images of each value of a property ({value: (B, 3, H, W)}),
    under `caption`, at fixed timesteps: {value: {t: change}} (negative: the policy denoises that value better than
    the base model). Every value is noised with the same noise."""
    out = {}
    alphas = training_alphas(pipe.scheduler.config)
    for value, batch in images.items():
        cond, _ = toy_task.caption_conditioning(pipe, [caption] * len(batch))
        kwargs = cond.unet_kwargs(torch.float32)
        x0 = pipe.vae.encode(batch).latent_dist.mode() * pipe.vae.config.scaling_factor
        noise = torch.randn(x0.shape, generator=torch.Generator().manual_seed(seed))
        out[value] = {}
        for level in NOISE_LEVELS:
            t = torch.full((len(batch),), level)
            noisy = forward_noise(x0, noise, alphas[t])
            errors = [losses.squared_error(unet(noisy, t, **kwargs).sample, noise).mean().item()
                      for unet in (pipe.unet, reference_unet)]
            out[value][level] = errors[0] - errors[1]
    return out


def fresh_images(prop, count=256, seed=99):
    """{value: `count` fresh images of that value} for a toy property (toy_task.PROPERTIES), each value drawn from
    the same seed (same sizes and places)."""
    spec = toy_task.PROPERTIES[prop]
    images = {}
    for value in spec["values"]:
        rng = np.random.default_rng(seed)
        images[value] = toy_task.to_tensor([spec["render"](value, rng) for _ in range(count)])
    return images


def colour_errors(pipe, reference_unet, count=256, seed=99):
    """`value_errors` on fresh red and blue squares ("a square")."""
    return value_errors(pipe, reference_unet, fresh_images("colour", count, seed), seed=seed)


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--work_dir", default="/tmp/inversion-dpo-alignment")
    parser.add_argument("--results_dir", default=str(RESULTS))
    parser.add_argument("--quick", action="store_true",
                        help="read the study's --quick results (the noising errors on 32 fresh squares per colour)")
    args = parser.parse_args()
    suffix = "_quick" if args.quick else ""
    torch.set_num_threads(1 if args.quick else 2)  # the smoke run goes beside other work (the tests): one thread
    work, results = Path(args.work_dir), Path(args.results_dir)
    study = json.loads((results / f"alignment{suffix}.json").read_text())
    base = toy_task.load_pipeline(work / "toy" / "model")
    manifest = work / "toy" / "heldout_colour" / "pairs.jsonl"
    report = {}
    lines = ["Held-out colour pairs (never trained on), colour task, training seed 0, the study's chosen settings. "
             "Per inversion step (tau, noisiest last): mean over pairs of w_i (E_i(theta) - E_i(ref)) / N for the "
             "winners (red) and the losers (blue), x1000; S = their sum over steps; margin = -beta/2 (S_w - S_l) "
             "(released form: +beta/2). Trained for red (\"for\") and for blue (\"against\"). Last columns: policy "
             "minus reference denoising error on fresh red and blue squares noised to t = 100, 500, 900, x1000.", ""]
    for name, row in study["rows"].items():
        spec = row["specs"].get("colour")
        if spec is None:
            continue
        runs = {d: work / "runs" / name_of({**spec, "seed": 0, "direction": d})
                for d in ("for", "against")}
        if not all((r / "unet").is_dir() for r in runs.values()):
            continue
        report[name] = {}
        for direction, run_dir in runs.items():
            pipe = toy_task.load_pipeline(work / "toy" / "model", run_dir)
            entry = {"noising": colour_errors(pipe, base.unet, count=32 if args.quick else 256)}
            if spec["loss"] in POINT:
                entry.update(decompose(base, pipe.unet, spec, manifest))
            report[name][direction] = entry
        lines += [f"**{name}** (beta {spec['beta']}, lr {spec['lr']:g}; colour effect "
                  f"{100 * row['colour']['effect'][0]:+.1f} points)", ""]
        if spec["loss"] in POINT:
            steps = report[name]["for"]["timesteps"]
            lines += ["| run | term | " + " | ".join(f"t={t}" for t in steps) + " | S | margin, acc. |",
                      "|---|---|" + "---|" * len(steps) + "---|---|"]
            for direction, entry in report[name].items():
                for term, key in (("winner (red)", "winner"), ("loser (blue)", "loser")):
                    total = entry["S_w" if key == "winner" else "S_l"]
                    tail = f"{entry['margin']:+.2f}, {entry['accuracy']:.2f}" if key == "winner" else ""
                    lines.append(f"| {direction} | {term} | " + " | ".join(f"{1000 * v:+.2f}" for v in entry[key])
                                 + f" | {1000 * total:+.2f} | {tail} |")
            lines.append("")
        lines += ["| run | " + " | ".join(f"{c} at t={t}" for c in ("red", "blue") for t in NOISE_LEVELS) + " |",
                  "|---|" + "---|" * (2 * len(NOISE_LEVELS))]
        for direction, entry in report[name].items():
            lines.append(f"| {direction} | " + " | ".join(f"{1000 * entry['noising'][c][t]:+.2f}" for c in ("red", "blue")
                                                          for t in NOISE_LEVELS) + " |")
        lines.append("")
    (results / f"why{suffix}.md").write_text("\n".join(lines) + "\n")
    (results / f"why{suffix}.json").write_text(json.dumps(report, indent=1))
    print("\n".join(lines))


if __name__ == "__main__":
    main()
