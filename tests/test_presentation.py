"""Tables and plots of results, from the typed result (one module renders them all).

The SROCC-vs-shots plot test moved here from ``tests/test_tracking.py`` with the function.
"""

from __future__ import annotations

import json
import subprocess
import sys
from dataclasses import replace

from pngcheck import assert_plot
from test_results import sample_result

from piaa_dist.metrics import Ceilings
from piaa_dist.orchestration.report import readme_block, update_readme
from piaa_dist.presentation import (
    format_table,
    markdown_table,
    plot_predicted_vs_true,
    plot_srocc_vs_shots,
    plot_training_curves,
    save_figure,
)


def test_plot_srocc_vs_shots_draws_methods_and_ceilings(tmp_path):
    result = sample_result()
    fig = plot_srocc_vs_shots(result)
    ax = fig.axes[0]
    labels = ax.get_legend_handles_labels()[1]
    assert {"blg-piaa", "giaa-finetune", "oracle (ceiling)", "average_user (ceiling)"} <= set(labels)
    flat_lines = [ln for ln in ax.get_lines() if len(set(ln.get_ydata())) == 1]
    assert {round(float(ln.get_ydata()[0]), 2) for ln in flat_lines} >= {0.83, 0.37}
    assert [int(t) for t in ax.get_xticks()] == [10, 100]
    path = save_figure(fig, tmp_path / "plots" / "f.png")
    assert path.read_bytes()[:4] == b"\x89PNG"
    assert_plot(path, (600, 400))  # 6 x 4 inches at 100 dpi, pixels that decode to a drawing
    # also from a JSON file, and without ceilings (data with no truth sidecar)
    replace(result, ceilings=None).save(tmp_path / "e.json")
    assert plot_srocc_vs_shots(tmp_path / "e.json").axes[0].get_legend_handles_labels()[1] == [
        "blg-piaa",
        "giaa-finetune",
    ]


def test_text_table_names_methods_shots_ceilings_pairs_and_skips():
    result = sample_result()
    table = format_table(result)
    lines = table.splitlines()
    assert "10-shot SROCC" in lines[0] and "100-shot SROCC" in lines[0]
    row = next(ln for ln in lines if ln.startswith("blg-piaa"))
    assert "0.410 ± 0.010" in row and "0.550 ± 0.010" in row
    assert "oracle (user's noise-free score) 0.830" in table and "1 constant-rating users left out" in table
    assert "paired blg-piaa vs giaa-finetune: 10-shot +0.080 [-0.100, +0.260] (2/2 users better)" in table
    assert "100-shot +0.080 [CI n/a] (1/1 users better)" in table
    assert "skipped (too few ratings): 1 users at 10 shots, 2 users at 100 shots" in table
    assert lines[-1].startswith("3 test users, 3 repeats, seed 0")
    # a method missing a shot count shows n/a
    partial = replace(result, methods={**result.methods, "meta-no-adapt": {10: result.methods["blg-piaa"][10]}})
    assert "n/a" in next(ln for ln in format_table(partial).splitlines() if ln.startswith("meta-no-adapt"))


def test_markdown_table_and_readme_block(tmp_path):
    result = sample_result()
    md = markdown_table(result)
    assert md.splitlines()[0] == "| method | SROCC 10-shot | PLCC 10-shot | SROCC 100-shot | PLCC 100-shot |"
    assert "| `blg-piaa` | 0.410 ± 0.010 | 0.430 | 0.550 ± 0.010 | 0.570 |" in md
    assert "| oracle ceiling (user's noise-free score) | 0.830 |  | 0.830 |  |" in md
    assert "- 10-shot: `blg-piaa` − `giaa-finetune` = +0.080 (95% CI -0.100 … +0.260; 2/2 test users better)" in md
    assert "- 100-shot: `blg-piaa` − `giaa-finetune` = +0.080 (95% CI n/a; 1/1 test users better)" in md
    # no truth sidecar / no user left for the ceilings: no ceiling rows
    assert "ceiling" not in markdown_table(replace(result, ceilings=None))
    assert "ceiling" not in markdown_table(replace(result, ceilings=Ceilings(None, None, 0, 2)))
    block = readme_block(result, 80)
    assert block.startswith("Measured by `make demo` (80 synthetic users, 3 repeats;") and md in block
    readme = tmp_path / "README.md"
    readme.write_text("intro\n<!-- demo-results:start -->\nold\n<!-- demo-results:end -->\nrest\n")
    assert update_readme(readme, block)
    text = readme.read_text()
    assert "old" not in text and md in text and text.endswith("rest\n")


def test_training_curves_and_predicted_vs_true(tmp_path):
    rows = [{"step": s, "query_loss": 1.0 / s, "support_loss": 1.2 / s} for s in (1, 2, 3)]
    rows[-1]["val_srocc"] = 0.3
    (tmp_path / "metrics.jsonl").write_text("\n".join(json.dumps(r) for r in rows) + "\n")
    fig = plot_training_curves(tmp_path / "metrics.jsonl")
    assert list(fig.axes[0].get_lines()[0].get_ydata()) == [1.0, 0.5, 1.0 / 3]
    assert list(fig.axes[1].get_lines()[0].get_ydata()) == [0.3]
    assert_plot(save_figure(fig, tmp_path / "curves.png"), (800, 350))
    assert plot_training_curves(tmp_path / "absent.jsonl").axes[0].get_lines()[0].get_xydata().size == 0
    fig = plot_predicted_vs_true([2.0, 3.5, 4.0], [1, 3, 5], "user u")
    assert fig.axes[0].get_title() == "user u"
    # the predicted scores are the y values, each against its own true rating (jitter on x only)
    xy = fig.axes[0].collections[0].get_offsets()
    assert list(xy[:, 1]) == [2.0, 3.5, 4.0]
    assert all(abs(x - t) <= 0.12 for x, t in zip(xy[:, 0], [1, 3, 5]))
    path = save_figure(fig, tmp_path / "p.png")
    assert path.stat().st_size > 1000
    assert_plot(path, (450, 400))


def test_presentation_and_results_import_no_mlflow_ray_torch_or_matplotlib():
    """Checked in a fresh interpreter: reading and rendering results needs none of them until
    a figure is drawn (matplotlib then, and still no MLflow or Ray)."""
    code = (
        "import json, sys\n"
        "import piaa_dist.presentation, piaa_dist.results\n"
        "heavy = ['mlflow', 'ray', 'torch', 'boto3', 'matplotlib']\n"
        "before = [m for m in heavy if m in sys.modules]\n"
        "sys.path.insert(0, 'tests')\n"
        "from test_results import sample_result\n"
        "piaa_dist.presentation.plot_srocc_vs_shots(sample_result())\n"
        "after = [m for m in heavy if m in sys.modules]\n"
        "print(json.dumps([before, after]))\n"
    )
    out = subprocess.run([sys.executable, "-c", code], check=False, capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr
    before, after = json.loads(out.stdout.strip().splitlines()[-1])
    assert before == []
    assert after == ["matplotlib"]
