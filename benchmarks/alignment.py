"""Does each loss form make the toy model prefer what is preferred? The preference effect (METHOD.md section 6).

Every configuration is trained twice with train_inversion_dpo.py, everything else equal (seeds included): once on
the pairs ("for") and once with winner and loser swapped ("against"). The preference effect is the rate of the
preferred attribute after training for it minus after training against it, so whatever moves the model regardless
of the preference (weight decay, rounding, drift after saturation) cancels. Two toy tasks (toy_task.py): "colour"
(red preferred for "a square") and "warmcool" (red for "a warm square", blue for "a cool square", in one dataset).

1. Grid (each task, training seed 0): each form and weighting gets its own beta and learning rate per task, chosen
   by the effect on validation sampling seeds (ties within 2 points: the lower held-out denoising loss); a best value
   on the grid's edge extends the grid one step further that way, up to twice per axis and side.
2. Report: the chosen settings on their task, training seeds 0, 1, 2, effect measured on other sampling seeds
   along training (against optimiser steps and training seconds), mean and 95% t-interval over seeds.
3. Factors: for the paper form, what breaks the policy/reference symmetry (weight decay, bf16 autocast, nothing);
   the released-sign form at the paper form's settings (its runs are the paper form's, mirrored); the anchored form
   at fewer loss timesteps per pair (--loss_timesteps), for cost.

Trajectory forms train from a warm float32 trajectory cache (filled once per task beforehand, its time reported
apart). No pair repeats within a run's budget (steps x batch < pairs); held-out pairs give an implicit accuracy (the
Diffusion-DPO reward, policy minus reference denoising error at shared random noisings, on pairs never trained on).

    python benchmarks/alignment.py             # the whole study, hours on 2 CPU cores; resumable: finished runs are
                                               # reused, so rerunning after an interruption continues
    python benchmarks/alignment.py --quick     # smoke run of every stage: rough toy model, 1 seed, a few minutes

Writes benchmarks/results/alignment{,_quick}.md (tables), .png (effect against steps and seconds) and .json (every
run's one-sided rates, metrics and measures).
"""

import argparse
import contextlib
import io
import itertools
import json
import os
import shutil
import subprocess
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import startup  # noqa: E402,F401  (before diffusers: quiets two start-up warnings)

RESULTS = ROOT / "benchmarks" / "results"
TASKS = ("colour", "warmcool")
TRAJECTORY_FORMS = ("inversion_dpo", "inversion_dpo_exact", "inversion_dpo_x0")
# the configurations tuned on the grid: (loss, weighting)
CONFIGS = [(form, weighting) for form in TRAJECTORY_FORMS for weighting in ("official", "uniform")]
CONFIGS += [("diffusion_dpo", "-"), ("sft", "-")]
# the configurations on the warmcool task too (to fit the study into 2 cores; the others on the colour task only)
BOTH_TASKS = [("inversion_dpo", "official"), ("inversion_dpo_x0", "official"), ("diffusion_dpo", "-"), ("sft", "-")]
T_975 = {1: 12.706, 2: 4.303, 3: 3.182, 4: 2.776, 5: 2.571, 6: 2.447, 7: 2.365, 8: 2.306, 9: 2.262}
VALIDATION_SEED, REPORT_SEED = 1, 0  # sampling seeds
# The symmetry breakers of the paper form (its gradient is exactly 0 while the policy equals the reference):
# weight_decay (its default here), bf16 autocast, none, a random start (perturb), a LoRA adapter with a random B (lora)
BREAKERS = ("bf16", "none", "perturb", "lora")
MAX_EXTENSIONS = 2  # a best value on a grid's edge extends it that way, at most this many times per axis and side
PERTURBATION = 1e-3  # --init_perturbation: noise std relative to each weight's RMS (absolute for LoRA's zero B)


class Study:
    def __init__(self, quick, work):
        self.quick = quick
        self.work = work
        self.toy = work / "toy"
        self.tasks = TASKS
        if quick:  # every stage once, on the colour task, in a couple of minutes
            self.tasks = ("colour",)
            self.steps, self.every, self.curve = 2, 1, [1, 2]
            self.pairs, self.heldout_pairs, self.samples, self.curve_samples = 16, 8, 16, 16
            self.seeds = [0]
            self.betas = {"trajectory": [50], "diffusion_dpo": [500], "sft": [None]}
            self.lrs = [1e-4]
        else:
            self.steps, self.every, self.curve = 40, 5, [5, 10, 20, 30, 40]
            self.pairs, self.heldout_pairs, self.samples, self.curve_samples = 512, 64, 256, 128
            self.seeds = [0, 1, 2]
            self.betas = {"trajectory": [5, 50, 500], "diffusion_dpo": [50, 500, 5000], "sft": [None]}
            self.lrs = [1e-5, 1e-4]
        self.batch = 8
        assert self.steps * self.batch <= self.pairs, "a pair would repeat within the budget"

    # -- setup ------------------------------------------------------------------------------------------------
    def setup(self):
        import toy_task

        build = dict(vae_steps=20, unet_steps=60) if self.quick else {}
        for task in self.tasks:  # each task its own base model (toy_task.model_folder)
            toy_task.build_task_model(self.toy, task, progress=lambda it, desc=None: it, **build)
        for task in TASKS:
            toy_task.build_pairs(self.toy / f"pairs_{task}", count=self.pairs, seed=1, task=task)
            toy_task.build_pairs(self.toy / f"heldout_{task}", count=self.heldout_pairs, seed=2, task=task)
        self.fill_seconds = {task: self.fill_cache(task) for task in self.tasks}

    def model(self, task):
        import toy_task

        return toy_task.model_folder(self.toy, task)

    def cache_dir(self, task):
        return self.work / f"cache_{task}"

    def fill_cache(self, task):
        marker = self.cache_dir(task) / "filled.json"
        if not marker.is_file():
            started = time.perf_counter()
            self.trainer(["--dataset_name", str(self.toy / f"pairs_{task}" / "pairs.jsonl"), "--loss_type",
                          "inversion_dpo_x0", "--inversion_cache_dir", str(self.cache_dir(task)),
                          "--inversion_cache_dtype", "float32", "--fill_inversion_cache",
                          "--output_dir", str(self.work / f"fill_{task}")], task, threads=None, cold=not self.quick)
            marker.write_text(json.dumps({"seconds": time.perf_counter() - started}))
        return json.loads(marker.read_text())["seconds"]

    # -- one run ----------------------------------------------------------------------------------------------
    def trainer(self, flags, task, threads=1, cold=False):
        run_trainer(self.model(task), ["--train_batch_size", str(self.batch), *flags], threads, cold)

    def run(self, spec):
        """Train one run (unless finished before) and measure it; returns its record."""
        run_dir = self.work / "runs" / name_of(spec)
        record_path = run_dir / "record.json"
        record = json.loads(record_path.read_text()) if record_path.is_file() else None
        if record is None:
            if not ((run_dir / "unet").is_dir() or (run_dir / "pytorch_lora_weights.safetensors").is_file()):
                shutil.rmtree(run_dir, ignore_errors=True)
                self.train(spec, run_dir)
            metrics = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
            record = {"spec": spec, "metrics": {str(m["step"]): m for m in metrics}, "measures": {}}
            record_path.write_text(json.dumps(record))
        wanted = self.wanted_measures(spec)
        missing = [m for m in wanted if m not in record["measures"]]
        if missing and self.quick:
            record["measures"].update(measured_here(measure, str(run_dir), missing, self.work))
            record_path.write_text(json.dumps(record))
        elif missing:
            env = {**os.environ, "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false", "OMP_NUM_THREADS": "1",
                   "MKL_NUM_THREADS": "1"}
            result = subprocess.run([sys.executable, __file__, "--measure", str(run_dir), "--work_dir",
                                     str(self.work), *(["--quick"] if self.quick else []), *missing],
                                    cwd=ROOT, capture_output=True, text=True, env=env)
            if result.returncode != 0:
                raise RuntimeError(f"measuring {run_dir} failed:\n{result.stderr[-3000:]}")
            record["measures"].update(json.loads(result.stdout.strip().splitlines()[-1]))
            record_path.write_text(json.dumps(record))
        return record

    def train(self, spec, run_dir):
        manifest = "pairs.jsonl" if spec["direction"] == "for" else "pairs_swapped.jsonl"
        flags = ["--dataset_name", str(self.toy / f"pairs_{spec['task']}" / manifest), "--output_dir", str(run_dir),
                 "--loss_type", spec["loss"], "--learning_rate", str(spec["lr"]), "--seed", str(spec["seed"]),
                 "--max_train_steps", str(self.steps), "--checkpointing_steps", str(self.every)]
        if spec["beta"] is not None:
            flags += ["--beta_dpo", str(spec["beta"])]
        if spec.get("relative_beta"):  # the beta rule's kappa (the trainer's default when unset)
            flags += ["--relative_beta", str(spec["relative_beta"])]
        if spec.get("anchor_points", "inversion") != "inversion":  # points computed every step, so no cache
            flags += ["--timestep_weighting", spec["weighting"], "--anchor_points", spec["anchor_points"]]
        elif spec["loss"] in TRAJECTORY_FORMS + ("inversion_dpo_official",):
            flags += ["--timestep_weighting", spec["weighting"], "--inversion_cache_dir",
                      str(self.cache_dir(spec["task"])), "--inversion_cache_dtype", "float32"]
        if spec.get("loss_timesteps"):  # the study's one-step runs drew uniformly (the default draw since: stratified)
            flags += ["--loss_timesteps", str(spec["loss_timesteps"]), "--loss_timestep_sampling",
                      spec.get("sampling", "uniform")]
        breaker = spec.get("breaker", "weight_decay")
        flags += ["--adam_weight_decay", "1e-2" if breaker == "weight_decay" else "0",
                  "--mixed_precision", "bf16" if breaker == "bf16" else "no"]
        if breaker in ("perturb", "lora"):  # a small random start away from the reference (LoRA: a random B)
            flags += ["--init_perturbation", str(PERTURBATION)] + (["--use_lora"] if breaker == "lora" else [])
        self.trainer(flags, spec["task"])

    def wanted_measures(self, spec):
        """Measure keys: 'rate:STEP:SEED:COUNT', and 'final' (held-out loss and implicit accuracy)."""
        keys = [f"rate:{self.steps}:{VALIDATION_SEED}:{self.samples}", f"rate:{self.steps}:{REPORT_SEED}:{self.samples}",
                "final"]
        if spec.get("curve"):
            keys += [f"rate:{step}:{REPORT_SEED}:{self.curve_samples}" for step in self.curve[:-1]]
        return keys

    def run_all(self, specs, workers):
        """Every spec (each with its 'for' and 'against' run), `workers` at a time; records keyed by run name."""
        runs = [{**spec, "direction": d} for spec in specs for d in ("for", "against")]
        todo = {name_of(r): r for r in runs}
        with ThreadPoolExecutor(workers) as pool:
            records = dict(zip(todo, pool.map(self.run, todo.values())))
        return records


def run_trainer(model, flags, threads=1, cold=False):
    """train_inversion_dpo.py on a toy `model` with the studies' fixed settings (32 px, N = 10, guidance 1, all steps
    in one call, constant learning rate), `threads` CPU threads (None: the default). A run is forked from a process
    that imported the libraries once (forked_runs.py: the same run, about 9 s less start-up on 2 cores); `cold`: a
    fresh `python train_inversion_dpo.py`, for runs whose seconds count their start-up (the studies' cache fills; a
    smoke run's seconds mean nothing, so its fills are forked too)."""
    command = [str(ROOT / "train_inversion_dpo.py"),
               "--pretrained_model_name_or_path", str(model), "--resolution", "32", "--no_hflip",
               "--num_inference_steps", "10", "--inversion_guidance_scale", "1", "--trajectory_chunk_size", "10",
               "--lr_scheduler", "constant", "--report_to", "none", *flags]
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false"}
    if threads:
        env.update(OMP_NUM_THREADS=str(threads), MKL_NUM_THREADS=str(threads))
    else:  # every core: none of a caller's limits
        for name in ("OMP_NUM_THREADS", "MKL_NUM_THREADS"):
            env.pop(name, None)
    if cold:
        result = subprocess.run([sys.executable, *command], cwd=ROOT, capture_output=True, text=True, env=env)
    else:  # one server per thread count: OpenMP reads its count when torch is imported
        import forked_runs

        result = forked_runs.shared(threads, env, cwd=ROOT).run(command)
    if result.returncode != 0:
        raise RuntimeError(f"training failed: {' '.join(result.args)}\n{result.stderr[-3000:]}")


def name_of(spec):
    parts = [spec["task"], spec["loss"], spec.get("weighting", "-"), f"b{spec['beta']}", f"lr{spec['lr']:g}",
             f"T{spec.get('loss_timesteps') or 'all'}", spec.get("breaker", "weight_decay"), f"s{spec['seed']}",
             spec["direction"]]
    if spec.get("sampling"):  # the draw of --loss_timesteps (studies before it was a setting drew uniformly)
        parts.insert(-3, spec["sampling"])
    if spec.get("anchor_points", "inversion") != "inversion":
        parts.insert(-3, spec["anchor_points"])
    if spec.get("relative_beta"):
        parts.insert(-3, f"k{spec['relative_beta']:g}")
    return "-".join(str(p) for p in parts)


def effect_of(records, spec, key):
    """(rate trained for) - (rate trained against) of `spec` under measure `key`."""
    rate = {d: records[name_of({**spec, "direction": d})]["measures"][key]["rate"] for d in ("for", "against")}
    return rate["for"] - rate["against"]


def interval(values):
    values = np.asarray(values, dtype=float)
    if len(values) < 2:
        return float(values.mean()), float("nan")
    return float(values.mean()), float(T_975[len(values) - 1] * values.std(ddof=1) / np.sqrt(len(values)))


# ---------------------------------------------------------------------------------------------------------------
# Measuring a run (a subprocess of its own, one thread; in a quick run, in the study's own process)
# ---------------------------------------------------------------------------------------------------------------

_MEASURING = threading.Lock()


def measured_here(function, *args):
    """A smoke run's measures in this process, one run at a time (the study's runs go `workers` at a time in
    threads): `function` prints one JSON line, which is returned parsed. A subprocess per run costs an interpreter
    start and the imports (about 5 CPU seconds each), more than measuring a quick run's few samples; the study
    measures each run in a one-thread subprocess of its own."""
    printed = io.StringIO()
    with _MEASURING, contextlib.redirect_stdout(printed):
        function(*args)
    return json.loads(printed.getvalue().strip().splitlines()[-1])



def measure(run_dir, keys, work):
    import torch

    import toy_task

    torch.set_num_threads(1)
    spec = json.loads((Path(run_dir) / "record.json").read_text())["spec"]
    toy = Path(work) / "toy"
    model = toy_task.model_folder(toy, spec["task"])
    base = toy_task.load_pipeline(model)
    out = {}
    for key in keys:
        if key == "final":
            pipe = toy_task.load_pipeline(model, run_dir)
            manifest = "pairs.jsonl" if spec["direction"] == "for" else "pairs_swapped.jsonl"
            out[key] = {"heldout_loss": toy_task.heldout_denoising_loss(pipe, task=spec["task"]),
                        "heldout_implicit_accuracy": implicit_accuracy(
                            pipe, base.unet, toy / f"heldout_{spec['task']}" / manifest)}
            continue
        _, step, seed, count = key.split(":")
        folder = Path(run_dir) if int(step) == max_step(run_dir) else Path(run_dir) / f"checkpoint-{step}"
        pipe = toy_task.load_pipeline(model, folder)
        out[key] = {"rate": toy_task.preference_rate(pipe, int(count), spec["task"], seed=int(seed))}
    print(json.dumps(out))


def max_step(run_dir):
    return max(json.loads(line)["step"] for line in (Path(run_dir) / "metrics.jsonl").read_text().splitlines())


def implicit_accuracy(pipe, reference_unet, manifest, draws=8, seed=4321):
    """Fraction of the manifest's pairs whose winner gets the higher Diffusion-DPO implicit reward: minus (policy
    minus reference denoising error), averaged over `draws` random (timestep, noise), shared by winner and loser."""
    import torch
    from PIL import Image

    import toy_task
    from inversion import forward_noise, training_alphas

    rows = [json.loads(line) for line in Path(manifest).read_text().splitlines()]
    folder = Path(manifest).parent
    with torch.no_grad():
        def latents(column):
            images = toy_task.to_tensor([Image.open(folder / row[column]).convert("RGB") for row in rows])
            return pipe.vae.encode(images).latent_dist.mode() * pipe.vae.config.scaling_factor

        winners, losers = latents("chosen"), latents("rejected")
        cond, _ = toy_task.caption_conditioning(pipe, [row["caption"] for row in rows])
        kwargs = cond.unet_kwargs(torch.float32)
        alphas = training_alphas(pipe.scheduler.config)
        generator = torch.Generator().manual_seed(seed)
        reward = torch.zeros(2, len(rows))
        for _ in range(draws):
            t = torch.randint(0, len(alphas), (len(rows),), generator=generator)
            noise = torch.randn(winners.shape, generator=generator)
            for index, x0 in enumerate((winners, losers)):
                noisy = forward_noise(x0, noise, alphas[t])
                errors = [((unet(noisy, t, **kwargs).sample - noise) ** 2).mean(dim=(1, 2, 3))
                          for unet in (pipe.unet, reference_unet)]
                reward[index] -= errors[0] - errors[1]
    return (reward[0] > reward[1]).float().mean().item()


# ---------------------------------------------------------------------------------------------------------------
# The study
# ---------------------------------------------------------------------------------------------------------------


def grid_specs(study, loss, weighting, betas, lrs, task):
    return [{"task": task, "loss": loss, "weighting": weighting, "beta": beta, "lr": lr, "seed": 0}
            for beta, lr in itertools.product(betas, lrs)]


def choose(study, records, loss, weighting, workers, log, lrs=None, task="colour"):
    """The (beta, lr) of the best validation effect on `task`, extending the grid past an edge while the best value
    is on it (at most MAX_EXTENSIONS times per axis and side). `lrs`: the learning rates to try (default the
    study's)."""
    kind = "trajectory" if loss in TRAJECTORY_FORMS else loss
    betas, lrs = list(study.betas[kind]), list(lrs or study.lrs)
    key = f"rate:{study.steps}:{VALIDATION_SEED}:{study.samples}"
    extended = {}  # (axis, side) -> how many times the grid grew that way
    while True:
        specs = grid_specs(study, loss, weighting, betas, lrs, task)
        records.update(study.run_all(specs, workers))
        scored = []
        for spec in specs:
            finals = [records[name_of({**spec, "direction": d})]["measures"]["final"]["heldout_loss"]
                      for d in ("for", "against")]
            scored.append((effect_of(records, spec, key), float(np.mean(finals)), spec))
        top = max(s[0] for s in scored)
        best = min((s for s in scored if s[0] >= top - 0.02), key=lambda s: s[1])[2]
        edges = []
        if len(betas) > 1 and best["beta"] in (betas[0], betas[-1]):
            edges.append(("beta", "low" if best["beta"] == betas[0] else "high"))
        if len(lrs) > 1 and best["lr"] in (lrs[0], lrs[-1]):
            edges.append(("lr", "low" if best["lr"] == lrs[0] else "high"))
        grow = next((edge for edge in edges if extended.get(edge, 0) < MAX_EXTENSIONS), None)
        if grow is None:
            note = f"; on the {', '.join(f'{side} edge of {axis}' for axis, side in edges)} after extending " \
                   f"{MAX_EXTENSIONS} times" if edges else ""
            log(f"  chosen for {loss} ({weighting}) on {task}: beta {best['beta']}, lr {best['lr']:g} "
                f"(validation effect {effect_of(records, best, key):+.1%}; grid betas {betas}, lrs {lrs}{note})")
            return best, {"betas": betas, "lrs": lrs, "edges": edges,
                          "scores": [(s[0], s[1], s[2]) for s in scored]}
        extended[grow] = extended.get(grow, 0) + 1
        axis, side = grow
        values = betas if axis == "beta" else lrs
        values[:] = [values[0] / 10] + values if side == "low" else values + [values[-1] * 10]
        log(f"  {loss} ({weighting}) on {task}: best on the {side} edge of {axis}: extending the grid")


def summarise_config(study, records, per_task):
    """Per task (`per_task`: task -> its spec): final effect (mean, half-width), its per-seed values, curves of effect
    against steps and seconds, held-out loss, implicit accuracy, one-sided rates and saturation."""
    out = {"specs": per_task}
    final_key = f"rate:{study.steps}:{REPORT_SEED}:{study.samples}"
    for task, spec in per_task.items():
        specs = [{**spec, "seed": seed} for seed in study.seeds]
        effects = [effect_of(records, s, final_key) for s in specs]
        runs = {d: [records[name_of({**s, "direction": d})] for s in specs] for d in ("for", "against")}
        curve = []
        for step in study.curve if spec.get("curve") else [study.steps]:
            key = final_key if step == study.steps else f"rate:{step}:{REPORT_SEED}:{study.curve_samples}"
            values = [effect_of(records, s, key) for s in specs]
            seconds = [r["metrics"][str(step)]["elapsed_s"] for d in runs for r in runs[d]]
            curve.append({"step": step, "seconds": float(np.mean(seconds)), "effect": interval(values),
                          "effects": values})
        out[task] = {
            "effect": interval(effects), "effects": effects, "curve": curve,
            "rate_for": [r["measures"][final_key]["rate"] for r in runs["for"]],
            "rate_against": [r["measures"][final_key]["rate"] for r in runs["against"]],
            "heldout_loss": float(np.mean([r["measures"]["final"]["heldout_loss"] for d in runs for r in runs[d]])),
            "heldout_implicit_accuracy": float(np.mean([r["measures"]["final"]["heldout_implicit_accuracy"]
                                                        for d in runs for r in runs[d]])),
            "train_implicit_accuracy": float(np.mean([r["metrics"][str(study.steps)].get("implicit_accuracy", np.nan)
                                                      for d in runs for r in runs[d]])),  # sft has none
            "saturated_final": float(np.mean([r["metrics"][str(study.steps)].get("saturated", 0.0)
                                              for d in runs for r in runs[d]])),
            "first_saturated_step": [next((int(s) for s, m in sorted(r["metrics"].items(), key=lambda x: int(x[0]))
                                           if m.get("saturated", 0) >= 0.5), None) for d in runs for r in runs[d]],
            "seconds": float(np.mean([r["metrics"][str(study.steps)]["elapsed_s"] for d in runs for r in runs[d]])),
        }
    return out


def label(spec):
    text = spec["loss"] + (f", {spec['weighting']} weights" if spec.get("weighting", "-") != "-" else "")
    if spec.get("loss_timesteps"):
        text += f", {spec['loss_timesteps']} loss step{'s' if spec['loss_timesteps'] > 1 else ''} per pair"
    if spec.get("breaker", "weight_decay") != "weight_decay":
        text += {"bf16": ", bf16 autocast, no weight decay", "none": ", fp32, no weight decay",
                 "perturb": f", random start ({PERTURBATION:g} x RMS), no weight decay",
                 "lora": f", LoRA with random B (std {PERTURBATION:g}), no weight decay"}[spec["breaker"]]
    return text


def fmt(effect):
    mean, half = effect
    return f"{100 * mean:+.1f}" + ("" if np.isnan(half) else f" ± {100 * half:.1f}")


def plot_effect(ax, curve, key, **line):
    """One configuration's effect curve (points) against `key` of its checkpoints, from 0, with its 95% band."""
    x = [0] + [point[key] for point in curve]
    mean = np.array([0] + [point["effect"][0] for point in curve]) * 100
    half = np.nan_to_num(np.array([0] + [point["effect"][1] for point in curve]) * 100)
    drawn, = ax.plot(x, mean, marker="o", markersize=3, **line)
    ax.fill_between(x, mean - half, mean + half, color=drawn.get_color(), alpha=0.15)


def plot(rows, path):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    figure, axes = plt.subplots(2, 2, figsize=(13, 9), sharey=True)
    colours = {name: f"C{i % 10}" for i, name in enumerate(rows)}  # one colour per configuration in every panel
    for row, task in enumerate(TASKS):
        for column, key in enumerate(("step", "seconds")):
            ax = axes[row][column]
            for name, summary in rows.items():
                if task not in summary or not summary["specs"][task].get("curve"):
                    continue
                plot_effect(ax, summary[task]["curve"], key, label=name, color=colours[name])
            ax.axhline(0, color="grey", linewidth=0.8)
            ax.set_xlabel("optimiser steps" if key == "step" else "training seconds (warm trajectory cache)")
            ax.set_title(f"{task} task")
            ax.grid(alpha=0.3)
        axes[row][0].set_ylabel("preference effect (points; 95% interval over seeds)")
    for row in axes:
        row[0].legend(fontsize=7, loc="lower left")
    figure.tight_layout()
    figure.savefig(path, dpi=110)


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="smoke run of every stage (rough toy, 1 seed, few steps)")
    parser.add_argument("--forms", nargs="+", default=None,
                        help="restrict to these losses (diffusion_dpo, sft, inversion_dpo, ...; default: all)")
    parser.add_argument("--work_dir", default=None, help="models, caches and runs (default: a folder in /tmp)")
    parser.add_argument("--results_dir", default=str(RESULTS), help="where the tables, plot and numbers go")
    parser.add_argument("--workers", type=int, default=2, help="runs at a time (each one CPU thread)")
    parser.add_argument("--measure", default=None, help=argparse.SUPPRESS)
    args, rest = parser.parse_known_args()
    work = Path(args.work_dir or f"/tmp/inversion-dpo-alignment{'-quick' if args.quick else ''}")
    if args.measure:
        return measure(args.measure, rest, work)
    started = time.perf_counter()
    study = Study(args.quick, work)
    suffix = "_quick" if args.quick else ""
    results_dir = Path(args.results_dir)
    results_dir.mkdir(parents=True, exist_ok=True)
    log_path = results_dir / f"alignment{suffix}.log"

    def log(message):
        print(message, flush=True)
        with open(log_path, "a") as f:
            f.write(message + "\n")

    study.setup()
    base = measure_base(study)
    log(f"toy model ready: base preference rates {base}; cache fill seconds {study.fill_seconds}")
    configs = [c for c in CONFIGS if (args.forms is None or c[0] in args.forms)
               and not (args.quick and c[1] == "uniform")]  # the smoke run: one weighting
    records, chosen, grids = {}, {}, {}
    for task in study.tasks:  # 1. grid, on each task: a form's best settings may differ between tasks
        for loss, weighting in configs:
            if task != "colour" and (loss, weighting) not in BOTH_TASKS:
                continue
            # uniform weights: the beta grid at the learning rate chosen for the same form's official weights
            official = chosen.get((task, loss, "official"))
            lrs = [official["lr"]] if weighting == "uniform" and official else None
            chosen[(task, loss, weighting)], grids[f"{task}/{loss}/{weighting}"] = choose(
                study, records, loss, weighting, args.workers, log, lrs, task)
    report = {}  # 2. and 3.: label -> {task: spec}

    def add(spec, curve=True):
        report.setdefault(label(spec), {})[spec["task"]] = {**spec, "curve": curve}

    for (task, loss, weighting), spec in chosen.items():
        add(spec, curve=weighting != "uniform")
    paper = chosen.get(("colour", "inversion_dpo", "official"))
    if paper is not None:
        for breaker in BREAKERS:  # one task answers whether the sign follows the breaker
            add({**paper, "breaker": breaker}, curve=False)
        add({**paper, "loss": "inversion_dpo_official"}, curve=False)
    for task in study.tasks:
        anchored = chosen.get((task, "inversion_dpo_x0", "official"))
        if anchored is not None and not args.quick:  # fewer loss timesteps per pair, for cost
            add({**anchored, "loss_timesteps": 1})
    specs = [{**spec, "seed": seed} for per_task in report.values() for spec in per_task.values()
             for seed in study.seeds]
    log(f"report stage: {len(specs) * 2} runs (finished ones reused)")
    records.update(study.run_all(specs, args.workers))
    rows = {name: summarise_config(study, records, per_task) for name, per_task in report.items()}

    reference = rows.get(label({"loss": "diffusion_dpo"}))
    lines = write_tables(study, base, rows, reference, time.perf_counter() - started)
    (results_dir / f"alignment{suffix}.md").write_text("\n".join(lines) + "\n")
    (results_dir / f"alignment{suffix}.json").write_text(json.dumps(
        {"base": base, "fill_seconds": study.fill_seconds, "grids": grids, "rows": rows,
         "chosen": {"/".join(k): v for k, v in chosen.items()},
         "runs": {name: {"spec": r["spec"], "measures": r["measures"],
                         "metrics": {s: {k: m.get(k) for k in ("loss", "margin", "score_w", "score_l", "grad_norm",
                                                               "saturated", "implicit_accuracy", "elapsed_s")}
                                     for s, m in r["metrics"].items()}} for name, r in records.items()}},
        indent=None))
    plot(rows, results_dir / f"alignment{suffix}.png")
    log("\n".join(lines))


def base_measures(model, samples, task):
    """Prints a base model's preference rate (report sampling seed) and held-out denoising loss as one JSON line."""
    import toy_task

    pipe = toy_task.load_pipeline(Path(model))
    print(json.dumps({"rate": toy_task.preference_rate(pipe, samples, task, seed=REPORT_SEED),
                      "heldout_loss": toy_task.heldout_denoising_loss(pipe, task=task)}))


def measure_base(study):
    """Per task: base_measures of its base model (a quick run in this process, as measured_here says)."""
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1"}
    base = {}
    for task in study.tasks:
        marker = study.work / f"base_{task}.json"
        arguments = (str(study.model(task)), study.samples, task)
        if not marker.is_file() and study.quick:
            marker.write_text(json.dumps(measured_here(base_measures, *arguments)))
        elif not marker.is_file():
            code = "import sys; sys.path.insert(0, 'benchmarks'); import alignment; alignment.base_measures(*%r)" \
                % (arguments,)
            result = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, env=env,
                                    check=True)
            marker.write_text(result.stdout.strip().splitlines()[-1])
        base[task] = json.loads(marker.read_text())
    return base


def write_tables(study, base, rows, reference, total_seconds):
    lines = [
        "Toy tasks (`toy_task.py`), each with its own base model; base preferred-colour rate "
        + ", ".join(f"{base[t]['rate']:.1%} ({t})" for t in study.tasks) + "; base held-out denoising loss "
        + ", ".join(f"{base[t]['heldout_loss']:.4f} ({t})" for t in study.tasks) + ". "
        f"Each run: {study.steps} AdamW steps of {study.batch} pairs ({study.pairs} distinct pairs, none repeated), "
        f"10 inversion steps, guidance 1, constant lr, weight decay 1e-2 unless stated, fp32. Effect = rate after "
        f"training for the preference minus after training against it, in points, on {study.samples} samples from "
        f"sampling seed {REPORT_SEED}; mean ± 95% t-interval over training seeds {study.seeds}. (beta, lr) chosen per "
        f"form and task on sampling seed {VALIDATION_SEED}, training seed 0.",
    ]
    for task in study.tasks:
        lines += ["", f"{task} task:", "",
                  "| configuration | beta | lr | effect | for / against (%) | held-out loss | held-out implicit acc. | "
                  "train implicit acc. | saturated at end | s / run |", "|---|---|---|---|---|---|---|---|---|---|"]
        for name, summary in rows.items():
            if task not in summary:
                continue
            spec, row = summary["specs"][task], summary[task]
            lines.append(
                f"| {name} | {spec['beta'] if spec['beta'] is not None else '-'} | {spec['lr']:g} | "
                f"{fmt(row['effect'])} | {'/'.join(f'{100 * v:.0f}' for v in row['rate_for'])} vs "
                f"{'/'.join(f'{100 * v:.0f}' for v in row['rate_against'])} | {row['heldout_loss']:.4f} | "
                f"{row['heldout_implicit_accuracy']:.2f} | {row['train_implicit_accuracy']:.2f} | "
                f"{row['saturated_final']:.2f} | {row['seconds']:.1f} |")
    if reference is None:
        return lines + footer(study, total_seconds)
    lines += ["", "Cost: first checkpoint whose mean effect comes within 5 points of diffusion_dpo's final mean effect, "
              "in training seconds (warm cache; the fill is apart) and as a fraction of diffusion_dpo's seconds to "
              "its final step; only where diffusion_dpo's effect excludes 0.", "",
              "| configuration | task | reaches at step | seconds | fraction of diffusion_dpo's time |",
              "|---|---|---|---|---|"]
    reaches = {}
    for task in study.tasks:
        mean, half = reference[task]["effect"]
        if not mean - half > 0:
            lines.append(f"| diffusion_dpo | {task} | its effect {fmt((mean, half))} does not exclude 0: no target | "
                         "- | - |")
            continue
        total = reference[task]["curve"][-1]["seconds"]
        for name, summary in rows.items():
            if task not in summary or not summary["specs"][task].get("curve"):
                continue
            point = next((p for p in summary[task]["curve"] if p["effect"][0] >= mean - 0.05), None)
            reaches[(name, task)] = point["seconds"] / total if point else None
            lines.append(f"| {name} | {task} | {point['step']} | {point['seconds']:.1f} | {point['seconds'] / total:.2f} |"
                         if point else f"| {name} | {task} | never | - | - |")
    lines += ["", "The goal (an inversion form: effect at least +80 with an interval above 0 on every task, diffusion_dpo's "
              "final effect in at most half its time, held-out loss no worse than diffusion_dpo's):", "",
              "| configuration | " + " | ".join(f"{t}: effect >= +80, above 0" for t in study.tasks)
              + " | time <= 1/2 of diffusion_dpo's | held-out loss <= diffusion_dpo's |",
              "|---|" + "---|" * (len(study.tasks) + 2)]
    for name, summary in rows.items():
        if not name.startswith("inversion_dpo") or not all(t in summary for t in study.tasks):
            continue
        cells = ["yes" if summary[t]["effect"][0] >= 0.8 and summary[t]["effect"][0] - summary[t]["effect"][1] > 0
                 else "no" for t in study.tasks]
        fractions = [reaches.get((name, t), "n/a") for t in study.tasks if (name, t) in reaches]
        cells.append("n/a" if not fractions else "yes" if all(f is not None and f <= 0.5 for f in fractions) else "no")
        cells.append("yes" if all(summary[t]["heldout_loss"] <= reference[t]["heldout_loss"] for t in study.tasks)
                     else "no")
        lines.append(f"| {name} | " + " | ".join(cells) + " |")
    return lines + footer(study, total_seconds)


def footer(study, total_seconds):
    return ["", "Trajectory cache fill (once per task, reported apart): "
            + ", ".join(f"{t} {s:.0f} s" for t, s in study.fill_seconds.items()) + ".",
            f"Study time {total_seconds:.0f} s (this invocation; finished runs are reused)."]


if __name__ == "__main__":
    main()
