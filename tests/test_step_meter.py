"""step_meter.py: the profile summary's classification and shares, against a workload whose split is known."""

import pytest
import torch
from torch.profiler import ProfilerActivity, profile

import step_meter


def test_kernel_kinds():
    for name in ("aten::mm", "aten::addmm", "sm90_xmma_gemm_bf16bf16_bf16f32", "cutlass_80_tensorop_s1688gemm",
                 "aten::convolution"):
        assert step_meter.kernel_kind(name) == "matmul", name
    for name in ("aten::_scaled_dot_product_flash_attention", "flash_fwd_kernel", "fmha_cutlassF_bf16"):
        assert step_meter.kernel_kind(name) == "attention", name
    for name in ("aten::add_", "vectorized_elementwise_kernel", "aten::copy_", "aten::group_norm"):
        assert step_meter.kernel_kind(name) == "other", name


def test_profile_summary_splits_a_step_by_kind():
    torch.manual_seed(0)
    a, b = torch.randn(384, 384), torch.randn(384, 384)
    small = torch.randn(64)
    with profile(activities=[ProfilerActivity.CPU]) as prof:
        for _ in range(8):
            a @ b  # matmul: most of the time
        for _ in range(8):
            small.add_(1.0)  # other: a little
    summary = step_meter.profile_summary(prof.key_averages(), "cpu")
    assert sum(summary["shares"].values()) == pytest.approx(1.0)
    assert summary["shares"]["matmul"] > 0.5 and summary["shares"]["attention"] == 0
    top = summary["top"]
    assert [row["self_time_ms"] for row in top] == sorted((row["self_time_ms"] for row in top), reverse=True)
    assert top[0]["kind"] == "matmul"
    # the shares are the kinds' self times over the total, computed here from the same events
    events = [e for e in prof.key_averages() if e.self_cpu_time_total > 0]
    total = sum(e.self_cpu_time_total for e in events)
    matmul = sum(e.self_cpu_time_total for e in events if step_meter.kernel_kind(e.key) == "matmul")
    assert summary["shares"]["matmul"] == pytest.approx(matmul / total)
