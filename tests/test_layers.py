"""Layering: the math modules import without Ray, MLflow or boto3 (checked in a fresh interpreter)."""

from __future__ import annotations

import importlib.util
import json
import subprocess
import sys

import pytest

MATH_MODULES = [
    "piaa_dist.model",
    "piaa_dist.meta",
    "piaa_dist.metrics",
    "piaa_dist.data.decode",
    "piaa_dist.data.synth",
]
FORBIDDEN = ["ray", "mlflow", "boto3", "botocore"]


def test_math_layer_imports_no_orchestration_or_storage():
    present = [m for m in MATH_MODULES if importlib.util.find_spec(m) is not None]
    if not present:
        pytest.skip("no math module exists yet")
    code = (
        "import importlib, json, sys\n"
        f"for m in {present!r}: importlib.import_module(m)\n"
        f"print(json.dumps([m for m in {FORBIDDEN!r} if m in sys.modules]))\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr
    loaded = json.loads(out.stdout.strip().splitlines()[-1])
    assert loaded == [], f"math modules {present} pulled in {loaded}"


def test_the_check_can_fail():
    """The same probe sees boto3 when a data-plane module that uses it is imported."""
    code = (
        "import sys\n"
        "from piaa_dist.storage import open_store\n"
        "open_store('s3://bucket-x/p', 'http://127.0.0.1:1').client\n"
        "print('boto3' in sys.modules)\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip().splitlines()[-1] == "True"
