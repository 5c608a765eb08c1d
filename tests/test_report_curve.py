"""The demo report's training curve shows the run to its plateau: the validation series, the
best validation checkpoint the run chose (the registered model) and the step it stopped at."""

from __future__ import annotations

import json

import numpy as np

from piaa_dist.presentation import plot_training_curves as plot_training_curve


def _write(path, rows):
    path.write_text("\n".join(json.dumps(r) for r in rows) + "\n")


def test_the_curve_marks_the_runs_own_best_checkpoint_and_its_stop(tmp_path):
    # min_delta 0.01: 0.605 at step 400 is not an improvement over 0.600 at step 300, so the
    # run's best is step 300 although 400 scored higher; the plot must star the run's choice.
    val = {100: 0.40, 200: 0.55, 300: 0.600, 400: 0.605, 500: 0.59, 600: 0.598}
    rows = []
    for step in range(20, 620, 20):
        row = {"step": step, "query_loss": 1.0 / step, "support_loss": 2.0 / step}
        if step in val:
            row.update(val_srocc=val[step], best_step=min(max(s for s in val if s <= step), 300))
        rows.append(row)
    rows[-1]["stopped_early"] = 1
    # a resumed run appends the steps it redoes: a step's last report wins, counted once (the
    # first attempt's step-100 report, before the redo's)
    rows.insert(4, {"step": 100, "query_loss": 9.0, "support_loss": 9.0, "val_srocc": 0.1, "best_step": 100})
    _write(tmp_path / "metrics.jsonl", rows)

    fig = plot_training_curve(tmp_path / "metrics.jsonl")
    ax = fig.axes[1]
    lines = {line.get_label(): line for line in ax.get_lines()}
    series = lines["validation SROCC"]
    assert list(series.get_xdata()) == sorted(val) and list(series.get_ydata()) == [val[s] for s in sorted(val)]
    star = next(line for label, line in lines.items() if label.startswith("best:"))
    assert list(star.get_xdata()) == [300] and list(star.get_ydata()) == [0.600]
    assert "step 300" in star.get_label() and "registered" in star.get_label()
    vertical = [line for line in ax.get_lines() if np.ptp(line.get_xdata()) == 0 and line is not star]
    assert [line.get_xdata()[0] for line in vertical] == [600]  # where early stopping fired
    assert any("stopped at 600" in t.get_text() for t in ax.texts)


def test_an_absent_metrics_file_gives_empty_axes(tmp_path):
    fig = plot_training_curve(tmp_path / "missing.jsonl")
    assert len(fig.axes) == 2 and not fig.axes[1].get_lines()
