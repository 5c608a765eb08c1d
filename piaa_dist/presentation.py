"""Tables and plots of results: the one place that renders them.

* :func:`format_table`: an :class:`~piaa_dist.results.EvaluationResult` as plain text (the
  ``evaluate`` command's output);
* :func:`markdown_table`: the same as Markdown (the demo report and the README's results
  table);
* :func:`plot_srocc_vs_shots`: SROCC against shots per method with the ceilings (logged to
  MLflow by ``RunLogger.log_evaluation``, drawn into the demo report);
* :func:`plot_training_curves`: meta-training losses and validation SROCC from a
  ``metrics.jsonl``;
* :func:`plot_predicted_vs_true`: one user's predictions against their ratings.

Figures are built on matplotlib's Agg canvas without pyplot's global state (safe in worker
threads), and matplotlib is imported only when a figure is drawn. Nothing here imports MLflow,
Ray or torch: callers log or save the figures.
"""

from __future__ import annotations

import json
import math
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING

from piaa_dist.results import EvaluationResult

if TYPE_CHECKING:  # pragma: no cover - typing only
    from matplotlib.figure import Figure

#: What the headline compares ``blg-piaa`` with: at each shot count, the baseline with the
#: highest mean test SROCC (:meth:`~piaa_dist.results.EvaluationResult.strongest_baseline`).
#: Choosing the comparison by test score is reporting (the hardest baseline to beat), not model
#: selection: every fine-tuning setting was chosen on validation users before.
HEADLINE_BASELINE = "strongest"

#: The sentence that says how the headline's baseline is picked (tables, report, README).
HEADLINE_NOTE = ("strongest baseline = the baseline with the highest mean test SROCC at that shot count "
                 "(reporting, not model selection: every fine-tuning setting and ridge penalty was "
                 "chosen on validation users, never on test users)")


def _as_result(result: EvaluationResult | str | Path) -> EvaluationResult:
    """A result object from itself, a JSON text, or a path to a JSON file."""
    if isinstance(result, EvaluationResult):
        return result
    if isinstance(result, str) and result.lstrip().startswith("{"):
        return EvaluationResult.from_json(result)
    return EvaluationResult.load(result)


def _ci(d) -> str:
    if d.ci95 is None:
        return "95% CI n/a"
    return f"95% CI {d.ci95[0]:+.3f} … {d.ci95[1]:+.3f}"


# ---------------------------------------------------------------------------------------------
# Tables


def format_table(result: EvaluationResult) -> str:
    """Plain text: methods × shots (SROCC mean ± std over repeats, PLCC), then the ceilings,
    the paired differences and the protocol (users, repeats, seed, time)."""
    shots = list(result.shots)
    width = max([len("method")] + [len(n) for n in result.methods])
    head = f"{'method':<{width}}" + "".join(f" | {str(k) + '-shot SROCC':>17} {'PLCC':>6}" for k in shots)
    lines = [head, "-" * len(head)]
    for name in result.methods:
        row = f"{name:<{width}}"
        for k in shots:
            cell = result.stats(name, k)
            if cell is None:
                row += f" | {'n/a':>17} {'':>6}"
            else:
                row += f" | {cell.srocc_mean:>8.3f} ± {cell.srocc_std:.3f}  {cell.plcc_mean:>6.3f}"
        lines.append(row)
    ceil = result.ceilings
    if ceil is not None and ceil.oracle is not None and ceil.average_user is not None:
        left_out = f", {ceil.constant_users} constant-rating users left out" if ceil.constant_users else ""
        lines.append(
            f"ceilings: oracle (user's noise-free score) {ceil.oracle:.3f}{_ceiling_ci(result, 'oracle')}, "
            f"average user {ceil.average_user:.3f}{_ceiling_ci(result, 'average_user')} "
            f"({ceil.users} users{left_out})"
        )
    for other, by_k in result.paired.items():
        parts = []
        for k, d in by_k.items():
            ci = f"[{d.ci95[0]:+.3f}, {d.ci95[1]:+.3f}]" if d.ci95 is not None else "[CI n/a]"
            parts.append(f"{k}-shot {d.diff_mean:+.3f} {ci} ({d.users_better}/{d.n_users} users better)")
        lines.append(f"paired {result.reference} vs {other}: " + "; ".join(parts))
    for k in shots:
        head = headline(result, k)
        if head:
            lines.append(head)
    if any(result.strongest_baseline(k) for k in shots):
        lines.append(f"({HEADLINE_NOTE})")
    lines += finetune_lines(result)
    skipped = {k: len(v) for k, v in result.skipped.items() if v}
    if skipped:
        lines.append("skipped (too few ratings): "
                     + ", ".join(f"{n} users at {k} shots" for k, n in skipped.items()))
    lines.append(
        f"{len(result.users)} test users, {result.repeats} repeats, seed {result.seed}, "
        f"{result.seconds:.0f}s"
    )
    return "\n".join(lines)


def _ceiling_ci(result: EvaluationResult, name: str) -> str:
    ci = (result.ceilings_ci95 or {}).get(name)
    return f" (95% CI {ci[0]:.3f} … {ci[1]:.3f})" if ci else ""


def headline(result: EvaluationResult, shots: int) -> str | None:
    """One line: ``blg-piaa`` against the strongest baseline at `shots`, with the paired 95% CI
    and the test users it wins on (None without a reference or a baseline)."""
    found = result.strongest_baseline(shots)
    if found is None:
        return None
    name, d = found
    return (f"{shots}-shot: {result.reference} − strongest baseline {name} = {d.diff_mean:+.3f} "
            f"({_ci(d)}; better on {d.users_better}/{d.n_users} test users)")


def finetune_lines(result: EvaluationResult) -> list[str]:
    """How each method's fine-tuning was chosen: the protocol, the validation users, and the
    setting per method and shot count with its validation SROCC (empty when not recorded)."""
    ch = result.finetune
    if ch is None:
        return []
    where = {"search": "chosen now", "cache": "chosen earlier (cached search)",
             "config": "given in eval.finetune", "none": "not chosen"}.get(ch.source, ch.source)
    out = [f"fine-tuning: protocol {ch.protocol}, {where}"
           + (f" on {ch.validation_users} validation users ({ch.repeats} repeats), never test users"
              if ch.validation_users else "")
           + (f"; {ch.note}" if ch.note else "")]
    for method, by_k in ch.chosen.items():
        for k, text in sorted(by_k.items()):
            score = ch.validation_srocc.get(method, {}).get(k)
            val = f" (validation SROCC {score:.3f})" if score is not None else ""
            out.append(f"  {method} @ {k} shots: {text.partition(': ')[2]}{val}")
    return out


def finetune_markdown(result: EvaluationResult) -> str:
    """The chosen fine-tuning settings as a Markdown table (empty without a record)."""
    ch = result.finetune
    if ch is None or not ch.chosen:
        return ""
    lines = ["| method | shots | fine-tuning setting | validation SROCC |", "|---|---|---|---|"]
    for method, by_k in ch.chosen.items():
        for k, text in sorted(by_k.items()):
            score = ch.validation_srocc.get(method, {}).get(k)
            lines.append(f"| `{method}` | {k} | {text.partition(': ')[2]} | "
                         f"{'given' if score is None else f'{score:.3f}'} |")
    return "\n".join(lines)


def markdown_table(result: EvaluationResult) -> str:
    """Markdown: methods × shots (SROCC mean ± spread over repeats, PLCC), the ceilings as
    rows (with their 95% CI over test users), and under the table ``blg-piaa`` against the
    strongest baseline at each shot count (paired difference, 95% CI, test users won)."""
    shots = [k for k in result.shots if any(result.stats(m, k) for m in result.methods)]
    head = "| method | " + " | ".join(f"SROCC {k}-shot | PLCC {k}-shot" for k in shots) + " |"
    sep = "|---|" + "---|---|" * len(shots)
    lines = [head, sep]
    for name in result.methods:
        cells = []
        for k in shots:
            cell = result.stats(name, k)
            if cell is None:
                cells += ["–", "–"]
                continue
            cells.append(f"{cell.srocc_mean:.3f} ± {cell.srocc_std:.3f}")
            cells.append(f"{cell.plcc_mean:.3f}")
        lines.append(f"| `{name}` | " + " | ".join(cells) + " |")
    ceil = result.ceilings
    if ceil is not None:
        for value, label, key in ((ceil.oracle, "oracle ceiling (user's noise-free score)", "oracle"),
                                  (ceil.average_user, "average-user ceiling", "average_user")):
            if value is not None:
                ci = (result.ceilings_ci95 or {}).get(key)
                first = f"{value:.3f}" + (f" (95% CI {ci[0]:.3f} … {ci[1]:.3f})" if ci else "")
                lines.append(f"| {label} | " + " | ".join([first, ""] * len(shots)) + " |")
    out = "\n".join(lines)
    notes = []
    for k in shots:
        found = result.strongest_baseline(k)
        if found is not None:
            name, d = found
            notes.append(
                f"- {k}-shot: `{result.reference}` − `{name}` = {d.diff_mean:+.3f} "
                f"({_ci(d)}; {d.users_better}/{d.n_users} test users better)"
                f"{'' if len(result.baselines()) < 2 else ' — the strongest baseline'}"
            )
    if notes:
        out += "\n\n" + "\n".join(notes)
        if len(result.baselines()) > 1:
            out += f"\n\n({HEADLINE_NOTE}.)"
    ft = finetune_markdown(result)
    if ft:
        ch = result.finetune
        out += (f"\n\nFine-tuning settings (protocol `{ch.protocol}`; chosen on {ch.validation_users} "
                f"validation users, never test users):\n\n{ft}")
    return out


# ---------------------------------------------------------------------------------------------
# Figures


def _figure(width: float = 6.0, height: float = 4.0) -> Figure:
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(width, height), dpi=100)
    FigureCanvasAgg(fig)
    return fig


def plot_srocc_vs_shots(result: EvaluationResult | str | Path) -> Figure:
    """SROCC against shots per method (mean ± std over repeats), ceilings as labelled
    horizontal dashed lines.

    Args:
        result: the evaluate result, or its JSON text, or a path to its JSON file.

    Returns:
        A matplotlib Figure (Agg canvas).

    Raises:
        ResultFormatError: a text or file that is not an evaluation result.
    """
    result = _as_result(result)
    fig = _figure(6.0, 4.0)
    ax = fig.add_subplot(1, 1, 1)
    all_shots: set[int] = set()
    for method in sorted(result.methods):
        rows = sorted(result.methods[method].items())
        if not rows:
            continue
        xs = [k for k, _ in rows]
        all_shots.update(xs)
        ax.errorbar(xs, [s.srocc_mean for _, s in rows], yerr=[s.srocc_std for _, s in rows],
                    marker="o", capsize=4, label=method)
    ceil = result.ceilings
    if ceil is not None:
        colors = iter(["0.2", "0.5"])
        for name, value in sorted((("oracle", ceil.oracle), ("average_user", ceil.average_user))):
            color = next(colors)
            if value is None:
                continue
            ax.axhline(value, ls="--", lw=1.2, color=color, label=f"{name} (ceiling)")
            # label the line itself: two grey dashed lines are easy to mix up from the legend
            ax.text(0.99, value, f"{name.replace('_', '-')} ceiling {value:.2f}",
                    transform=ax.get_yaxis_transform(), ha="right", va="bottom",
                    fontsize=8, color=color)
    if all_shots:
        if max(all_shots) >= 5 * max(1, min(all_shots)):
            ax.set_xscale("log")
        ax.set_xticks(sorted(all_shots))
        ax.set_xticklabels([str(s) for s in sorted(all_shots)])
        ax.minorticks_off()
    ax.set_xlabel("shots k (rated images of the new user)")
    ax.set_ylabel("SROCC (mean over users; ± std over repeats)")
    ax.set_title("Personalized IAA: SROCC vs shots")
    ax.grid(True, alpha=0.3)
    if ax.get_legend_handles_labels()[0]:
        ax.legend(fontsize=8, loc="best")
    fig.tight_layout()
    return fig


def plot_training_curves(metrics_jsonl: str | Path, *, title: str = "held-out training users") -> Figure:
    """The meta-training curve to its plateau, from the ``metrics.jsonl`` a training run writes.

    Left: query and support loss against the meta-step. Right: validation SROCC (held-out
    training users, never test users) against the meta-step, with the best validation
    checkpoint (the model the run registers) starred, its score as a dashed line, and the step
    where early stopping saw the plateau marked. An absent file gives empty axes.

    Args:
        metrics_jsonl: the run's ``metrics.jsonl`` (``step``, ``query_loss``, ``val_srocc``,
            ``best_step``, ``stopped_early``, ...; a resumed run's repeated steps count once,
            the last report of a step wins).
        title: the right panel's title.

    Returns:
        A matplotlib ``Figure`` (:func:`save_figure` writes it).
    """
    rows: dict[int, dict] = {}
    path = Path(metrics_jsonl)
    if path.is_file():
        for line in path.read_text().splitlines():
            if line.strip():
                row = json.loads(line)
                rows[int(row["step"])] = row
    ordered = [rows[s] for s in sorted(rows)]
    fig = _figure(8.0, 3.5)
    ax = fig.add_subplot(1, 2, 1)
    losses = [r for r in ordered if "query_loss" in r]
    ax.plot([r["step"] for r in losses], [r["query_loss"] for r in losses], label="query loss")
    ax.plot([r["step"] for r in losses], [r.get("support_loss", math.nan) for r in losses], label="support loss")
    ax.set_xlabel("meta-step")
    ax.set_ylabel("MSE on score/5")
    ax.legend()
    ax.set_title("meta-training")
    ax2 = fig.add_subplot(1, 2, 2)
    val = [(r["step"], r["val_srocc"]) for r in ordered if r.get("val_srocc") is not None]
    if val:
        ax2.plot([s for s, _ in val], [v for _, v in val], marker="o", label="validation SROCC")
        # The run's own choice (EarlyStopping's best_step) when it reported one; else the first
        # highest score (what the rule picks with min_delta 0).
        best_step, best = max(val, key=lambda sv: (sv[1], -sv[0]))
        chosen = [r["best_step"] for r in ordered if r.get("best_step") is not None]
        if chosen and int(chosen[-1]) in dict(val):
            best_step = int(chosen[-1])
            best = dict(val)[best_step]
        ax2.axhline(best, linestyle="--", linewidth=0.8, color="grey")
        ax2.plot([best_step], [best], marker="*", markersize=14, linestyle="none",
                 label=f"best: {best:.3f} at step {best_step} (registered)")
        stopped = [r["step"] for r in ordered if r.get("stopped_early")]
        if stopped:
            ax2.axvline(stopped[-1], linestyle=":", color="grey")
            ax2.text(stopped[-1], ax2.get_ylim()[1], f"plateau: stopped at {stopped[-1]} ", fontsize=7,
                     rotation=90, va="top", ha="right")
        ax2.legend(fontsize=7, loc="lower right")
    ax2.set_xlabel("meta-step")
    ax2.set_ylabel("validation SROCC")
    ax2.set_title(title)
    fig.tight_layout()
    return fig


def plot_predicted_vs_true(predicted: Sequence[float], true: Sequence[float], title: str) -> Figure:
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


def save_figure(fig: Figure, path: str | Path) -> Path:
    """Write a figure as PNG (parent folders created)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, format="png")
    return path


__all__ = [
    "HEADLINE_BASELINE",
    "HEADLINE_NOTE",
    "finetune_lines",
    "finetune_markdown",
    "format_table",
    "headline",
    "markdown_table",
    "plot_predicted_vs_true",
    "plot_srocc_vs_shots",
    "plot_training_curves",
    "save_figure",
]
