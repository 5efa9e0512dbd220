"""Non-finite steps: skipped, counted, stopped after --max_nonfinite_steps in a row, never saved."""

import json
import math
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from safetensors.torch import load_file
from test_train import base_args, launch, pairs_dir  # noqa: F401  (pairs_dir is a fixture)

from train_inversion_dpo import apply_update, json_line


def strict_json(line):
    def refuse(constant):
        raise ValueError(f"not JSON: {constant}")

    return json.loads(line, parse_constant=refuse)


def checkpoint_weights(folder):
    return load_file(str(Path(folder) / "unet" / "diffusion_pytorch_model.safetensors"))


@pytest.mark.slow
def test_nonfinite_steps_stop_the_run_under_ddp_and_resume_from_the_last_good_checkpoint(tiny_sdxl_path, pairs_dir,
                                                                                      tmp_path):
    out = tmp_path / "run"
    # Step 1 is finite (policy == reference, loss log 2) but lr 1e4 throws the weights far off: from step 2 on the
    # loss is NaN. Two processes, so the stop must be a collective decision (no process may hang or go on alone).
    result = launch(base_args(tiny_sdxl_path, pairs_dir, out, "--loss_type", "inversion_dpo_exact",
                              "--learning_rate", "1e4", "--max_grad_norm", "0", "--max_train_steps", "6",
                              "--checkpointing_steps", "1", "--max_nonfinite_steps", "2"), processes=2, check=False)
    assert result.returncode != 0
    assert "2 steps in a row had a non-finite loss or gradient (--max_nonfinite_steps 2)" in result.stderr
    assert "--learning_rate" in result.stderr and "--mixed_precision bf16" in result.stderr
    for process in (0, 1):  # each process names the rows of its own pairs
        assert f"step 2: the loss or gradient is not finite; the update is skipped (1 in a row). Pairs on process " \
               f"{process}: rows [" in result.stderr
    lines = (out / "metrics.jsonl").read_text().splitlines()
    metrics = [strict_json(line) for line in lines]
    assert [m["step"] for m in metrics] == [1, 2, 3]
    assert abs(metrics[0]["loss"] - math.log(2)) < 1e-6
    assert [m["loss"] for m in metrics[1:]] == [None, None]
    assert [m["nonfinite_steps"] for m in metrics] == [0, 1, 2]
    # nothing written after the streak began, and what was written is finite
    assert not (out / "unet").exists()
    assert sorted(p.name for p in out.glob("checkpoint-*")) == ["checkpoint-1"]
    good = checkpoint_weights(out / "checkpoint-1")
    assert all(torch.isfinite(w).all() for w in good.values())

    resumed = launch(base_args(tiny_sdxl_path, pairs_dir, out, "--loss_type", "inversion_dpo_exact",
                               "--learning_rate", "1e-6", "--max_grad_norm", "0", "--max_train_steps", "2",
                               "--checkpointing_steps", "100", "--resume_from_checkpoint", "latest"), processes=2)
    assert f"resuming from {out / 'checkpoint-1'}" in resumed.stderr
    assert "replaced by --learning_rate 1e-06" in resumed.stderr
    step2 = strict_json((out / "metrics.jsonl").read_text().splitlines()[-1])
    assert step2["step"] == 2 and step2["lr"] == 1e-6
    final = checkpoint_weights(out)
    assert all(torch.isfinite(w).all() for w in final.values())
    if step2["loss"] is None:  # the weights of checkpoint-1 are still far off: the step was skipped, nothing moved
        assert all(torch.equal(final[name], good[name]) for name in good)


def test_metrics_lines_are_strict_json_for_any_value():
    line = json_line({"step": 3, "loss": float("nan"), "grad_norm": float("inf"), "margin": -float("inf"),
                      "lr": 1e-5, "epoch": 0})
    assert strict_json(line) == {"step": 3, "loss": None, "grad_norm": None, "margin": None, "lr": 1e-5, "epoch": 0}


def fp16_like_step(gradient_value):
    """One AdamW step of a parameter through `apply_update` with a loss scaler, as accelerate runs fp16: the
    gradient is scaled in backward and unscaled for clipping before the update is decided."""
    weight = torch.nn.Parameter(torch.ones(3))
    optimizer = torch.optim.AdamW([weight], lr=0.1)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: 1.0)
    scaler = torch.amp.GradScaler("cpu", init_scale=1024.0)
    scaler.scale((weight * gradient_value).sum()).backward()
    scaler.unscale_(optimizer)
    grad_norm = float(torch.nn.utils.clip_grad_norm_([weight], float("inf")))
    accelerator = SimpleNamespace(scaler=scaler)
    apply_update(accelerator, optimizer, scheduler, math.isfinite(grad_norm))
    return weight, optimizer, scaler, scheduler


def test_a_skipped_fp16_step_changes_nothing_and_lowers_the_loss_scale():
    weight, optimizer, scaler, scheduler = fp16_like_step(float("inf"))
    assert torch.equal(weight.detach(), torch.ones(3)) and weight.grad is None
    assert not optimizer.state  # no moment and no step count recorded
    assert scheduler.last_epoch == 0
    assert scaler.get_scale() == 512.0  # backed off by GradScaler's factor 0.5, ready for the next step

    weight, optimizer, scaler, scheduler = fp16_like_step(2.0)  # the finite case steps as usual
    assert not torch.equal(weight.detach(), torch.ones(3))
    assert int(optimizer.state[weight]["step"]) == 1 and scheduler.last_epoch == 1
    assert scaler.get_scale() == 1024.0
