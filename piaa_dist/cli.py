"""The ``piaa-dist`` console script: one subcommand per module in ``piaa_dist.commands``.

Each command module defines ``HELP`` (one line), ``DESCRIPTION`` (its ``--help`` text),
``add_arguments(parser)`` and ``run(args) -> int`` (see ``piaa_dist/commands/common.py``).
Command modules are imported only when their subcommand runs, so ``piaa-dist synth`` never
pays for importing Ray or MLflow. What a command does lives in
``piaa_dist/orchestration/usecases.py``; commands parse flags, call it and print.
"""

from __future__ import annotations

import argparse
import sys

from piaa_dist.commands.common import add_verbose_argument, command_module, configure_logging, run_command

# What `piaa-dist --help` tells a user (no developer markup: this is a terminal).
DESCRIPTION = """\
piaa-dist: personalized image aesthetics that adapts to a new person from a handful of their
ratings (BLG-PIAA meta-learning, distributed with Ray Train and Ray Tune, tracked in MLflow).

It learns from many people's ratings how to adapt quickly (meta-training), then adapts to one
new person from about 10 of their ratings and ranks their images the way they would."""

EPILOG = """\
typical sequence:
  piaa-dist demo                 everything below, end to end, on a synthetic world
  piaa-dist synth --out world    a synthetic dataset (or bring FLICKR-AES or AADB)
  piaa-dist ingest --format flickr-aes --root world --out s3://bucket/world
  piaa-dist train --data s3://bucket/world --config jobs/configs/cpu.yaml --out run --alias champion
  piaa-dist tune --data s3://bucket/world --config jobs/configs/tune-cpu.yaml --out sweep
  piaa-dist evaluate --data s3://bucket/world --model run
  piaa-dist personalize --model run --ratings me.csv --images photos/ --score new/ --out ranking.csv

'piaa-dist COMMAND --help' explains a command. --model takes a model folder, the folder
'train --out' or 'tune --out' wrote, or a registry name such as models:/blg-piaa@champion.
Ray's own INFO logs are hidden; -v shows them. The same steps from Python: piaa_dist.api.
Read more: README.md (set-up, usage, results) and docs/ARCHITECTURE.md (design)."""

# subcommand -> one-line help (the module under piaa_dist.commands: dashes become underscores)
COMMANDS = {
    "synth": "Write a synthetic PIAA world in the FLICKR-AES layout.",
    "ingest": "Ingest FLICKR-AES / AADB / PARA / a ratings log into a new, atomically published dataset version.",
    "verify": "Check every user of a dataset's published version (counts, checksums); one-line summary.",
    "datasets": "List a dataset's versions (the published one marked); remove old ones explicitly.",
    "s3-local": "Start a local S3 endpoint (moto server) for the embedded defaults.",
    "train": "Meta-train the BLG-PIAA meta-learner (in-process or on Ray Train).",
    "evaluate": "Run the meta-testing protocol on test users.",
    "tune": "Ray Tune sweep over inner lr, inner steps, shots and meta lr.",
    "personalize": "Adapt a registered meta-learner to one person's ratings and rank new images.",
    "demo": "Run the whole system end to end on embedded defaults and write a report.",
}


def build_parser(argv: list[str]) -> argparse.ArgumentParser:
    """The CLI parser; only the subcommand named in ``argv`` gets its full arguments."""
    parser = argparse.ArgumentParser(prog="piaa-dist", description=DESCRIPTION, epilog=EPILOG,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    add_verbose_argument(parser, top_level=True)
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", title="commands")
    sub.required = True
    # Only the chosen subcommand's module is imported (keeps `--help` and light commands fast).
    chosen = next((a for a in argv if a in COMMANDS), None)
    for name, help_text in COMMANDS.items():
        description = help_text
        module = command_module(name) if name == chosen else None
        if module is not None:
            description = getattr(module, "DESCRIPTION", help_text)
        p = sub.add_parser(name, help=help_text, description=description,
                           formatter_class=argparse.RawDescriptionHelpFormatter)
        add_verbose_argument(p)
        if module is not None:
            module.add_arguments(p)
    return parser


def main(argv: list[str] | None = None) -> int:
    """Run ``piaa-dist ARGV``; returns the exit status (2 for a user error, printed as one line)."""
    argv = list(sys.argv[1:] if argv is None else argv)
    args = build_parser(argv).parse_args(argv)
    configure_logging(args.verbose)
    return run_command(command_module(args.command), args)


if __name__ == "__main__":
    sys.exit(main())
