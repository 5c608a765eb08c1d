"""benchmarks/gpu_step.py runs (its CPU smoke mode), so it is ready when a GPU is lent."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def test_gpu_step_smoke_mode_reports_time_memory_and_flops(tmp_path):
    out = tmp_path / "gpu_step.json"
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}
    res = subprocess.run(
        [sys.executable, str(ROOT / "benchmarks" / "gpu_step.py"), "--smoke",
         "--variants", "gpu.yaml", "head", "--out", str(out)],
        capture_output=True, text=True, env=env, cwd=ROOT, timeout=600,
    )
    assert res.returncode == 0, res.stderr[-3000:]
    assert "TFLOP/s" in res.stdout and "peak GB" in res.stdout
    report = json.loads(out.read_text())
    assert report["setup"]["smoke"] is True and report["setup"]["device"] == "cpu"
    rows = {(r["variant"], r["support"]): r for r in report["rows"]}
    assert set(rows) == {(v, s) for v in ("gpu.yaml", "head") for s in (4, 8)}
    for r in rows.values():
        assert r["step_s"] > 0 and r["flops"] > 0 and r["tflops"] > 0
        assert r["peak_gb"] >= 0 and 0 < r["share_of_measured_peak"]
    for s in (4, 8):
        # Second order through the head alone (its backbone once per set) does less work than
        # through every parameter, and more support images are more work.
        assert rows[("head", s)]["flops"] < rows[("gpu.yaml", s)]["flops"]
    assert rows[("gpu.yaml", 8)]["flops"] > rows[("gpu.yaml", 4)]["flops"]
