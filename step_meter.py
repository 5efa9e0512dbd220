"""What an optimiser step costs, measured where it runs: seconds, peak memory, FLOPs and model FLOP utilisation.

Shared by the trainer (its metrics.jsonl rows) and benchmarks/step_bench.py, so that both count the same FLOPs:
torch.utils.flop_counter over the step, less the forward passes that gradient checkpointing recomputes during
backward ("model FLOPs"; with them, "executed FLOPs"). MFU = model FLOPs per step / seconds per step / the card's
dense bf16 peak.
"""

import time

import torch

# Dense (not sparse) bf16 tensor-core peaks, TFLOP/s, from the vendors' data sheets; the first name found in
# torch.cuda.get_device_name() wins, so the more specific names come first.
DENSE_BF16_TFLOPS = (
    ("H100 PCIe", 756.0),
    ("H100 NVL", 835.0),
    ("H200", 989.4),
    ("H100", 989.4),  # SXM
    ("GH200", 989.4),
    ("A100", 312.0),
    ("L40S", 362.1),
    ("L4", 121.0),
)


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


class StepMeter:
    """Seconds and peak memory of each optimiser step, from its first micro-batch to its update (logging, checkpoints
    and validation left out): metrics.jsonl's seconds_per_step, and peak_memory_allocated_gib and
    peak_memory_reserved_gib, the CUDA allocator's peaks on this (the main) process since the step began; null on
    other devices, where they are not known. With the step's model FLOPs and the card's peak, the MFU."""

    def __init__(self, device, peak=None):
        self.device, self.cuda, self.started, self.peak = device, device.type == "cuda", None, peak

    def start(self):
        """At each micro-batch; only the first of an optimiser step starts the clock."""
        if self.started is None:
            if self.cuda:
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
            row["peak_memory_allocated_gib"] = torch.cuda.max_memory_allocated(self.device) / 2**30
            row["peak_memory_reserved_gib"] = torch.cuda.max_memory_reserved(self.device) / 2**30
        return row
