"""benchmarks/step_bench.py runs every schedule and writes the JSON lines its README table is made from."""

import json
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def test_step_bench_writes_one_json_line_per_configuration(tmp_path):
    out = tmp_path / "steps.jsonl"
    subprocess.run([sys.executable, str(ROOT / "benchmarks" / "step_bench.py"), "--inversion_steps", "4",
                    "--steps", "1", "--json", str(out)], check=True, cwd=ROOT, capture_output=True, text=True,
                   timeout=600)
    rows = [json.loads(line) for line in out.read_text().splitlines()]
    assert [(row["mode"], row["N"]) for row in rows] == [("released", 4), ("uncached", 4), ("cached", 4)]
    for row in rows:
        assert {"mode", "N", "seconds_per_step", "peak_memory_bytes", "unet_calls", "device"} <= set(row)
        assert row["seconds_per_step"] > 0 and row["peak_memory_bytes"] > 0
    calls = {(row["mode"], row["N"]): row["unet_calls"] for row in rows}
    # released: N inversion calls + one policy call holding every step; uncached (K = 1): N inversion calls, then
    # N policy calls without and N with gradient; cached: no inversion
    assert calls[("released", 4)] == 4 + 1
    assert calls[("uncached", 4)] == 4 + 4 + 4
    assert calls[("cached", 4)] == 4 + 4
