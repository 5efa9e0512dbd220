"""Do cheaper settings of the anchored form reach Diffusion-DPO's preference effect in half its time? (METHOD.md
section 8, measured as section 6 says.)

With a warm trajectory cache a step of the anchored form (`--loss_type inversion_dpo_x0`, official weights) runs the
policy alone, at every evaluated point of both trajectories; `--loss_timesteps M` evaluates M of the N points, drawn
by `--loss_timestep_sampling` (uniform, weighted by the step weights, or stratified over the schedule). Its opponent
is Diffusion-DPO with a warm cache of its own (VAE latents and caption embeddings: a step runs policy and reference).
Two toys of the colour task (red preferred for "a square"): the SDXL-shaped one of alignment.py ("colour") and the
SD3-shaped rectified flow of flow_alignment.py ("flow"), each loss at the beta and learning rate its study chose (not
tuned again here). Every run is trained for the preference and against it (pairs swapped), seeds equal; the effect
is the difference of the two red rates.

1. Fill, per toy: one float32 cache per (loss, N), the anchored form's trajectories at each N used and
   Diffusion-DPO's encodings; each fill's seconds are that loss's fill cost.
2. Candidates (training seed 0, validation sampling seed 1): the anchored form at all N = 10 steps; at M in {1, 2, 4}
   steps per pair with each sampling, N = 10; at M = 2, stratified, N = 20. Chosen per toy: the first to come within
   5 points of Diffusion-DPO's final validation effect, in training seconds (if none does: the highest final
   effect).
3. Report (training seeds 0, 1, 2; sampling seed 0): Diffusion-DPO, the all-steps form, the chosen candidate and each
   M = 1 candidate: effect against optimiser steps, pairs seen and training seconds (mean, 95% t-interval),
   held-out denoising loss along training, the goal (Diffusion-DPO's final effect within 5 points with an interval
   above 0, in at most half its training seconds, held-out loss at that checkpoint no worse than Diffusion-DPO's
   final one; after all steps shown beside it), and the end-to-end cost with the fills, with the number
   of epochs or sweep runs after which a fill has paid for itself against Diffusion-DPO.

Each run: 40 AdamW steps of 8 pairs (512 distinct pairs, none repeated), a checkpoint every 5, guidance 1, constant
lr; the colour toy with weight decay 1e-2, the flow toy without, as their studies. Every process takes one CPU
thread; the runs go two at a time. Seconds come from processes that run alone: the fills, and timing runs of every
configuration (3 each, taking turns, no checkpoint before the last; the median), since the runs' own speed moves
with whatever shares the machine.

    python benchmarks/efficiency.py --work_dir /tmp/efficiency         # the study (resumable: finished runs reused)
    python benchmarks/efficiency.py --quick --work_dir /tmp/eff-quick   # smoke run of every stage, a few minutes

--quick: rough toys, 2 steps, 1 seed, 2 candidates; its fills go two at a time, its runs are measured in the study's
own process, and the timing of each configuration reads its candidate run's clock instead of training a timing run
apart (a smoke run's seconds mean nothing).

Writes benchmarks/results/efficiency.{md,json,png} (efficiency_quick.* for --quick): the tables, every run's
measures and metrics, and the effect curves (against steps, pairs and seconds; one row per toy).
"""

import argparse
import contextlib
import io
import json
import os
import shutil
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "benchmarks"))

import startup  # noqa: E402,F401  (before diffusers: quiets two start-up warnings)

import alignment  # noqa: E402
import toy_task  # noqa: E402
from alignment import REPORT_SEED, RESULTS, VALIDATION_SEED, Study, fmt, interval  # noqa: E402
from flow_alignment import FlowStudy  # noqa: E402

ANCHORED, DPO = "inversion_dpo_x0", "diffusion_dpo"
TOYS = ("colour", "flow")
# (beta, learning rate) of each loss per toy: the settings alignment.py (colour) and flow_alignment.py (flow) chose
SETTINGS = {"colour": {ANCHORED: (50.0, 1e-4), DPO: (500.0, 1e-4)},
            "flow": {ANCHORED: (50.0, 1e-4), DPO: (50.0, 1e-4)}}
SAMPLINGS = ("uniform", "weighted", "stratified")
# anchored-form candidates: (M evaluated steps per pair, how they are drawn, N inversion steps); M None: all N
ALL_STEPS = (None, None, 10)
CANDIDATES = [ALL_STEPS, *((m, sampling, 10) for m in (1, 2, 4) for sampling in SAMPLINGS), (2, "stratified", 20)]
QUICK_CANDIDATES = [ALL_STEPS, (2, "stratified", 20)]
WITHIN = 0.05  # "reaches Diffusion-DPO's effect": comes within 5 points of it
DIRECTIONS = ("for", "against")


class Toy:
    """One toy: its folder (model, pairs, caches, runs) and the trainer with its study's fixed flags."""

    def __init__(self, kind, study, trainer):
        self.kind, self.trainer = kind, trainer
        self.work, self.toy = study.work, study.toy

    def setup(self, pairs, heldout_pairs, quick):
        build = dict(vae_steps=20, unet_steps=30) if quick else {}
        toy_task.build_model(toy_task.model_folder(self.toy), kind=self.kind, progress=lambda it, desc=None: it,
                             **build)
        # the folder names alignment.measure reads (pairs_colour, heldout_colour), for both toys
        toy_task.build_pairs(self.toy / "pairs_colour", count=pairs, seed=1)
        if self.kind == "sdxl":  # implicit accuracy is Diffusion-DPO's DDPM reward: the UNet toy's
            toy_task.build_pairs(self.toy / "heldout_colour", count=heldout_pairs, seed=2)

    def cache(self, loss, n):
        # One folder per (loss, N): the encodings are keyed by image alone, so in a shared folder a later fill would
        # reuse an earlier one's and look cheaper than it is.
        return self.work / "caches" / f"{loss}-N{n}"


class Efficiency:
    """The study: its budget (alignment.py's), its two toys, and the fills, runs and timing of its stages."""

    def __init__(self, quick, work):
        self.quick, self.work = quick, Path(work)
        # alignment.py's study object fixes the budget (steps, checkpoints, pairs, samples, seeds, batch) and the
        # colour toy's trainer; flow_alignment.py's the flow toy's (T5 length, no weight decay)
        colour, flow = Study(quick, self.work / "colour"), FlowStudy(self.work / "flow", quick)
        self.toys = {
            "colour": Toy("sdxl", colour, lambda flags, threads=1, cold=False: colour.trainer(
                ["--adam_weight_decay", "1e-2", *flags], "colour", threads, cold)),
            "flow": Toy("sd3", flow, flow.trainer),
        }
        self.steps, self.every, self.batch = colour.steps, colour.every, colour.batch
        self.pairs, self.heldout_pairs, self.seeds = colour.pairs, colour.heldout_pairs, colour.seeds
        self.samples, self.curve_samples = colour.samples, colour.curve_samples
        self.curve = list(range(self.every, self.steps + 1, self.every))  # every checkpoint
        self.candidates = QUICK_CANDIDATES if quick else CANDIDATES
        self.rounds = 1 if quick else 3  # timing runs per configuration

    # -- specs ------------------------------------------------------------------------------------------------
    def spec(self, toy, loss, candidate=ALL_STEPS, seed=0):
        m, sampling, n = candidate
        beta, lr = SETTINGS[toy][loss]
        # "task": toy_task's preference task, which both toys learn (alignment.measure reads it)
        return {"toy": toy, "task": "colour", "loss": loss, "beta": beta, "lr": lr, "M": m, "sampling": sampling,
                "N": n, "seed": seed}

    def fills(self):
        """(toy, loss, N) of every cache the runs read."""
        return [(toy, ANCHORED, n) for toy in TOYS for n in sorted({c[2] for c in self.candidates})] + \
               [(toy, DPO, 10) for toy in TOYS]

    def rate_key(self, step, sampling_seed):
        count = self.samples if step == self.steps else self.curve_samples
        return f"rate:{step}:{sampling_seed}:{count}"

    def wanted_measures(self, spec, stage):
        """alignment.measure's keys (rates at every checkpoint; 'final': held-out loss and implicit accuracy), the
        flow toy's 'heldout' (its held-out loss alone) instead of 'final'. A candidate the report shows whatever is
        chosen is measured for both stages at once: one subprocess fewer."""
        validation = [self.rate_key(step, VALIDATION_SEED) for step in self.curve]
        report = [self.rate_key(step, REPORT_SEED) for step in self.curve] + \
                 ["final" if self.toys[spec["toy"]].kind == "sdxl" else "heldout"] + \
                 [f"heldout:{step}" for step in self.curve[:-1]]  # the held-out loss where the effect is reached
        if stage == "report":
            return report
        return validation + (report if spec["loss"] == DPO or spec["M"] in (None, 1) else [])

    # -- fills and runs ---------------------------------------------------------------------------------------
    def cache_flags(self, toy, loss, n, evaluated):
        # run_trainer passes N = 10 and a chunk of 10; these later flags win. A chunk of every evaluated step: the
        # gradient in one pass, never recomputed chunk by chunk.
        return ["--inversion_cache_dir", str(self.toys[toy].cache(loss, n)), "--inversion_cache_dtype", "float32",
                "--num_inference_steps", str(n), "--trajectory_chunk_size", str(evaluated)]

    def fill(self, job):
        """Fill one cache (once; later invocations read its marker); returns its seconds, start-up included."""
        toy, loss, n = job
        marker = self.toys[toy].cache(loss, n) / "filled.json"
        if not marker.is_file():
            # from nothing: the entries of an interrupted fill would make this one look cheaper
            shutil.rmtree(self.toys[toy].cache(loss, n), ignore_errors=True)
            started = time.perf_counter()
            self.toys[toy].trainer(["--dataset_name", str(self.toys[toy].toy / "pairs_colour" / "pairs.jsonl"),
                                    "--loss_type", loss, *self.cache_flags(toy, loss, n, n), "--fill_inversion_cache",
                                    "--output_dir", str(self.toys[toy].work / "fills" / f"{loss}-N{n}")],
                                   cold=not self.quick)
            marker.write_text(json.dumps({"seconds": time.perf_counter() - started}))
        return json.loads(marker.read_text())["seconds"]

    def train(self, spec, run_dir, every=None):
        manifest = "pairs.jsonl" if spec["direction"] == "for" else "pairs_swapped.jsonl"
        flags = ["--dataset_name", str(self.toys[spec["toy"]].toy / "pairs_colour" / manifest),
                 "--output_dir", str(run_dir), "--loss_type", spec["loss"], "--beta_dpo", str(spec["beta"]),
                 "--learning_rate", str(spec["lr"]), "--seed", str(spec["seed"]), "--mixed_precision", "no",
                 "--max_train_steps", str(self.steps), "--checkpointing_steps", str(every or self.every),
                 *self.cache_flags(spec["toy"], spec["loss"], spec["N"], spec["M"] or spec["N"])]
        if spec["loss"] == ANCHORED:
            flags += ["--timestep_weighting", "official"]
        if spec["M"]:
            flags += ["--loss_timesteps", str(spec["M"]), "--loss_timestep_sampling", spec["sampling"]]
        self.toys[spec["toy"]].trainer(flags)

    def run(self, job):
        """Train one run (unless finished before), measure what `stage` needs in a one-thread subprocess; returns
        its record."""
        spec, stage = job
        work = self.toys[spec["toy"]].work
        run_dir = work / "runs" / name_of(spec)
        record_path = run_dir / "record.json"
        record = json.loads(record_path.read_text()) if record_path.is_file() else None
        if record is None:
            if not ((run_dir / "unet").is_dir() or (run_dir / "transformer").is_dir()):
                shutil.rmtree(run_dir, ignore_errors=True)
                self.train(spec, run_dir)
            metrics = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
            record = {"spec": spec, "metrics": {str(m["step"]): m for m in metrics}, "measures": {}}
            record_path.write_text(json.dumps(record))
        missing = [key for key in self.wanted_measures(spec, stage) if key not in record["measures"]]
        if missing and self.quick:  # in this process (alignment.measured_here)
            record["measures"].update(alignment.measured_here(measure, str(run_dir), missing, work))
            record_path.write_text(json.dumps(record))
        elif missing:
            env = {**os.environ, "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false", "OMP_NUM_THREADS": "1",
                   "MKL_NUM_THREADS": "1"}
            result = subprocess.run([sys.executable, __file__, "--measure", str(run_dir), "--work_dir", str(work),
                                     *missing], cwd=ROOT, capture_output=True, text=True, env=env)
            if result.returncode != 0:
                raise RuntimeError(f"measuring {run_dir} failed:\n{result.stderr[-3000:]}")
            record["measures"].update(json.loads(result.stdout.strip().splitlines()[-1]))
            record_path.write_text(json.dumps(record))
        return record

    def timed(self, spec, round_):
        """Elapsed seconds at each step of one timing run of `spec` (seed 0, for the preference, no checkpoint before
        the last, so its clock runs through no save) and its cache misses; kept as a marker, the run removed."""
        name = f"{timing_key(spec)}-r{round_}"
        marker = self.toys[spec["toy"]].work / "timing" / f"{name}.json"
        if self.quick:  # the smoke run trains no run apart: its configuration's candidate run's clock (seed 0, for)
            run_dir = self.toys[spec["toy"]].work / "runs" / timing_key(spec)
            metrics = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
            return {"elapsed": {str(m["step"]): m["elapsed_s"] for m in metrics},
                    "cache_misses": sum(misses(m) for m in metrics)}
        if not marker.is_file():
            run_dir = marker.with_suffix("")
            shutil.rmtree(run_dir, ignore_errors=True)
            self.train({**spec, "seed": 0, "direction": "for"}, run_dir, every=self.steps)
            metrics = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
            marker.write_text(json.dumps({"elapsed": {str(m["step"]): m["elapsed_s"] for m in metrics},
                                          "cache_misses": sum(misses(m) for m in metrics)}))
            shutil.rmtree(run_dir)
        return json.loads(marker.read_text())

    def time_all(self, specs):
        """Training seconds at each checkpoint per spec (by timing_key): the median of `rounds` timing runs, one at a
        time, the specs taking turns round by round so that whatever else loads the machine falls on all alike.
        The study's own runs go two at a time and their speed moved with that load (up to 2.5x between seeds)."""
        timings = {}
        for round_ in range(self.rounds):
            for spec in specs[round_ % len(specs):] + specs[:round_ % len(specs)]:
                timings.setdefault(timing_key(spec), []).append(self.timed(spec, round_))
        self.cold_timings = [key for key, runs in timings.items() if any(run["cache_misses"] for run in runs)]
        self.seconds = {key: {step: float(np.median([run["elapsed"][str(step)] for run in runs]))
                              for step in self.curve} for key, runs in timings.items()}

    def run_all(self, specs, stage, workers):
        """Every spec trained for and against the preference, `workers` at a time; records keyed by run name."""
        runs = [{**spec, "direction": d} for spec in specs for d in DIRECTIONS]
        with ThreadPoolExecutor(workers) as pool:
            return {name_of(r): record for r, record in zip(runs, pool.map(self.run, [(r, stage) for r in runs]))}

    # -- summaries --------------------------------------------------------------------------------------------
    def effect_curve(self, records, spec, seeds, sampling_seed):
        """Per checkpoint: steps, pairs seen, training seconds (timed apart), effect (mean, half-width) over
        `seeds`."""
        curve = []
        for step in self.curve:
            key = self.rate_key(step, sampling_seed)
            effects = [effect(records, {**spec, "seed": seed}, key) for seed in seeds]
            curve.append({"step": step, "pairs": step * self.batch, "seconds": self.seconds[timing_key(spec)][step],
                          "effect": interval(effects), "effects": effects})
        return curve

    def choose(self, records, toy):
        """The candidates' validation curves, Diffusion-DPO's final validation effect, and the chosen candidate."""
        target = effect(records, self.spec(toy, DPO), self.rate_key(self.steps, VALIDATION_SEED))
        scored = []
        for candidate in self.candidates:
            spec = self.spec(toy, ANCHORED, candidate)
            curve = self.effect_curve(records, spec, [0], VALIDATION_SEED)
            scored.append({"spec": spec, "curve": curve, "final": curve[-1]["effect"][0],
                           "reaches": first_reaching(curve, target - WITHIN)})
        reached = [s for s in scored if s["reaches"]]
        chosen = min(reached, key=lambda s: (s["reaches"]["seconds"], -s["final"])) if reached else \
            max(scored, key=lambda s: s["final"])
        return {"dpo_effect": target, "candidates": scored, "chosen": chosen["spec"]}

    def report_rows(self, toy, chosen):
        """label -> {spec, roles}: Diffusion-DPO, the all-steps form, the chosen candidate, each M = 1 candidate."""
        rows = {}

        def add(spec, role):
            rows.setdefault(label(spec), {"spec": spec, "roles": []})["roles"].append(role)

        add(self.spec(toy, DPO), "Diffusion-DPO")
        add(self.spec(toy, ANCHORED), "all steps")
        add(chosen, "chosen")
        for candidate in self.candidates:  # (wanted_measures knows these rows too)
            if candidate[0] == 1:  # the cheapest of each sampling, for honesty whether or not it was chosen
                add(self.spec(toy, ANCHORED, candidate), f"M = 1, {candidate[1]}")
        return rows

    def summarise(self, records, spec, fill_seconds):
        specs = [{**spec, "seed": seed} for seed in self.seeds]
        runs = [records[name_of({**s, "direction": d})] for s in specs for d in DIRECTIONS]
        final_key = self.rate_key(self.steps, REPORT_SEED)
        curve = self.effect_curve(records, spec, self.seeds, REPORT_SEED)
        held = [r["measures"].get("final", r["measures"].get("heldout")) for r in runs]
        heldout_curve = {str(step): float(np.mean([r["measures"][f"heldout:{step}"]["heldout_loss"] for r in runs]))
                         for step in self.curve[:-1]}
        heldout_curve[str(self.steps)] = float(np.mean([h["heldout_loss"] for h in held]))
        return {
            "heldout_curve": heldout_curve,
            "curve": curve, "effect": curve[-1]["effect"], "effects": curve[-1]["effects"],
            "rate_for": [records[name_of({**s, "direction": "for"})]["measures"][final_key]["rate"] for s in specs],
            "rate_against": [records[name_of({**s, "direction": "against"})]["measures"][final_key]["rate"]
                             for s in specs],
            "heldout_loss": float(np.mean([h["heldout_loss"] for h in held])),
            "heldout_implicit_accuracy": float(np.mean([h.get("heldout_implicit_accuracy", np.nan) for h in held])),
            "saturated_final": float(np.mean([r["metrics"][str(self.steps)].get("saturated", np.nan) for r in runs])),
            "seconds": curve[-1]["seconds"], "seconds_per_step": curve[-1]["seconds"] / self.steps,
            "fill_seconds": fill_seconds[fill_key(spec["toy"], spec["loss"], spec["N"])],
        }

    def goal(self, row, dpo):
        """Reaches Diffusion-DPO's final mean effect within 5 points with an interval above 0, in at most half its
        training seconds, with a held-out loss no worse than Diffusion-DPO's final one, at the checkpoint that reaches
        the effect (the model a user would stop at). The held-out loss after all steps is compared too, and shown."""
        reaches = first_reaching(row["curve"], dpo["effect"][0] - WITHIN, above_zero=True)
        fraction = reaches["seconds"] / dpo["seconds"] if reaches else None
        heldout_at_reach = row["heldout_curve"][str(reaches["step"])] if reaches else None
        heldout_at_reach_ok = heldout_at_reach is not None and heldout_at_reach <= dpo["heldout_loss"]
        return {"reaches": reaches, "fraction": fraction, "heldout_ok": row["heldout_loss"] <= dpo["heldout_loss"],
                "heldout_at_reach": heldout_at_reach, "heldout_at_reach_ok": heldout_at_reach_ok,
                "met": bool(reaches and fraction <= 0.5 and heldout_at_reach_ok)}

    def break_even(self, row, dpo, reaches):
        """Epochs, and sweep runs, after which `row`'s fill has paid for itself against Diffusion-DPO's."""
        steps_per_epoch = self.pairs // self.batch
        return {"epochs": paid_after(row["fill_seconds"], dpo["fill_seconds"],
                                     steps_per_epoch * row["seconds_per_step"],
                                     steps_per_epoch * dpo["seconds_per_step"]),
                "runs": paid_after(row["fill_seconds"], dpo["fill_seconds"], reaches["seconds"], dpo["seconds"])
                if reaches else "not reached"}


def timing_key(spec):
    return name_of({**spec, "seed": 0, "direction": "for"})


def misses(metrics):
    """Cache misses counted by a metrics row: trajectories and encodings."""
    return (metrics.get("cache_misses") or 0) + (metrics.get("encoding_cache_misses") or 0)


def fill_key(toy, loss, n):
    return f"{toy}/{loss}/N{n}"


def name_of(spec):
    cost = f"M{spec['M']}-{spec['sampling']}" if spec["M"] else "all"
    return f"{spec['toy']}-{spec['loss']}-b{spec['beta']:g}-lr{spec['lr']:g}-{cost}-N{spec['N']}-s{spec['seed']}-" \
           f"{spec['direction']}"


def label(spec):
    if spec["loss"] == DPO:
        return DPO
    if not spec["M"]:
        return f"{ANCHORED}, all N = {spec['N']} steps"
    return f"{ANCHORED}, M = {spec['M']} of N = {spec['N']}, {spec['sampling']}"


def effect(records, spec, key):
    """(rate trained for) - (rate trained against) of `spec` under measure `key`."""
    rates = {d: records[name_of({**spec, "direction": d})]["measures"][key]["rate"] for d in DIRECTIONS}
    return rates["for"] - rates["against"]


def first_reaching(curve, target, above_zero=False):
    """The first checkpoint whose mean effect is at least `target` (and, with `above_zero`, whose interval is above
    0); None if none is."""
    return next((point for point in curve if point["effect"][0] >= target
                 and (not above_zero or point["effect"][0] - point["effect"][1] > 0)), None)


def paid_after(fill, fill_dpo, seconds, seconds_dpo):
    """k* = (fill - fill_dpo) / (seconds_dpo - seconds): after k* units (epochs or runs) of `seconds` each, fill +
    k seconds is at most fill_dpo + k seconds_dpo; 0 when the fill costs no more; None (never) when a unit costs no
    less than Diffusion-DPO's."""
    if seconds_dpo <= seconds:
        return None
    return max(fill - fill_dpo, 0.0) / (seconds_dpo - seconds)


def measure(run_dir, keys, work):
    """alignment.measure's keys, and 'heldout': the held-out denoising loss alone (the flow toy has no DDPM implicit
    accuracy). Prints one JSON line."""
    import torch

    torch.set_num_threads(1)
    out = {}
    shared = [key for key in keys if not key.startswith("heldout")]
    if shared:
        printed = io.StringIO()
        with contextlib.redirect_stdout(printed):
            alignment.measure(run_dir, shared, work)
        out.update(json.loads(printed.getvalue().strip().splitlines()[-1]))
    last = alignment.max_step(run_dir)
    for key in (key for key in keys if key.startswith("heldout")):  # 'heldout' (the final model) or 'heldout:STEP'
        step = int(key.split(":")[1]) if ":" in key else last
        folder = Path(run_dir) if step == last else Path(run_dir) / f"checkpoint-{step}"
        pipe = toy_task.load_pipeline(toy_task.model_folder(Path(work) / "toy"), folder)
        out[key] = {"heldout_loss": toy_task.heldout_denoising_loss(pipe)}
    print(json.dumps(out))


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true",
                        help="smoke run of every stage (rough toys, 2 steps, 1 seed, 2 candidates)")
    parser.add_argument("--work_dir", default=None, help="toys, caches and runs (default: a folder in /tmp)")
    parser.add_argument("--results_dir", default=str(RESULTS), help="where the tables, plot and numbers go")
    parser.add_argument("--workers", type=int, default=2, help="runs at a time (each one CPU thread)")
    parser.add_argument("--measure", default=None, help=argparse.SUPPRESS)
    args, rest = parser.parse_known_args()
    work = Path(args.work_dir or f"/tmp/inversion-dpo-efficiency{'-quick' if args.quick else ''}")
    if args.measure:
        return measure(args.measure, rest, work)
    started = time.perf_counter()
    study = Efficiency(args.quick, work)
    for toy in study.toys.values():
        toy.setup(study.pairs, study.heldout_pairs, args.quick)
    # 1. fill, one at a time (the smoke run's, whose seconds mean nothing, `workers` at a time)
    jobs = study.fills()
    with ThreadPoolExecutor(args.workers if args.quick else 1) as pool:
        fill_seconds = {fill_key(*job): seconds for job, seconds in zip(jobs, pool.map(study.fill, jobs))}
    print(f"caches filled: {', '.join(f'{k} {s:.0f} s' for k, s in fill_seconds.items())}", flush=True)

    specs = [study.spec(toy, ANCHORED, c) for toy in TOYS for c in study.candidates]  # 2. candidates
    specs += [study.spec(toy, DPO) for toy in TOYS]
    print(f"candidate stage: {2 * len(specs)} runs (finished ones reused)", flush=True)
    records = study.run_all(specs, "candidates", args.workers)
    print(f"timing: {len(specs)} configurations x {study.rounds} timing runs, one at a time", flush=True)
    study.time_all(specs)
    choices = {toy: study.choose(records, toy) for toy in TOYS}
    for toy, choice in choices.items():
        print(f"  {toy}: chosen {label(choice['chosen'])}", flush=True)

    report = {toy: study.report_rows(toy, choices[toy]["chosen"]) for toy in TOYS}  # 3. report
    specs = [{**row["spec"], "seed": seed} for rows in report.values() for row in rows.values()
             for seed in study.seeds]
    print(f"report stage: {2 * len(specs)} runs (finished ones reused)", flush=True)
    records.update(study.run_all(specs, "report", args.workers))
    cold = [name for name, record in records.items() if any(misses(m) for m in record["metrics"].values())]
    cold += study.cold_timings
    for toy, rows in report.items():
        for row in rows.values():
            row.update(study.summarise(records, row["spec"], fill_seconds))
        dpo = rows[DPO]
        for name, row in rows.items():
            if name != DPO:
                row["goal"] = study.goal(row, dpo)
                row["break_even"] = study.break_even(row, dpo, row["goal"]["reaches"])

    summary = {"quick": args.quick, "steps": study.steps, "batch": study.batch, "pairs": study.pairs,
               "seeds": study.seeds, "samples": study.samples, "curve_samples": study.curve_samples,
               "settings": SETTINGS, "fill_seconds": fill_seconds, "candidates": choices, "report": report,
               "cold_runs": cold, "timing_rounds": study.rounds, "timing": study.seconds,
               "total_seconds": time.perf_counter() - started,
               "runs": {name: {"spec": r["spec"], "measures": r["measures"],
                               "metrics": {s: {k: m.get(k) for k in ("loss", "margin", "grad_norm", "saturated",
                                                                     "implicit_accuracy", "elapsed_s", "cache_hits",
                                                                     "cache_misses", "encoding_cache_hits",
                                                                     "encoding_cache_misses")}
                                           for s, m in r["metrics"].items()}} for name, r in records.items()}}
    results = Path(args.results_dir)
    results.mkdir(parents=True, exist_ok=True)
    name = "efficiency_quick" if args.quick else "efficiency"  # a smoke run never replaces the study's files
    (results / f"{name}.json").write_text(json.dumps(summary))
    lines = write_tables(study, summary)
    (results / f"{name}.md").write_text("\n".join(lines) + "\n")
    plot(report, results / f"{name}.png")
    print("\n".join(lines))


def write_tables(study, summary):
    lines = [
        "Toys of the colour task (`toy_task.py`; red preferred for \"a square\"): \"colour\", alignment.py's "
        "SDXL-shaped toy (weight decay 1e-2), and \"flow\", flow_alignment.py's SD3-shaped rectified flow (no weight "
        f"decay). Each run: {study.steps} AdamW steps of {study.batch} pairs ({study.pairs} distinct pairs, none "
        "repeated), guidance 1, constant lr, fp32, a warm float32 cache, one CPU thread (two runs at a time). Beta "
        "and learning rate as those studies chose them, not tuned again here: "
        + "; ".join(f"{toy}: " + ", ".join(f"{loss} beta {beta:g}, lr {lr:g}" for loss, (beta, lr) in losses.items())
                    for toy, losses in SETTINGS.items())
        + ". The anchored form uses official weights; M of N: the policy at M of the N inversion steps per pair. "
        f"Effect = red rate trained for red minus trained against it, in points, on {study.samples} samples "
        f"({study.curve_samples} at earlier checkpoints). Training seconds: the trainer's `elapsed_s` (its loop "
        f"alone) in timing runs apart, one at a time with no checkpoint before the last, the median of {study.rounds} "
        "per configuration, the configurations taking turns; a fill's seconds: its whole process, start-up "
        "included, also alone. "
        + (f"Runs that missed the cache (their seconds are not warm): {', '.join(summary['cold_runs'])}."
           if summary["cold_runs"] else "Every run's steps read a warm cache (no cache misses)."),
        "", "1. Cache fills, one float32 cache per toy, loss and N (the encodings are not shared between them: each "
        "fill starts from nothing):", "", "| toy | loss | N | seconds |", "|---|---|---|---|"]
    lines += [f"| {toy} | {loss} | {n} | {summary['fill_seconds'][fill_key(toy, loss, n)]:.0f} |"
              for toy, loss, n in study.fills()]
    lines += candidate_tables(summary)
    lines += [f"3. Report: training seeds {summary['seeds']}, sampling seed {REPORT_SEED}; effect mean ± 95% "
              "t-interval. At M = 1 the weighted and stratified draws are one draw (a single block: the whole "
              "schedule, proportional to w_i), so their runs coincide.", ""]
    for toy, rows in summary["report"].items():
        lines += [f"{toy} toy:", ""] + report_table(rows) + ["", "Effect along training (points; training seconds "
                                                             "in brackets, mean over runs):", ""]
        lines += curve_table(study, rows) + [""]
    return lines + goal_table(summary["report"]) + cost_table(study, summary["report"]) + [
        "", f"Study time {summary['total_seconds']:.0f} s (this invocation; finished fills and runs are reused)."]


def candidate_tables(summary):
    lines = ["", f"2. Candidates (training seed 0, sampling seed {VALIDATION_SEED}): the first checkpoint whose effect "
             "comes within 5 points of diffusion_dpo's final effect, and its training seconds.", ""]
    for toy, choice in summary["candidates"].items():
        lines += [f"{toy} toy: diffusion_dpo's final validation effect {100 * choice['dpo_effect']:+.1f}.", "",
                  "| candidate | final effect | reaches at step | seconds | s / step |", "|---|---|---|---|---|"]
        for scored in choice["candidates"]:
            reach, last = scored["reaches"], scored["curve"][-1]
            mark = " (chosen)" if scored["spec"] == choice["chosen"] else ""
            lines.append(f"| {label(scored['spec'])}{mark} | {100 * scored['final']:+.1f} | "
                         + (f"{reach['step']} | {reach['seconds']:.1f}" if reach else "never | -")
                         + f" | {last['seconds'] / last['step']:.2f} |")
        lines.append("")
    return lines


def report_table(rows):
    lines = ["| configuration | role | effect | per seed | for / against (%) | held-out loss | held-out implicit acc. "
             "| saturated at end | s / run | s / step |", "|---|---|---|---|---|---|---|---|---|---|"]
    for name, row in rows.items():
        accuracy = row["heldout_implicit_accuracy"]
        lines.append(f"| {name} | {', '.join(row['roles'])} | {fmt(row['effect'])} | "
                     f"{', '.join(f'{100 * e:+.0f}' for e in row['effects'])} | "
                     f"{'/'.join(f'{100 * v:.0f}' for v in row['rate_for'])} vs "
                     f"{'/'.join(f'{100 * v:.0f}' for v in row['rate_against'])} | {row['heldout_loss']:.4f} | "
                     f"{'-' if np.isnan(accuracy) else f'{accuracy:.2f}'} | {row['saturated_final']:.2f} | "
                     f"{row['seconds']:.1f} | {row['seconds_per_step']:.2f} |")
    return lines


def curve_table(study, rows):
    lines = ["| configuration | " + " | ".join(f"step {s} ({s * study.batch} pairs)" for s in study.curve) + " |",
             "|---|" + "---|" * len(study.curve)]
    return lines + [f"| {name} | " + " | ".join(f"{fmt(p['effect'])} ({p['seconds']:.1f} s)" for p in row["curve"])
                    + " |" for name, row in rows.items()]


def goal_table(report):
    lines = ["The goal: diffusion_dpo's final mean effect within 5 points, with an interval above 0, in at most half "
             "its training seconds for all steps, with a held-out loss no worse than diffusion_dpo's final one at the "
             "checkpoint that reaches the effect (the model one would stop at; goal met). The held-out loss after all "
             "40 steps, when the form has kept moving past diffusion_dpo's effect, is compared in the column before.",
             "", "| toy | configuration | reaches at step | seconds | fraction of diffusion_dpo's | held-out loss there "
             "| no worse there | no worse after all steps | goal met |", "|---|---|---|---|---|---|---|---|---|"]
    for toy, rows in report.items():
        dpo = rows[DPO]
        lines.append(f"| {toy} | diffusion_dpo: effect {fmt(dpo['effect'])} in {dpo['seconds']:.1f} s, held-out loss "
                     f"{dpo['heldout_loss']:.4f} | - | - | - | - | - | - | - |")
        for name, row in rows.items():
            if name == DPO:
                continue
            goal, reach = row["goal"], row["goal"]["reaches"]
            lines.append(f"| {toy} | {name} | "
                         + (f"{reach['step']} | {reach['seconds']:.1f} | {goal['fraction']:.2f} | "
                            f"{goal['heldout_at_reach']:.4f}" if reach else "never | - | - | -")
                         + f" | {yes(goal['heldout_at_reach_ok'])} | {yes(goal['heldout_ok'])} | {yes(goal['met'])} |")
    return lines


def yes(flag):
    return "yes" if flag else "no"


def cost_table(study, report):
    lines = ["", "End to end: fill seconds + training seconds, and the break-even against diffusion_dpo (with its own "
             "warm cache): k* = (F - F_dpo) / (T_dpo - T), F a fill's seconds, T the training seconds of one unit, "
             f"an epoch ({study.pairs} pairs = {study.pairs // study.batch} steps at the run's mean seconds per step) "
             "or a sweep run sharing the cache (the form's seconds to diffusion_dpo's final effect, as in the goal, "
             "against diffusion_dpo's for all its steps). After k* epochs or runs the form's fill and training "
             "together have cost no more than diffusion_dpo's; 0: from the first; never: a unit costs the form no "
             "less than diffusion_dpo's.", "",
             "| toy | configuration | fill s | fill + all steps, s | fill + to diffusion_dpo's effect, s | "
             "break-even, epochs | break-even, runs |", "|---|---|---|---|---|---|---|"]
    for toy, rows in report.items():
        for name, row in rows.items():
            fill, even = row["fill_seconds"], row.get("break_even", {})
            reach = row["goal"]["reaches"] if name != DPO else {"seconds": row["seconds"]}
            to_effect = f"{fill + reach['seconds']:.0f}" if reach else "not reached"
            lines.append(f"| {toy} | {name} | {fill:.0f} | {fill + row['seconds']:.0f} | {to_effect} | "
                         f"{units(even.get('epochs', '-'))} | {units(even.get('runs', '-'))} |")
    return lines


def units(k):
    """A break-even for the table: a number of units, 'never' (None), or a note as it is."""
    return k if isinstance(k, str) else "never" if k is None else f"{k:.1f}"


def plot(report, path):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    axes_of = (("step", "optimiser steps"), ("pairs", "pairs seen"), ("seconds", "training seconds (warm cache)"))
    figure, axes = plt.subplots(len(report), 3, figsize=(16, 4.5 * len(report)), sharey=True, squeeze=False)
    names = list(dict.fromkeys(name for rows in report.values() for name in rows))
    colours = {name: f"C{i % 10}" for i, name in enumerate(names)}  # one colour per configuration in every panel
    for ax_row, (toy, rows) in zip(axes, report.items()):
        for ax, (key, title) in zip(ax_row, axes_of):
            for name, row in rows.items():
                alignment.plot_effect(ax, row["curve"], key, label=f"{name} ({', '.join(row['roles'])})",
                                      color=colours[name])
            ax.axhline(0, color="grey", linewidth=0.8)
            ax.set_xlabel(title)
            ax.set_title(f"{toy} toy")
            ax.grid(alpha=0.3)
        ax_row[0].set_ylabel("preference effect (points; 95% interval over seeds)")
        ax_row[0].legend(fontsize=7, loc="lower right")
    figure.tight_layout()
    figure.savefig(path, dpi=110)


if __name__ == "__main__":
    main()
