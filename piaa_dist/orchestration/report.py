"""The demo's report: a Markdown page with the results table, plots and where to look next,
and the README's results block.

Everything here reads what the pipeline measured (the typed
:class:`~piaa_dist.results.EvaluationResult`, ``metrics.jsonl``, the personalization CSV);
nothing is typed in by hand, so the README's results table (written by :func:`update_readme`
from :func:`readme_block`) is always what the demo measured. The tables and plots themselves
are :mod:`piaa_dist.presentation`'s.

The demo writes the README block to ``<out>/readme-results.md`` and never edits the README by
itself; ``make readme-results`` runs this module to copy the block in::

    python -m piaa_dist.orchestration.report demo-out/readme-results.md README.md
"""

from __future__ import annotations

import argparse
import logging
import re
import sys
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from piaa_dist.presentation import markdown_table
from piaa_dist.results import EvaluationResult

log = logging.getLogger(__name__)

README_START = "<!-- demo-results:start -->"
README_END = "<!-- demo-results:end -->"
#: The demo's README block, in its output folder.
README_BLOCK_FILE = "readme-results.md"


def readme_block(result: EvaluationResult, world_users: int | str = "?") -> str:
    """The README's results block: a one-line provenance and the Markdown results table.

    Args:
        result: what the demo's meta-testing measured.
        world_users: users of the synthetic world (train + test), for the provenance line.
    """
    return (f"Measured by `make demo` ({world_users} synthetic users, {result.repeats} repeats; "
            "generated, not typed):\n\n" + markdown_table(result))


def readme_instructions(block_file: str | Path) -> list[str]:
    """The report's lines saying where the README block is and how to copy it in."""
    block_file = Path(block_file)
    return [
        f"This run's results block for the README is `{block_file.name}` (beside this report). "
        "The demo does not edit the README; to put the block between the README's "
        f"`{README_START}` markers:",
        "",
        "```bash",
        f"make readme-results OUT={block_file.parent}",
        f"# or: python -m piaa_dist.orchestration.report {block_file} README.md",
        "```",
    ]


def write_report(out_dir: str | Path, sections: Mapping[str, Any]) -> Path:
    """Write ``out_dir/report.md`` from the demo's measured pieces.

    Args:
        out_dir: the demo's output folder (plots are referenced relative to it).
        sections: ``title``, ``summary`` (list of lines), ``results`` (an
            :class:`~piaa_dist.results.EvaluationResult`),
            ``plots`` ({caption: relative path}), ``registry`` (lines), ``personalization``
            (lines), ``readme`` (lines: where the README block is), ``commands`` (list of shell
            commands), ``timings`` ({stage: seconds}).
    """
    out_dir = Path(out_dir)
    md = [f"# {sections.get('title', 'piaa-dist demo report')}", ""]
    md += list(sections.get("summary", [])) + [""]
    if sections.get("results"):
        res = sections["results"]
        how = ("each fine-tuned method (and the ridge penalty) with the setting chosen for it on "
               "validation users, never test users (`eval.protocol: per-method`)"
               if res.finetune is not None and res.finetune.protocol == "per-method" else
               "every fine-tuned method with the same budget (`eval.protocol: shared`, the paper's protocol)")
        md += ["## Results on the test users", "",
               "SROCC between predicted and observed ratings of each test user's held-out images, "
               "mean over users ± spread over repeated random splits; " + how + ". Under the table, "
               "`blg-piaa` against the strongest baseline at each shot count, with the paired 95% CI "
               "and the test users it wins on; the ceilings carry their 95% CI over test users.", "",
               markdown_table(res), ""]
    for caption, rel in (sections.get("plots") or {}).items():
        md += [f"### {caption}", "", f"![{caption}]({rel})", ""]
    if sections.get("personalization"):
        md += ["## Personalization of one test user", ""] + list(sections["personalization"]) + [""]
    if sections.get("registry"):
        md += ["## Model registry", ""] + list(sections["registry"]) + [""]
    if sections.get("readme"):
        md += ["## README results table", ""] + list(sections["readme"]) + [""]
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


def main(argv: list[str] | None = None) -> int:
    """``python -m piaa_dist.orchestration.report BLOCK README``: copy a demo's block into a README."""
    parser = argparse.ArgumentParser(
        prog="python -m piaa_dist.orchestration.report",
        description="Put a demo's results block (its readme-results.md) between the README's "
                    f"{README_START} and {README_END} markers.")
    parser.add_argument("block", help=f"the demo's {README_BLOCK_FILE}")
    parser.add_argument("readme", help="the README to update")
    args = parser.parse_args(argv)
    block = Path(args.block)
    if not block.is_file():
        print(f"{block}: no such file; run `make demo` first (it writes {README_BLOCK_FILE} in its "
              "output folder)", file=sys.stderr)
        return 2
    if not update_readme(args.readme, block.read_text()):
        print(f"{args.readme}: no {README_START} ... {README_END} markers; nothing changed", file=sys.stderr)
        return 2
    print(f"{args.readme}: results table replaced with {block}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
