"""Every job config loads, and its first line is the exact command that runs it."""

from __future__ import annotations

import shlex
from pathlib import Path

import pytest

from piaa_dist.config import load_config

ROOT = Path(__file__).resolve().parents[1]
CONFIGS = sorted((ROOT / "jobs" / "configs").glob("*.yaml"))


def test_there_are_configs():
    names = {p.name for p in CONFIGS}
    assert {"cpu.yaml", "gpu.yaml", "tiny.yaml"} <= names


@pytest.mark.parametrize("path", CONFIGS, ids=lambda p: p.name)
def test_config_loads(path):
    cfg = load_config(path)
    assert cfg.meta.meta_steps > 0
    assert cfg.meta.meta_batch > 0


@pytest.mark.parametrize("path", CONFIGS, ids=lambda p: p.name)
def test_first_line_is_the_command_that_runs_it(path):
    first = path.read_text().splitlines()[0]
    assert first.startswith("# "), f"{path.name}: first line must be a comment with the command"
    argv = shlex.split(first[2:])
    # The command names this very file as its config...
    assert "--config" in argv, first
    assert argv[argv.index("--config") + 1] == f"jobs/configs/{path.name}", first
    # ...and a script that exists in the repository (run from the repository root).
    scripts = [a for a in argv if a.endswith(".py")]
    assert scripts, f"{path.name}: the command runs no python script: {first}"
    assert (ROOT / scripts[0]).is_file(), f"{path.name}: {scripts[0]} does not exist"
    if argv[:3] == ["ray", "job", "submit"]:
        # `ray job submit ... -- python SCRIPT`: the entry point follows the separator.
        sep = argv.index("--")
        assert argv[sep + 1] == "python" and argv[sep + 2] == scripts[0], first


def test_gpu_config_is_the_papers_model():
    cfg = load_config(ROOT / "jobs" / "configs" / "gpu.yaml")
    assert cfg.model.backbone == "resnet18" and cfg.data.image_size == 224
    assert cfg.run.use_gpu == "yes"
    cpu = load_config(ROOT / "jobs" / "configs" / "cpu.yaml")
    assert cpu.run.use_gpu == "no" and cpu.run.workers * cpu.run.cpus_per_worker <= 2
