"""The ``piaa-dist`` console script: one subcommand per module in :mod:`piaa_dist.commands`.

Each command module defines ``HELP`` (one line), ``add_arguments(parser)`` and ``run(args) -> int``.
Command modules are imported only when their subcommand runs, so ``piaa-dist synth`` never pays
for importing Ray or MLflow.
"""

from __future__ import annotations

import argparse
import importlib
import logging
import sys

# subcommand -> module under piaa_dist.commands (dashes become underscores)
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


def _module(name: str):
    return importlib.import_module(f"piaa_dist.commands.{name.replace('-', '_')}")


def build_parser(argv: list[str]) -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="piaa-dist", description=__doc__.splitlines()[0])
    parser.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    sub.required = True
    # Only the chosen subcommand's module is imported (keeps `--help` and light commands fast).
    chosen = next((a for a in argv if a in COMMANDS), None)
    for name, help_text in COMMANDS.items():
        p = sub.add_parser(name, help=help_text, description=help_text)
        if name == chosen:
            _module(name).add_arguments(p)
    return parser


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    args = build_parser(argv).parse_args(argv)
    logging.basicConfig(
        level=logging.DEBUG if args.verbose else logging.INFO,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
        datefmt="%H:%M:%S",
    )
    try:
        return int(_module(args.command).run(args) or 0)
    except KeyboardInterrupt:
        return 130
    except Exception as err:  # noqa: BLE001 - the CLI turns known errors into one clear line
        from piaa_dist.errors import USER_ERRORS

        if isinstance(err, USER_ERRORS):
            logging.getLogger("piaa_dist").error("%s", err)
            return 2
        raise


if __name__ == "__main__":
    sys.exit(main())
