"""The use-case API and its entry points: one definition per command, the model references a
user naturally passes, ``train --alias``, help for users, the README's Python lines, and a demo
that leaves the checkout clean.

Real components: the tiny synthetic world ingested to a folder, in-process training, MLflow on
a SQLite file in the test's folder, the real CLI parsers and ``make -n``.
"""

from __future__ import annotations

import ast
import csv
import importlib.util
import re
import shutil
import subprocess
from pathlib import Path

import pytest

from piaa_dist import cli

REPO = Path(__file__).resolve().parents[1]
TINY = REPO / "jobs" / "configs" / "tiny.yaml"
JOBS = ("train", "tune", "evaluate", "personalize", "demo")
#: Sphinx/reST markup that means a developer docstring leaked into a user's terminal.
MARKUP = re.compile(r":(mod|func|class|meth|data|attr):`|``")


def _load_job(name: str):
    spec = importlib.util.spec_from_file_location(f"job_{name}", REPO / "jobs" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _subparser(name: str):
    parser = cli.build_parser([name])
    sub = next(a for a in parser._actions if a.dest == "command")
    return sub.choices[name]


def _flags(parser) -> dict[tuple[str, ...], object]:
    """Every argument (options by their strings, positionals by dest) → its default."""
    return {tuple(a.option_strings) or (a.dest,): a.default for a in parser._actions}


# ---------------------------------------------------------------------------------------------
# Entry points


@pytest.mark.parametrize("name", JOBS)
def test_each_job_parses_exactly_its_commands_flags(name):
    job = _load_job(name)
    job_flags, cmd_flags = _flags(job.build_parser()), _flags(_subparser(name))
    out_default = getattr(job, "OUT_DEFAULT", None)
    if out_default is not None:
        # the one documented difference: a job's --out has a default (its directory is temporary)
        assert cmd_flags.pop(("--out",)) is None and job_flags.pop(("--out",)) == out_default
    assert job_flags == cmd_flags
    # and the job runs the command's own code on what it parsed
    assert "job_main" in vars(job)


def _imports(path: Path) -> set[str]:
    names: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            names |= {a.name for a in node.names}
        elif isinstance(node, ast.ImportFrom) and node.module:
            names.add(node.module)
            names |= {f"{node.module}.{a.name}" for a in node.names}
    return names


def test_use_cases_sit_in_orchestration_and_nothing_below_or_beside_them_reaches_up():
    pkg = REPO / "piaa_dist"
    entry = ("piaa_dist.cli", "piaa_dist.commands", "piaa_dist.api")
    for path in pkg.rglob("*.py"):
        rel = path.relative_to(pkg).as_posix()
        if rel in ("cli.py", "api.py") or rel.startswith("commands/"):
            continue
        imported = _imports(path)
        up = sorted(m for m in imported if m.startswith(entry))
        assert not up, f"piaa_dist/{rel} imports entry points {up}"
        if not rel.startswith("orchestration/"):
            assert not any(m.startswith("piaa_dist.orchestration.usecases") for m in imported), rel
    # the demo runs the use-cases, not the commands
    assert any(m.startswith("piaa_dist.orchestration.usecases")
               for m in _imports(pkg / "orchestration" / "demo.py"))


@pytest.fixture
def help_text(capsys):
    def run(argv: list[str]) -> str:
        with pytest.raises(SystemExit) as done:
            cli.main(argv)
        assert done.value.code == 0
        return capsys.readouterr().out

    return run


def test_top_level_help_describes_the_tool_and_the_usual_sequence(help_text):
    text = help_text(["--help"])
    assert not MARKUP.search(text), text
    assert "personalized image aesthetics" in text
    # the typical sequence, in the order a user runs it
    positions = [text.index(f"piaa-dist {c} ") for c in ("synth", "ingest", "train", "evaluate", "personalize")]
    assert positions == sorted(positions)
    assert "README" in text and "-v" in text


@pytest.mark.parametrize("name", list(cli.COMMANDS))
def test_every_command_help_explains_it_without_developer_markup(help_text, name):
    text = help_text([name, "--help"])
    assert not MARKUP.search(text), text
    assert f"usage: piaa-dist {name}" in text
    # more than the one-line summary: what it does, and an example to copy
    description = text[text.index("\n\n"):text.index("options:")]
    assert len(description.split()) > 2 * len(cli.COMMANDS[name].split())
    assert re.search(rf"^\s+piaa-dist {name}\b", description, re.M), description


# ---------------------------------------------------------------------------------------------
# Model references and train --alias


@pytest.fixture(scope="module")
def trained(tmp_path_factory, tiny_dataset_url):
    """A ``train --out`` folder and the same model as a ``tune --out`` folder (best-model/)."""
    out = tmp_path_factory.mktemp("api-train")
    assert cli.main(["train", "--data", tiny_dataset_url, "--config", str(TINY), "--out", str(out / "run"),
                     "--workers", "0", "--no-mlflow"]) == 0
    sweep = out / "sweep"
    shutil.copytree(out / "run" / "model", sweep / "best-model")
    return out


def _registered(trained: Path, tmp_path: Path) -> tuple[str, str]:
    from piaa_dist.orchestration.usecases import register

    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    reg = register(trained / "run", name="blg-piaa-ref", alias="champion", mlflow_uri=uri)
    return reg.alias, uri


FORMS = ("model-folder", "train-out", "tune-out", "models-uri")


def _model_ref(form: str, trained: Path, tmp_path: Path) -> tuple[str, list[str]]:
    if form == "model-folder":
        return str(trained / "run" / "model"), []
    if form == "train-out":
        return str(trained / "run"), []
    if form == "tune-out":
        return str(trained / "sweep"), []
    alias, uri = _registered(trained, tmp_path)
    return alias, ["--mlflow-uri", uri]


@pytest.mark.parametrize("form", FORMS)
def test_evaluate_accepts_every_model_reference(form, trained, tiny_dataset_url, tmp_path):
    ref, extra = _model_ref(form, trained, tmp_path)
    out = tmp_path / "eval.json"
    rc = cli.main(["evaluate", "--data", tiny_dataset_url, "--model", ref, *extra, "--shots", "4",
                   "--repeats", "1", "--json", str(out), "--no-mlflow", "--no-progress",
                   "eval.methods=[blg-piaa]"])
    assert rc == 0
    from piaa_dist.results import EvaluationResult

    result = EvaluationResult.load(out)
    assert result.stats("blg-piaa", 4) is not None
    if form == "models-uri":
        assert result.model == ref
    else:  # provenance names the model folder actually used
        assert Path(result.model).name in ("model", "best-model")


def _ratings(world: Path, tmp_path: Path) -> tuple[Path, list[str]]:
    from piaa_dist.data.synth import RATINGS_FILE

    user = (world / "test_workers.csv").read_text().split()[1]
    rows = [r for r in csv.reader((world / RATINGS_FILE).open()) if r and r[0].strip() == user]
    path = tmp_path / "me.csv"
    path.write_text("image,score\n" + "".join(f"{r[1].strip()},{r[2].strip()}\n" for r in rows[:10]))
    return path, [str(world / "images" / r[1].strip()) for r in rows[10:14]]


@pytest.mark.parametrize("form", FORMS)
def test_personalize_accepts_every_model_reference(form, trained, tiny_world, tmp_path):
    ref, extra = _model_ref(form, trained, tmp_path)
    ratings, to_score = _ratings(tiny_world, tmp_path)
    out = tmp_path / "ranking.csv"
    rc = cli.main(["personalize", "--model", ref, *extra, "--ratings", str(ratings),
                   "--images", str(tiny_world / "images"), "--score", *to_score, "--out", str(out)])
    assert rc == 0
    assert len(out.read_text().splitlines()) == 1 + len(to_score)


def test_a_folder_that_holds_no_model_is_one_clear_error(tmp_path, tiny_dataset_url, caplog):
    (tmp_path / "empty").mkdir()
    rc = cli.main(["evaluate", "--data", tiny_dataset_url, "--model", str(tmp_path / "empty"), "--no-mlflow"])
    assert rc == 2
    message = " ".join(r.getMessage() for r in caplog.records if r.levelname == "ERROR")
    assert str(tmp_path / "empty") in message
    assert "model/" in message and "best-model/" in message and "train --out" in message


def test_train_alias_flag_registers_and_moves_the_alias(tiny_dataset_url, tmp_path):
    from piaa_dist.orchestration.tracking import resolve_model

    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    versions = []
    for i in range(2):
        rc = cli.main(["train", "--data", tiny_dataset_url, "--config", str(TINY), "--out",
                       str(tmp_path / f"run{i}"), "--workers", "0", "--mlflow-uri", uri,
                       "run.register_name=blg-piaa-alias", "--alias", "champion", "--force-alias"])
        assert rc == 0
        from mlflow import MlflowClient

        mv = MlflowClient(tracking_uri=uri).get_model_version_by_alias("blg-piaa-alias", "champion")
        versions.append(int(mv.version))
    # each run registered a new version and moved the alias to it (forced: the two runs tie on
    # the validation users, and without --force-alias a tie keeps the champion, see test_registry)
    assert versions == [1, 2]
    folder = resolve_model("models:/blg-piaa-alias@champion", uri=uri, dst=tmp_path / "dl")
    trained = tmp_path / "run1" / "model" / "model.safetensors"
    assert (folder / "model.safetensors").read_bytes() == trained.read_bytes()


def test_an_alias_that_cannot_move_is_an_error_not_ignored(tiny_dataset_url, tmp_path, caplog):
    rc = cli.main(["train", "--data", tiny_dataset_url, "--config", str(TINY), "--out", str(tmp_path / "r"),
                   "--workers", "0", "--no-mlflow", "--alias", "champion"])
    assert rc == 2
    assert "alias 'champion'" in caplog.text


# ---------------------------------------------------------------------------------------------
# The README's Python lines


def _readme_python_block() -> str:
    text = (REPO / "README.md").read_text()
    section = text[text.index("### From Python"):]
    start = section.index("```python\n") + len("```python\n")
    return section[start:section.index("\n```", start)]


def test_the_readmes_python_lines_run_on_the_tiny_world(tiny_world, tmp_path, monkeypatch):
    """The README block, with only its sizes and config swapped for the tiny world's."""
    from conftest import TINY_SPEC

    block = _readme_python_block()
    swaps = {
        'api.synth(out="world")': "api.synth(out=\"world\", users=%d, images=%d, seed=%d, test_fraction=%r, "
                                  "ratings_per_user=%r, image_size=%d)" % (
                                      TINY_SPEC.users, TINY_SPEC.images, TINY_SPEC.seed,
                                      TINY_SPEC.test_fraction, TINY_SPEC.ratings_per_user,
                                      TINY_SPEC.image_size),
        'config="jobs/configs/cpu.yaml"': f"config={str(TINY)!r}",
        "shots=[10, 100])": 'shots=[4], repeats=1, overrides=["giaa.steps=20", "giaa.batch_size=16"])',
    }
    for old, new in swaps.items():
        assert block.count(old) == 1, f"the README block no longer has {old!r}: update this test"
        block = block.replace(old, new)
    # the person's files the last lines name, from a test user of the same world
    monkeypatch.chdir(tmp_path)
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    ratings, to_score = _ratings(tiny_world, tmp_path)
    assert ratings == tmp_path / "me.csv"
    shutil.copytree(tiny_world / "images", tmp_path / "my_photos")
    (tmp_path / "new_photos").mkdir()
    for p in to_score:
        shutil.copy(p, tmp_path / "new_photos")

    namespace: dict = {}
    exec(compile(block, "README.md", "exec"), namespace)

    from piaa_dist.api import EvaluationResult, Ranking, TrainOutcome

    run, result, ranking = namespace["run"], namespace["result"], namespace["ranking"]
    assert isinstance(run, TrainOutcome) and run.step == 4 and run.model_dir == Path("run") / "model"
    assert isinstance(result, EvaluationResult) and result.stats("blg-piaa", 4) is not None
    assert result.giaa == "trained by evaluate"
    assert isinstance(ranking, Ranking) and len(ranking) == len(to_score)
    assert [s for _, s in ranking.ranked] == sorted((s for _, s in ranking.ranked), reverse=True)
    # and it was tracked like the commands track it: a SQLite MLflow store in the working folder
    assert (tmp_path / "mlflow.db").is_file()


# ---------------------------------------------------------------------------------------------
# make demo leaves the checkout clean


def _make_n(target: str) -> str:
    proc = subprocess.run(["make", "-n", target, "OUT=some-out"], cwd=REPO, capture_output=True,
                          text=True, timeout=60)
    assert proc.returncode == 0, proc.stderr
    return proc.stdout


@pytest.mark.skipif(shutil.which("make") is None, reason="needs make")
def test_make_demo_does_not_write_the_readme_and_readme_results_does():
    demo = [line for line in _make_n("demo").splitlines() if "piaa-dist demo" in line]
    assert demo and not any("README" in line or "--readme" in line for line in demo), demo
    copy = [line for line in _make_n("readme-results").splitlines() if "piaa_dist.orchestration.report" in line]
    assert copy and "some-out/readme-results.md" in copy[0] and "README.md" in copy[0]


def test_readme_results_copies_a_demos_block_between_the_markers(tmp_path):
    from piaa_dist.orchestration import report

    readme = tmp_path / "README.md"
    readme.write_text(f"intro\n{report.README_START}\nold\n{report.README_END}\nrest\n")
    block = tmp_path / "readme-results.md"
    block.write_text("| `blg-piaa` | 0.5 |\n")
    assert report.main([str(block), str(readme)]) == 0
    assert readme.read_text() == (f"intro\n{report.README_START}\n| `blg-piaa` | 0.5 |\n"
                                  f"{report.README_END}\nrest\n")
    # no block yet (make demo not run): an error, the README untouched
    before = readme.read_text()
    assert report.main([str(tmp_path / "missing.md"), str(readme)]) == 2
    assert readme.read_text() == before
