"""``piaa-dist evaluate``: the meta-testing protocol on the test users, printed as a table.

    piaa-dist evaluate --data URL --model PATH_OR_MODELS_URI [--giaa PATH] --shots 10 100
        --repeats R --json OUT.json [--config YAML] [key=value ...] [--s3-endpoint URL]

The meta-learner comes from a checkpoint folder (``checkpoint.save_model``) or a registry URI
``models:/NAME@ALIAS``. The GIAA baseline comes from ``--giaa``, else from a ``giaa/`` folder
inside or beside a local meta-learner folder (``DIR/model/giaa`` or ``DIR/giaa``), else it is
trained here on the same training users the meta-learner saw (and saved under ``--giaa-out``
when given). The result is printed as a table, written to ``--json`` and logged to MLflow as
an ``evaluate`` run (unless ``--no-mlflow``).
"""

from __future__ import annotations

import argparse
import logging
from pathlib import Path

HELP = "Run the meta-testing protocol on test users."

log = logging.getLogger(__name__)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Flags of ``piaa-dist evaluate``."""
    parser.add_argument("--data", required=True, help="dataset root (local folder or s3://bucket/prefix)")
    parser.add_argument("--model", required=True, help="meta-learner folder or models:/NAME@ALIAS")
    parser.add_argument("--giaa", default="", help="GIAA model folder (default: <model>/giaa, else train one)")
    parser.add_argument("--giaa-out", default="", help="save a GIAA model trained here to this folder")
    parser.add_argument("--shots", type=int, nargs="+", default=None, help="shot counts k (default eval.shots)")
    parser.add_argument("--repeats", type=int, default=None, help="random splits per user (default eval.repeats)")
    parser.add_argument("--seed", type=int, default=None, help="split seed (default run.seed)")
    parser.add_argument("--json", default="", help="write the result JSON here")
    parser.add_argument("--config", default=None, help="YAML job config (default: the model's own config)")
    parser.add_argument("--s3-endpoint", default="", help="S3 endpoint URL (default $AWS_ENDPOINT_URL)")
    parser.add_argument("--mlflow-uri", default=None,
                        help="MLflow tracking URI for models:/ references and the evaluate run "
                             "(default run.mlflow_uri, $MLFLOW_TRACKING_URI, then sqlite:///mlflow.db)")
    parser.add_argument("--no-mlflow", action="store_true",
                        help="do not log the result to MLflow (models:/ references still resolve)")
    parser.add_argument("--no-progress", action="store_true", help="no progress bars")
    parser.add_argument("overrides", nargs="*", help="config overrides section.key=value")


def _is_uri(ref: str) -> bool:
    return ref.startswith(("models:/", "runs:/"))


def _load_meta(ref: str, mlflow_uri: str | None):
    """(model, cfg, info) from a checkpoint folder or a ``models:/`` / ``runs:/`` URI."""
    if _is_uri(ref):
        from piaa_dist.orchestration.tracking import resolve_model

        ref = str(resolve_model(ref, uri=mlflow_uri or ""))
    from piaa_dist.checkpoint import load_model

    return load_model(ref)


def run(args: argparse.Namespace) -> int:
    """Evaluate; print the table; write the JSON."""
    import torch

    from piaa_dist.config import (
        config_from_dict,
        config_to_dict,
        load_config,
        parse_overrides,
        with_overrides,
    )
    from piaa_dist.data.stream import Dataset
    from piaa_dist.errors import UserError
    from piaa_dist.evaluate import METHODS, evaluate, standard_models
    from piaa_dist.presentation import format_table

    meta, model_cfg, _info = _load_meta(args.model, args.mlflow_uri)
    # The model's own config defines the architecture and input size it was trained with;
    # --config / overrides may change the protocol (eval.*), not silently the model.
    if args.config:
        cfg = load_config(args.config, args.overrides)
        base = config_to_dict(cfg)
        base["model"] = config_to_dict(model_cfg)["model"]
        cfg = config_from_dict(base, args.config)
    else:
        flat = {
            f"{section}.{key}": value
            for section, values in parse_overrides(args.overrides).items()
            for key, value in values.items()
        }
        cfg = with_overrides(model_cfg, flat)
    torch.set_num_threads(max(1, int(cfg.run.threads_per_worker)))
    from piaa_dist.model import select_device

    device = select_device(cfg.run.use_gpu)
    meta = meta.to(device)
    endpoint = args.s3_endpoint or cfg.data.s3_endpoint or None
    dataset = Dataset.open(args.data, endpoint_url=endpoint)

    giaa, giaa_source = None, None
    need_giaa = any(METHODS.get(m) and METHODS[m].prior == "giaa" for m in cfg.eval.methods)
    if need_giaa:
        giaa, giaa_source = _giaa_model(args, cfg, dataset, device)

    models = standard_models(meta, giaa, cfg.eval.methods)
    if not models:
        raise UserError("evaluate: no method to run (check eval.methods)")
    result = evaluate(cfg, dataset, models, shots=args.shots, repeats=args.repeats, seed=args.seed,
                      progress=not args.no_progress)
    result = result.with_sources(model=args.model, data=args.data, giaa=giaa_source)
    print(format_table(result))
    if args.json:
        log.info("wrote %s", result.save(args.json))
    if not args.no_mlflow:
        _log_mlflow(cfg, args, result)
    return 0


def _log_mlflow(cfg, args: argparse.Namespace, result) -> None:
    """An ``evaluate`` MLflow run: config, summary metrics, the JSON and the SROCC-vs-shots plot."""
    from piaa_dist.orchestration.tracking import RunLogger

    uri = args.mlflow_uri or cfg.run.mlflow_uri or ""
    with RunLogger(cfg.run.experiment, uri=uri, run_name="evaluate", rank=0,
                   tags={"piaa_dist.kind": "evaluate", "piaa_dist.model": args.model,
                         "piaa_dist.data": args.data}) as run:
        run.log_params(cfg)
        run.log_evaluation(result)
        log.info("logged the evaluation to MLflow run %s (%s)", run.run_id, run.uri)


def _giaa_model(args, cfg, dataset, device):
    """The GIAA prior and where it came from: ``--giaa``, else a ``giaa/`` folder inside or
    beside a local meta-learner folder, else trained now on the meta-training users."""
    from piaa_dist.checkpoint import WEIGHTS_FILE, load_model, save_model
    from piaa_dist.errors import UserError

    if args.giaa:
        if not Path(args.giaa, WEIGHTS_FILE).is_file():
            raise UserError(f"--giaa {args.giaa}: not a model folder (no {WEIGHTS_FILE})")
        log.info("GIAA model from %s", args.giaa)
        return load_model(args.giaa, device)[0], args.giaa
    if not _is_uri(args.model):
        # `train --out DIR` writes the meta-learner to DIR/model; a GIAA baseline saved with it
        # lives in DIR/model/giaa or DIR/giaa.
        for folder in (Path(args.model) / "giaa", Path(args.model).parent / "giaa"):
            if (folder / WEIGHTS_FILE).is_file():
                log.info("GIAA model from %s", folder)
                return load_model(folder, device)[0], str(folder)

    from piaa_dist.giaa import train_giaa
    from piaa_dist.train import meta_training_users

    users = meta_training_users(cfg, dataset)
    log.info("no GIAA model given: training one on the %d meta-training users", len(users))
    giaa = train_giaa(cfg, dataset, users, progress=not args.no_progress, device=device)
    source = "trained by evaluate"
    if args.giaa_out:
        save_model(args.giaa_out, giaa, cfg, {"kind": "giaa", "users": len(users)})
        log.info("saved the GIAA model to %s", args.giaa_out)
        source = args.giaa_out
    return giaa.to(device), source
