"""What an optimiser step costs, measured where it runs: seconds and peak memory (the trainer's metrics.jsonl rows,
`StepMeter`) and FLOPs (`FlopCount`: torch.utils.flop_counter over a step, less the forward passes that gradient
checkpointing recomputes during backward, "model FLOPs"; with them, "executed FLOPs"; benchmarks/step_bench.py).

The trainer does not count FLOPs inside its steps: a counted step rounded differently from an uncounted one (resumed
and compiled runs stopped matching plain ones bit for bit in tests/test_train.py), presumably because the counter, a
dispatch mode, changes which kernels run.
"""

import time

import torch


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
    other devices, where they are not known."""

    def __init__(self, device):
        self.device, self.cuda, self.started = device, device.type == "cuda", None

    def start(self):
        """At each micro-batch; only the first of an optimiser step starts the clock."""
        if self.started is None:
            if self.cuda:
                torch.cuda.reset_peak_memory_stats(self.device)
            self.started = time.perf_counter()

    def stop(self):
        """The step's row fields."""
        if self.cuda:
            torch.cuda.synchronize(self.device)  # the update's kernels are part of the step
        seconds, self.started = time.perf_counter() - self.started, None
        row = {"seconds_per_step": seconds, "peak_memory_allocated_gib": None, "peak_memory_reserved_gib": None}
        if self.cuda:
            row["peak_memory_allocated_gib"] = torch.cuda.max_memory_allocated(self.device) / 2**30
            row["peak_memory_reserved_gib"] = torch.cuda.max_memory_reserved(self.device) / 2**30
        return row
