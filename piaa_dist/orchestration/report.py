"""The demo's report: a Markdown page with the results table, plots and where to look next,
and the README's results block.

Everything here reads what the pipeline measured (the typed
:class:`~piaa_dist.results.EvaluationResult`, ``metrics.jsonl``, the personalization CSV);
nothing is typed in by hand, so the README's results table (written by :func:`update_readme`
from :func:`readme_block`) is always what the demo measured. The tables and plots themselves
are :mod:`piaa_dist.presentation`'s.
"""

from __future__ import annotations

import logging
import re
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from piaa_dist.presentation import markdown_table
from piaa_dist.results import EvaluationResult

log = logging.getLogger(__name__)

README_START = "<!-- demo-results:start -->"
README_END = "<!-- demo-results:end -->"


def readme_block(result: EvaluationResult, world_users: int | str = "?") -> str:
    """The README's results block: a one-line provenance and the Markdown results table.

    Args:
        result: what the demo's meta-testing measured.
        world_users: users of the synthetic world (train + test), for the provenance line.
    """
    return (f"Measured by `make demo` ({world_users} synthetic users, {result.repeats} repeats; "
            "generated, not typed):\n\n" + markdown_table(result))


def write_report(out_dir: str | Path, sections: Mapping[str, Any]) -> Path:
    """Write ``out_dir/report.md`` from the demo's measured pieces.

    Args:
        out_dir: the demo's output folder (plots are referenced relative to it).
        sections: ``title``, ``summary`` (list of lines), ``results`` (an
            :class:`~piaa_dist.results.EvaluationResult`),
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
               markdown_table(sections["results"]), ""]
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
