"""What an optimiser step costs, measured where it runs: seconds, peak memory per step and per phase, FLOPs and
model FLOP utilisation.

Shared by the trainer (metrics.jsonl rows, memory_phases.jsonl) and benchmarks/step_bench.py, so that both count the
same FLOPs: torch.utils.flop_counter over a step, less the forward passes that gradient checkpointing recomputes
during backward ("model FLOPs"; with them, "executed FLOPs"). MFU = model FLOPs per step / seconds per step / the
card's dense bf16 peak.

The trainer counts FLOPs only where an MFU can come of them (a CUDA card in the table below, or --peak_tflops): a
counted step rounds differently from an uncounted one (resumed and compiled CPU runs stopped matching plain ones bit
for bit), presumably because the counter, a dispatch mode, changes which kernels run.
"""

import contextlib
import json
import time

import torch

# Dense (not sparse) bf16 tensor-core peaks, TFLOP/s, from the vendors' data sheets; the first name found in
# torch.cuda.get_device_name() wins, so the more specific names come first.
DENSE_BF16_TFLOPS = (
    ("H100 PCIe", 756.0),
    ("H100 NVL", 835.0),
    ("GH200", 989.4),
    ("H200", 989.4),
    ("H100", 989.4),  # SXM
    ("A100", 312.0),
    ("L40S", 362.1),
    ("L4", 121.0),
)
GIB = 2**30


def peak_tflops(device, override=None):
    """The dense bf16 peak of `device` in TFLOP/s: `override` if given, else the table's entry for a CUDA card's name;
    None when unknown (a CPU, an unlisted card)."""
    if override is not None:
        return override
    if device.type != "cuda":
        return None
    name = torch.cuda.get_device_name(device)
    return next((tflops for key, tflops in DENSE_BF16_TFLOPS if key in name), None)


class FlopCount:
    """A context that counts the FLOPs run inside it (every micro-batch of a step, for example): `model` (a diffusers
    model, or None) has its gradient checkpointing function swapped for one that reads the counter around each
    block's recomputation in backward, so `model_flops` leaves the recomputation out and `executed_flops` keeps it."""

    def __init__(self, model=None):
        from torch.utils.flop_counter import FlopCounterMode

        self.model = model
        self.counter = FlopCounterMode(display=False)  # entering it again starts from 0: `executed` adds up
        self.executed, self.recomputed = 0, 0

    def _counting_checkpoint(self, block, *args):
        from torch.utils.checkpoint import checkpoint

        runs = [0]

        def run(*inputs):
            runs[0] += 1
            if runs[0] == 1:  # the forward pass
                return block(*inputs)
            before = self.counter.get_total_flops()  # the recomputation, in backward (it may stop early)
            try:
                return block(*inputs)
            finally:
                self.recomputed += self.counter.get_total_flops() - before

        return checkpoint(run, *args, use_reentrant=False)

    def _checkpointing(self):
        return self.model is not None and getattr(self.model, "is_gradient_checkpointing", False)

    def __enter__(self):
        if self._checkpointing():
            self.model.enable_gradient_checkpointing(self._counting_checkpoint)
        self.counter.__enter__()
        return self

    def __exit__(self, *exc):
        self.executed += self.counter.get_total_flops()
        self.counter.__exit__(*exc)
        if self._checkpointing():
            self.model.enable_gradient_checkpointing()  # back to diffusers' own checkpoint function
        return False

    @property
    def executed_flops(self):
        return self.executed

    @property
    def model_flops(self):
        return self.executed - self.recomputed


class PhaseLog:
    """Seconds and CUDA peak memory of each named phase of a run (model load, reference load, encoding, inversion or
    cache read, loss pass, backward, optimiser step, checkpoint save, validation) while it is open: one JSON line per
    phase in `path` and in the log. The allocator's peak is reset at each phase's start; the peaks it held before are
    kept in `folded`, so that a StepMeter spanning several phases still reads the whole step's peak. On a CPU the
    memory fields are null and the seconds are still recorded. `phase` is a no-op while the log is closed."""

    def __init__(self):
        self.device, self.path, self.logger = None, None, None
        self.step, self.steps, self.seen = None, 0, set()  # step: the optimiser step running (None: setup)
        self.running = []  # the phases under way, outermost first, recorded or not
        self.failed_in = None  # the innermost phase an exception left, for the failure's message
        self.folded = [0, 0]  # allocated, reserved bytes: the largest peaks read since the step began

    def open(self, device, path=None, logger=None, steps=2):
        """Record every phase of the setup and of the first `steps` optimiser steps, then each phase the first time
        it runs (a checkpoint save, a validation); `path`, `logger`: where rows go (None: nowhere, for the processes
        other than the main one)."""
        self.device, self.path, self.logger, self.steps, self.seen = device, path, logger, steps, set()

    def close(self):
        self.device = None

    def recording(self, name):
        return self.device is not None and (self.step is None or self.step <= self.steps or name not in self.seen)

    @property
    def cuda(self):
        return self.device is not None and self.device.type == "cuda"

    def peaks(self, device=None):
        """The largest allocated and reserved bytes since the step began, across the phases' resets (on `device`,
        default the log's)."""
        device = device or self.device
        return (max(self.folded[0], torch.cuda.max_memory_allocated(device)),
                max(self.folded[1], torch.cuda.max_memory_reserved(device)))

    @contextlib.contextmanager
    def phase(self, name):
        self.running.append(name)
        try:
            with self._recorded(name):
                yield
        except BaseException:
            self.failed_in = self.failed_in or name  # the innermost: the first phase the exception leaves
            raise
        finally:
            self.running.pop()

    @contextlib.contextmanager
    def _recorded(self, name):
        if not self.recording(name):
            yield
            return
        self.seen.add(name)
        if self.cuda:
            torch.cuda.synchronize(self.device)
            self.folded = list(self.peaks())
            torch.cuda.reset_peak_memory_stats(self.device)
        started = time.perf_counter()
        try:
            yield
        finally:
            row = {"phase": name, "step": self.step, "seconds": None, "peak_allocated_gib": None,
                   "peak_reserved_gib": None, "allocated_after_gib": None}
            if self.cuda:
                torch.cuda.synchronize(self.device)
                allocated, reserved = self.peaks()
                self.folded = [allocated, reserved]
                row.update(peak_allocated_gib=torch.cuda.max_memory_allocated(self.device) / GIB,
                           peak_reserved_gib=torch.cuda.max_memory_reserved(self.device) / GIB,
                           allocated_after_gib=torch.cuda.memory_allocated(self.device) / GIB)
            row["seconds"] = time.perf_counter() - started
            self.write(row)

    def write(self, row):
        if self.path is not None:
            with open(self.path, "a") as f:
                f.write(json.dumps(row) + "\n")
        if self.logger is not None:
            memory = ("" if row["peak_allocated_gib"] is None else
                      f": peak {row['peak_allocated_gib']:.2f} GiB allocated, {row['peak_reserved_gib']:.2f} GiB "
                      f"reserved, {row['allocated_after_gib']:.2f} GiB held after")
            where = "" if row["step"] is None else f" (step {row['step']})"
            self.logger.info("phase %s%s: %.2f s%s", row["phase"], where, row["seconds"], memory)


PHASES = PhaseLog()  # the run's phase log: the trainer opens it for its setup and first steps


def phase(name):
    """`with phase("backward"): ...`: record the phase in the run's log while it is open."""
    return PHASES.phase(name)


class StepMeter:
    """Seconds and peak memory of each optimiser step, from its first micro-batch to its update (logging, checkpoints
    and validation left out): metrics.jsonl's seconds_per_step, and peak_memory_allocated_gib and
    peak_memory_reserved_gib, the CUDA allocator's peaks on this (the main) process since the step began; null on
    other devices, where they are not known. With the step's model FLOPs and the card's peak (TFLOP/s), the MFU."""

    def __init__(self, device, peak=None, phases=PHASES):
        self.device, self.cuda, self.started, self.peak = device, device.type == "cuda", None, peak
        self.phases = phases

    def start(self):
        """At each micro-batch; only the first of an optimiser step starts the clock."""
        if self.started is None:
            if self.cuda:
                self.phases.folded = [0, 0]  # a new step: forget the peaks its phases folded in
                torch.cuda.reset_peak_memory_stats(self.device)
            self.started = time.perf_counter()

    def stop(self, flops=None):
        """The step's row fields; `flops`: its model FLOPs on this process (None: not counted, MFU null)."""
        if self.cuda:
            torch.cuda.synchronize(self.device)  # the update's kernels are part of the step
        seconds, self.started = time.perf_counter() - self.started, None
        known = flops is not None and self.peak is not None
        row = {"seconds_per_step": seconds, "flops_per_step": flops,
               "mfu": flops / seconds / (self.peak * 1e12) if known else None,
               "peak_memory_allocated_gib": None, "peak_memory_reserved_gib": None}
        if self.cuda:
            allocated, reserved = self.phases.peaks(self.device)
            row["peak_memory_allocated_gib"], row["peak_memory_reserved_gib"] = allocated / GIB, reserved / GIB
        return row


MATMUL = ("gemm", "matmul", "aten::mm", "aten::addmm", "aten::bmm", "aten::baddbmm", "aten::linear", "cutlass",
          "cublas", "xmma", "sm90_", "sm80_", "aten::convolution", "conv", "wgrad", "dgrad")
ATTENTION = ("flash", "attention", "fmha", "scaled_dot_product", "sdpa")


def kernel_kind(name):
    """"attention", "matmul" (matrix products and convolutions) or "other", from a kernel's or op's name."""
    lowered = name.lower()
    if any(key in lowered for key in ATTENTION):
        return "attention"
    if any(key in lowered for key in MATMUL):
        return "matmul"
    return "other"


def profile_summary(averages, device_type, top=15):
    """The summary of a profiled step from torch.profiler's key_averages(): total self time, the `top` kernels (or
    ops, on a CPU) by self time with their share, and the shares of matmul, attention and everything else. On a CUDA
    card the device's self time is read, elsewhere the CPU's."""
    cuda = device_type == "cuda"

    def self_time(event):  # microseconds
        if cuda:
            return getattr(event, "self_device_time_total", None) or getattr(event, "self_cuda_time_total", 0)
        return event.self_cpu_time_total

    rows = [(event.key, self_time(event), event.count) for event in averages if self_time(event) > 0]
    total = sum(t for _, t, _ in rows) or 1
    shares = {"matmul": 0.0, "attention": 0.0, "other": 0.0}
    for name, t, _ in rows:
        shares[kernel_kind(name)] += t / total
    rows.sort(key=lambda row: -row[1])
    return {"device": device_type, "self_time_ms": total / 1000, "shares": shares,
            "top": [{"name": name, "self_time_ms": t / 1000, "share": t / total, "calls": count,
                     "kind": kernel_kind(name)} for name, t, count in rows[:top]]}


class StepProfile:
    """torch.profiler over one optimiser step (the trainer's --profile_step): start() before its first micro-batch,
    stop(folder) after its update writes profile_step_N.txt (the profiler's table) and profile_step_N.json
    (`profile_summary`)."""

    def __init__(self, step, device):
        self.step, self.device, self.profiler = step, device, None

    def start(self, step):
        if step != self.step or self.profiler is not None:
            return
        from torch.profiler import ProfilerActivity, profile

        activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if self.device.type == "cuda" else [])
        self.profiler = profile(activities=activities)
        self.profiler.__enter__()

    def stop(self, folder):
        if self.profiler is None:
            return None
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
        self.profiler.__exit__(None, None, None)
        averages = self.profiler.key_averages()
        sort = "self_cuda_time_total" if self.device.type == "cuda" else "self_cpu_time_total"
        (folder / f"profile_step_{self.step}.txt").write_text(averages.table(sort_by=sort, row_limit=40))
        summary = {"step": self.step, **profile_summary(averages, self.device.type)}
        (folder / f"profile_step_{self.step}.json").write_text(json.dumps(summary, indent=1))
        self.profiler = None
        return summary
