"""The demo's report: a Markdown page with the results table, plots and where to look next.

Everything here reads files the pipeline wrote (evaluate JSON, ``metrics.jsonl``, the
personalization CSV); nothing is typed in by hand, so the README's results table (written by
:func:`update_readme`) is always what the demo measured.
"""

from __future__ import annotations

import json
import logging
import re
from pathlib import Path
from typing import Any, Mapping, Sequence

log = logging.getLogger(__name__)

README_START = "<!-- demo-results:start -->"
README_END = "<!-- demo-results:end -->"
METHOD_ORDER = ("blg-piaa", "meta-no-adapt", "giaa-finetune", "giaa-no-adapt")


def _figure(width: float = 6.0, height: float = 4.0):
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(width, height), dpi=100)
    FigureCanvasAgg(fig)
    return fig


def results_table(result: Mapping[str, Any]) -> str:
    """Markdown table: methods × shots, SROCC mean ± spread over repeats, PLCC, ceilings, paired CI."""
    methods = result.get("methods") or {}
    shots = sorted({int(k) for rows in methods.values() for k in (rows or {})})
    names = [m for m in METHOD_ORDER if m in methods] + sorted(set(methods) - set(METHOD_ORDER))
    head = "| method | " + " | ".join(f"SROCC {k}-shot | PLCC {k}-shot" for k in shots) + " |"
    sep = "|---|" + "---|---|" * len(shots)
    lines = [head, sep]
    for name in names:
        cells = []
        for k in shots:
            row = (methods[name] or {}).get(str(k)) or {}
            if row.get("srocc_mean") is None:
                cells += ["–", "–"]
                continue
            cells.append(f"{row['srocc_mean']:.3f} ± {row.get('srocc_std') or 0.0:.3f}")
            cells.append(f"{row['plcc_mean']:.3f}" if row.get("plcc_mean") is not None else "–")
        lines.append(f"| `{name}` | " + " | ".join(cells) + " |")
    ceilings = result.get("ceilings") or {}
    for key, label in (("oracle", "oracle ceiling (user's noise-free score)"),
                       ("average_user", "average-user ceiling")):
        value = ceilings.get(key)
        if isinstance(value, (int, float)):
            lines.append(f"| {label} | " + " | ".join([f"{value:.3f}", ""] * len(shots)) + " |")
    out = "\n".join(lines)
    # evaluate's "paired": {"blg-piaa vs NAME": {k: {diff_mean, ci95, n_users, users_better}}}
    by_k = (result.get("paired") or {}).get("blg-piaa vs giaa-finetune") or {}
    notes = []
    for k in shots:
        d = by_k.get(str(k))
        if d and d.get("diff_mean") is not None:
            lo, hi = d["ci95"]
            notes.append(
                f"- {k}-shot: `blg-piaa` − `giaa-finetune` = {d['diff_mean']:+.3f} "
                f"(95% CI {lo:+.3f} … {hi:+.3f}; {d['users_better']}/{d['n_users']} test users better)"
            )
    if notes:
        out += "\n\n" + "\n".join(notes)
    return out


def plot_training_curves(metrics_jsonl: str | Path):
    """Meta-training curves (query/support loss and validation SROCC against meta-step)."""
    rows = []
    path = Path(metrics_jsonl)
    if path.is_file():
        for line in path.read_text().splitlines():
            if line.strip():
                rows.append(json.loads(line))
    fig = _figure(7.0, 3.5)
    ax = fig.add_subplot(1, 2, 1)
    steps = [r["step"] for r in rows if "query_loss" in r]
    ax.plot(steps, [r["query_loss"] for r in rows if "query_loss" in r], label="query loss")
    ax.plot(steps, [r.get("support_loss") for r in rows if "query_loss" in r], label="support loss")
    ax.set_xlabel("meta-step")
    ax.set_ylabel("MSE on score/5")
    ax.legend()
    ax.set_title("meta-training")
    ax2 = fig.add_subplot(1, 2, 2)
    val = [(r["step"], r["val_srocc"]) for r in rows if r.get("val_srocc") is not None]
    if val:
        ax2.plot([s for s, _ in val], [v for _, v in val], marker="o")
    ax2.set_xlabel("meta-step")
    ax2.set_ylabel("validation SROCC")
    ax2.set_title("held-out training users")
    fig.tight_layout()
    return fig


def plot_predicted_vs_true(predicted: Sequence[float], true: Sequence[float], title: str):
    """Scatter of one user's predicted scores against their observed ratings."""
    import numpy as np

    fig = _figure(4.5, 4.0)
    ax = fig.add_subplot(1, 1, 1)
    t = np.asarray(true, dtype=float)
    jitter = np.random.default_rng(0).uniform(-0.12, 0.12, size=t.shape)  # integer ratings overlap
    ax.scatter(t + jitter, predicted, s=12, alpha=0.7)
    ax.set_xlabel("the user's rating (jittered)")
    ax.set_ylabel("predicted score after 10-shot adaptation")
    ax.set_title(title, fontsize=9)
    fig.tight_layout()
    return fig


def save_figure(fig, path: str | Path) -> Path:
    """Write a figure as PNG."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, format="png")
    return path


def write_report(out_dir: str | Path, sections: Mapping[str, Any]) -> Path:
    """Write ``out_dir/report.md`` from the demo's measured pieces.

    Args:
        out_dir: the demo's output folder (plots are referenced relative to it).
        sections: ``title``, ``summary`` (list of lines), ``results`` (evaluate JSON),
            ``plots`` ({caption: relative path}), ``registry`` (lines), ``personalization``
            (lines), ``commands`` (list of shell commands), ``timings`` ({stage: seconds}).
    """
    out_dir = Path(out_dir)
    md = [f"# {sections.get('title', 'piaa-dist demo report')}", ""]
    md += list(sections.get("summary", [])) + [""]
    if sections.get("results"):
        md += ["## Results on the test users", "",
               "SROCC between predicted and observed ratings of each test user's held-out images, "
               "mean over users ± spread over repeated random splits.", "",
               results_table(sections["results"]), ""]
    for caption, rel in (sections.get("plots") or {}).items():
        md += [f"### {caption}", "", f"![{caption}]({rel})", ""]
    if sections.get("personalization"):
        md += ["## Personalization of one test user", ""] + list(sections["personalization"]) + [""]
    if sections.get("registry"):
        md += ["## Model registry", ""] + list(sections["registry"]) + [""]
    if sections.get("commands"):
        md += ["## Look further", "", "```bash"] + list(sections["commands"]) + ["```", ""]
    if sections.get("timings"):
        md += ["## Stage timings", "", "| stage | seconds |", "|---|---|"]
        md += [f"| {k} | {v:.1f} |" for k, v in sections["timings"].items()] + [""]
    path = out_dir / "report.md"
    path.write_text("\n".join(md))
    return path


def update_readme(readme: str | Path, block: str) -> bool:
    """Replace the text between the demo-results markers in the README with `block`.

    Returns False (and changes nothing) when the README has no markers.
    """
    readme = Path(readme)
    if not readme.is_file():
        return False
    text = readme.read_text()
    pattern = re.compile(re.escape(README_START) + r".*?" + re.escape(README_END), re.S)
    if not pattern.search(text):
        return False
    new = pattern.sub(lambda _: f"{README_START}\n{block.strip()}\n{README_END}", text)
    readme.write_text(new)
    return True
