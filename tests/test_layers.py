"""Layering, read from the source: every import of every module (lazy ones inside functions too).

The layer table (docs/ARCHITECTURE.md) as data: a module may import piaa-dist modules of its
own layer or of the layers below it, never above; the math, results and training layers never
import ray, mlflow or boto3 (the data plane may use boto3, only the orchestration layer and the
entry points Ray and MLflow); nothing below the entry points imports ``piaa_dist.commands`` or
``piaa_dist.cli``; and no module imports another module's private (``_name``) names, with
``from m import _x`` or ``m._x``.

Reading imports with :mod:`ast` (instead of importing the modules and looking at
``sys.modules``) sees imports that only run inside a function, the usual way this code base
keeps heavy dependencies lazy, and needs no module to run. A second test keeps the fresh-
interpreter probe for the math layer, which also catches an import that arrives indirectly.
"""

from __future__ import annotations

import ast
import json
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PACKAGE = ROOT / "piaa_dist"

#: Layers from the bottom up; a module's layer is the first rule its dotted name matches.
LAYERS: tuple[tuple[str, tuple[str, ...]], ...] = (
    ("foundation", ("piaa_dist", "piaa_dist.config", "piaa_dist.errors", "piaa_dist.redact")),
    ("math", ("piaa_dist.model", "piaa_dist.meta", "piaa_dist.metrics", "piaa_dist.gpu",
              "piaa_dist.data.decode", "piaa_dist.data.synth", "piaa_dist.data.scaleworld")),
    ("results", ("piaa_dist.results", "piaa_dist.presentation")),
    ("data", ("piaa_dist.storage", "piaa_dist.s3local", "piaa_dist.data")),
    ("training", ("piaa_dist.train", "piaa_dist.protocol", "piaa_dist.evaluate",
                  "piaa_dist.personalize", "piaa_dist.giaa", "piaa_dist.checkpoint",
                  "piaa_dist.schedule", "piaa_dist.reference")),
    ("orchestration", ("piaa_dist.orchestration",)),
    ("api", ("piaa_dist.api",)),
    ("entry", ("piaa_dist.cli", "piaa_dist.commands")),
)
RANK = {name: i for i, (name, _) in enumerate(LAYERS)}
#: Third-party packages a layer must never import (the entry points and orchestration may).
FORBIDDEN = {
    "foundation": {"ray", "mlflow", "boto3", "botocore", "torch"},
    "math": {"ray", "mlflow", "boto3", "botocore"},
    "results": {"ray", "mlflow", "boto3", "botocore", "torch"},
    "data": {"ray", "mlflow"},
    "training": {"ray", "mlflow", "boto3", "botocore"},
}


def layer_of(module: str) -> str:
    """The layer of a piaa_dist module (longest matching rule wins)."""
    best, best_len = None, -1
    for layer, prefixes in LAYERS:
        for p in prefixes:
            # "piaa_dist" itself is the package's __init__ only: a new module must be placed.
            covers = module == p or (p != "piaa_dist" and module.startswith(p + "."))
            if covers and len(p) > best_len:
                best, best_len = layer, len(p)
    if best is None:
        raise AssertionError(f"{module}: in no layer of the table; add it to LAYERS")
    return best


@dataclass(frozen=True)
class Violation:
    module: str
    line: int
    message: str

    def __str__(self) -> str:
        return f"{self.module}:{self.line}: {self.message}"


def _resolve(module: str, is_package: bool, node: ast.ImportFrom) -> str:
    """The absolute module an ``ImportFrom`` names (relative imports resolved)."""
    if not node.level:
        return node.module or ""
    parts = module.split(".")
    base = parts if is_package else parts[:-1]
    base = base[: len(base) - (node.level - 1)]
    return ".".join(base + ([node.module] if node.module else []))


def check_source(module: str, source: str, *, is_package: bool = False,
                 known_modules: frozenset[str] = frozenset()) -> list[Violation]:
    """Every layering rule broken by one module's source (``module`` is its dotted name)."""
    tree = ast.parse(source)
    own = layer_of(module)
    out: list[Violation] = []
    aliases: dict[str, str] = {}  # local name -> piaa_dist module it is bound to

    def imported(target: str, line: int) -> None:
        top = target.split(".")[0]
        if top in FORBIDDEN.get(own, set()):
            out.append(Violation(module, line, f"{own} layer imports {target}"))
        if top != "piaa_dist" or target == module:
            return
        if target.startswith(("piaa_dist.commands", "piaa_dist.cli")) and own != "entry":
            out.append(Violation(module, line, f"imports the entry point {target}"))
        other = layer_of(target)
        if RANK[other] > RANK[own]:
            out.append(Violation(module, line, f"{own} layer imports {target} ({other} layer)"))

    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            for a in node.names:
                imported(a.name, node.lineno)
                if a.name.startswith("piaa_dist"):
                    aliases[a.asname or a.name.split(".")[0]] = a.asname and a.name or "piaa_dist"
        elif isinstance(node, ast.ImportFrom):
            target = _resolve(module, is_package, node)
            imported(target, node.lineno)
            for a in node.names:
                sub = f"{target}.{a.name}"
                if sub in known_modules:  # `from piaa_dist import meta`: a module, not a name
                    imported(sub, node.lineno)
                    aliases[a.asname or a.name] = sub
                elif (target.startswith("piaa_dist") and target != module and a.name.startswith("_")
                      and not a.name.startswith("__")):
                    out.append(Violation(module, node.lineno, f"imports private name {target}.{a.name}"))
    for node in ast.walk(tree):
        if (isinstance(node, ast.Attribute) and isinstance(node.value, ast.Name)
                and node.value.id in aliases and node.attr.startswith("_")
                and not node.attr.startswith("__")):
            out.append(Violation(module, node.lineno,
                                 f"uses private name {aliases[node.value.id]}.{node.attr}"))
    return out


def package_modules() -> dict[str, tuple[Path, bool]]:
    """Dotted name -> (file, is_package) of every module of the package."""
    found = {}
    for path in sorted(PACKAGE.rglob("*.py")):
        rel = path.relative_to(ROOT).with_suffix("")
        parts = list(rel.parts)
        is_package = parts[-1] == "__init__"
        if is_package:
            parts = parts[:-1]
        found[".".join(parts)] = (path, is_package)
    return found


def test_every_module_respects_the_layer_table():
    modules = package_modules()
    known = frozenset(modules)
    assert len(modules) > 40, "the package was not found"
    violations = [
        str(v)
        for name, (path, is_package) in modules.items()
        for v in check_source(name, path.read_text(), is_package=is_package, known_modules=known)
    ]
    assert not violations, "\n".join(violations)


def test_jobs_stay_thin_and_use_the_entry_points():
    """``jobs/*.py`` build their command's own parser; they import no library layer directly."""
    for path in sorted((ROOT / "jobs").glob("*.py")):
        imports = {
            (n.module or "") if isinstance(n, ast.ImportFrom) else a.name
            for n in ast.walk(ast.parse(path.read_text()))
            if isinstance(n, (ast.Import, ast.ImportFrom))
            for a in (n.names if isinstance(n, ast.Import) else [None])
        }
        ours = {m for m in imports if m.startswith("piaa_dist")}
        assert ours and all(m.startswith(("piaa_dist.commands", "piaa_dist.cli")) for m in ours), (path, ours)


@pytest.mark.parametrize(
    ("module", "source", "expected"),
    [
        # `import ray` added to the meta-gradient module
        ("piaa_dist.meta", "import torch\nimport ray\n", "math layer imports ray"),
        # ...also when it is lazy, inside a function
        ("piaa_dist.meta", "def f():\n    import mlflow.pytorch\n", "math layer imports mlflow.pytorch"),
        ("piaa_dist.train", "def f():\n    from ray import train\n", "training layer imports ray"),
        # the orchestration layer reaching back up to the commands
        ("piaa_dist.orchestration.demo", "from piaa_dist.commands import train\n",
         "imports the entry point piaa_dist.commands"),
        ("piaa_dist.orchestration.demo", "def f():\n    from piaa_dist.cli import main\n",
         "imports the entry point piaa_dist.cli"),
        # a lower layer importing a higher one
        ("piaa_dist.evaluate", "from piaa_dist.orchestration.tracking import client\n",
         "training layer imports piaa_dist.orchestration.tracking (orchestration layer)"),
        ("piaa_dist.data.stream", "from .. import train\n",
         "data layer imports piaa_dist.train (training layer)"),
        # private names of other modules, both spellings
        ("piaa_dist.orchestration.tune", "from piaa_dist.orchestration.tracking import _client\n",
         "imports private name piaa_dist.orchestration.tracking._client"),
        ("piaa_dist.orchestration.tune",
         "from piaa_dist.orchestration import ray_train\nray_train._use_gpu(1)\n",
         "uses private name piaa_dist.orchestration.ray_train._use_gpu"),
    ],
)
def test_the_checker_catches_each_kind_of_breakage(module, source, expected):
    known = frozenset(package_modules())
    found = [v.message for v in check_source(module, source, known_modules=known)]
    assert expected in found, found


def test_a_new_module_must_be_placed_in_the_table():
    with pytest.raises(AssertionError, match="in no layer"):
        layer_of("piaa_dist.somewhere_new")


def test_the_checker_accepts_what_the_table_allows():
    known = frozenset(package_modules())
    ok = {
        "piaa_dist.meta": "from piaa_dist.config import MetaConfig\nimport torch\n",
        "piaa_dist.evaluate": "from piaa_dist.data.stream import Dataset\nfrom piaa_dist import protocol\n",
        "piaa_dist.orchestration.usecases": "import ray\nimport mlflow\nfrom piaa_dist.train import meta_train\n",
        "piaa_dist.commands.train": "from piaa_dist.orchestration.usecases import train\n",
        "piaa_dist.orchestration.ray_train": "from piaa_dist.orchestration.step_hook import StepHook\n",
    }
    for module, source in ok.items():
        assert check_source(module, source, known_modules=known) == [], module


MATH_MODULES = ["piaa_dist.model", "piaa_dist.meta", "piaa_dist.metrics", "piaa_dist.data.decode",
                "piaa_dist.data.synth", "piaa_dist.data.scaleworld"]
PROBED = ["ray", "mlflow", "boto3", "botocore"]


def _loaded_after_import(modules: list[str], setup: str = "") -> list[str]:
    code = (
        "import importlib, json, sys\n"
        f"for m in {modules!r}: importlib.import_module(m)\n"
        f"{setup}"
        f"print(json.dumps([m for m in {PROBED!r} if m in sys.modules]))\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300,
                         cwd=ROOT)
    assert out.returncode == 0, out.stderr
    return json.loads(out.stdout.strip().splitlines()[-1])


def test_math_layer_imports_no_orchestration_or_storage_at_run_time():
    """The fresh-interpreter probe: nothing pulls Ray, MLflow or boto3 in indirectly either."""
    assert _loaded_after_import(MATH_MODULES) == []


def test_the_probe_can_fail():
    """The same probe sees boto3 when a data-plane module that uses it is imported and used."""
    setup = ("from piaa_dist.storage import open_store\n"
             "open_store('s3://bucket-x/p', 'http://127.0.0.1:1').client\n")
    assert "boto3" in _loaded_after_import(["piaa_dist.storage"], setup)
