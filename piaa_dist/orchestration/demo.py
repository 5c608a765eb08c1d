"""The main job: the whole system end to end on embedded defaults, ending in a report.

Stages (each shown with a progress line and timed):

1. a local S3 endpoint (moto server on 127.0.0.1) — unless ``--data``/``--s3-endpoint`` point
   at a real one;
2. a synthetic PIAA world in the FLICKR-AES layout;
3. ingestion into per-user WebDataset shards + a Parquet manifest on S3;
4. meta-training on a local Ray with 2 Train workers (all-reduced bilevel meta-gradients),
   registered in the local MLflow registry and promoted to ``champion`` if it beats the
   version holding the alias (none, on a fresh output folder);
5. a Ray Tune sweep of short trials (ASHA on held-out training users' validation SROCC), the
   winning configuration refit to full length, registered and promoted to ``champion`` only if
   it beats the trained meta-learner on the same validation users (champion/challenger, see
   :mod:`piaa_dist.orchestration.promotion`; the stage says which and why);
6. meta-testing of ``blg-piaa`` against every baseline (``meta-no-adapt``, ``giaa-finetune``,
   ``giaa-no-adapt``, ``giaa-ridge``) at 10 and 100 shots, each fine-tuned method with the
   setting chosen for it on the validation users (``eval.protocol: per-method``); the table
   ends with ``blg-piaa`` against the strongest baseline at each shot count (the model is
   pulled back from the registry by its alias; the GIAA baseline is the dataset's registered
   one, trained with the demo config's budget);
7. personalization of one test user from 10 of their ratings;
8. ``report.md`` with the results table, plots and the commands to look further.

Every stage is a use-case of :mod:`piaa_dist.orchestration.usecases` (the functions the
``piaa-dist`` commands and :mod:`piaa_dist.api` call); the demo adds the stage banners, the
local S3 endpoint and the report. Every process the demo starts (the moto server thread, the
local Ray cluster) is stopped before it returns, also on failure.

The README's results block is written to ``<out>/readme-results.md`` (synthetic world only);
``make readme-results`` (or ``--readme README.md``) copies it into the README, so that running
the demo never edits a tracked file.
"""

from __future__ import annotations

import contextlib
import csv
import json
import logging
import os
import random
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterator

log = logging.getLogger(__name__)

REPO_ROOT = Path(__file__).resolve().parents[2]
DEFAULT_CONFIG = REPO_ROOT / "jobs" / "configs" / "demo.yaml"
BUCKET = "piaa-demo"


@dataclass(frozen=True)
class DemoSettings:
    """What the demo runs on; every field has an embedded default.

    Attributes:
        out: output folder (world, shards if local, checkpoints, MLflow store, report).
        config: job config for training/evaluation (``jobs/configs/demo.yaml``).
        overrides: ``section.key=value`` overrides applied to it.
        data: existing dataset URL (``s3://bucket/prefix`` or folder): skips synth + ingest.
        s3_endpoint: S3 endpoint to use instead of starting a local one.
        mlflow_uri: tracking URI (default ``sqlite:///<out>/mlflow.db``).
        ray_address: Ray cluster (default: each Ray stage starts and stops a local one).
        users / images / seed: size of the synthetic world.
        workers: Ray Train workers for meta-training.
        tune_samples: trials of the sweep (0 skips the sweep).
        shots / repeats: the meta-testing protocol.
        readme: README whose results block to replace with this run's (None = leave it; the
            block is in ``<out>/readme-results.md`` either way).
    """

    out: Path
    config: Path = DEFAULT_CONFIG
    overrides: tuple[str, ...] = ()
    data: str = ""
    s3_endpoint: str = ""
    mlflow_uri: str = ""
    ray_address: str = ""
    users: int = 80
    images: int = 3000
    seed: int = 0
    workers: int = 2
    tune_samples: int = 3
    #: the sweep's trials are short runs (their validation SROCC ranks the hyperparameters);
    #: the winner is then refit to the config's full meta.meta_steps
    tune_overrides: tuple[str, ...] = ("tune.trial_steps=100", "run.validate_every=50",
                                       "run.checkpoint_every=50")
    shots: tuple[int, ...] = (10, 100)
    repeats: int = 10
    readme: Path | None = None
    world: Any = None  #: a full ``WorldSpec`` (overrides users/images/seed; tests use a tiny one)
    timings: dict = field(default_factory=dict)


class _Stages:
    """Numbered, timed stage banners on the terminal (the demo is a CLI: stdout is its UI)."""

    def __init__(self, total: int, timings: dict):
        self.total, self.n, self.timings = total, 0, timings

    @contextlib.contextmanager
    def stage(self, title: str) -> Iterator[None]:
        self.n += 1
        print(f"\n[{self.n}/{self.total}] {title} ...", flush=True)
        t0 = time.perf_counter()
        yield
        dt = time.perf_counter() - t0
        self.timings[title] = dt
        print(f"[{self.n}/{self.total}] {title}: done in {dt:.1f}s", flush=True)


@contextlib.contextmanager
def _local_s3(endpoint: str) -> Iterator[str]:
    """Use `endpoint`, or start a moto S3 server on 127.0.0.1 for the duration of the demo."""
    if endpoint:
        yield endpoint
        return
    from piaa_dist.s3local import start_local_s3

    server = start_local_s3(bucket=BUCKET)
    try:
        yield server.endpoint_url
    finally:
        server.stop()


@contextlib.contextmanager
def _env(**values: str) -> Iterator[None]:
    """Set environment variables for the demo (Ray workers inherit them), restore afterwards."""
    old = {k: os.environ.get(k) for k in values}
    os.environ.update({k: v for k, v in values.items() if v is not None})
    try:
        yield
    finally:
        for k, v in old.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v


def _personalization_inputs(world: Path, out: Path, user: str, shots: int,
                            seed: int) -> tuple[Path, Path, list[str], dict]:
    """Write one test user's k ratings as a CSV; return it, the image folder, the images to
    score (the user's other rated images) and their true ratings."""
    from piaa_dist.data.synth import RATINGS_FILE

    rows = []
    with (world / RATINGS_FILE).open(newline="") as f:
        reader = csv.reader(f)
        next(reader)
        for row in reader:
            if len(row) >= 3 and row[0].strip() == user:
                rows.append((row[1].strip(), int(row[2].strip())))
    rng = random.Random(seed)
    rng.shuffle(rows)
    rated, rest = rows[:shots], rows[shots:]
    folder = out / "personalize"
    folder.mkdir(parents=True, exist_ok=True)
    ratings_csv = folder / f"{user}-ratings.csv"
    with ratings_csv.open("w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["image", "score"])
        w.writerows(rated)
    return ratings_csv, world / "images", [r[0] for r in rest], dict(rest)


def run_demo(settings: DemoSettings) -> dict[str, Any]:
    """Run every stage; return a summary (paths, registry URIs, headline numbers).

    Raises:
        Whatever a stage raises; processes started so far are stopped first.
    """
    from piaa_dist import presentation
    from piaa_dist.checkpoint import WEIGHTS_FILE
    from piaa_dist.config import load_config
    from piaa_dist.data.synth import TEST_WORKERS_FILE
    from piaa_dist.orchestration import report, usecases

    out = Path(settings.out).resolve()
    out.mkdir(parents=True, exist_ok=True)
    mlflow_uri = settings.mlflow_uri or f"sqlite:///{out / 'mlflow.db'}"
    timings = settings.timings
    stages = _Stages(8 if not settings.data else 6, timings)
    summary: dict[str, Any] = {"out": str(out), "mlflow_uri": mlflow_uri}
    cfg = load_config(settings.config, settings.overrides)

    with contextlib.ExitStack() as stack:
        with stages.stage("local S3 endpoint" if not settings.s3_endpoint else "S3 endpoint"):
            given = settings.s3_endpoint or ("" if not settings.data else os.environ.get("AWS_ENDPOINT_URL", ""))
            endpoint = stack.enter_context(_local_s3(given))
            creds = {"AWS_ACCESS_KEY_ID": os.environ.get("AWS_ACCESS_KEY_ID", "testing"),
                     "AWS_SECRET_ACCESS_KEY": os.environ.get("AWS_SECRET_ACCESS_KEY", "testing"),
                     "AWS_DEFAULT_REGION": os.environ.get("AWS_DEFAULT_REGION", "us-east-1")}
            stack.enter_context(_env(AWS_ENDPOINT_URL=endpoint, MLFLOW_TRACKING_URI=mlflow_uri, **creds))
            summary["s3_endpoint"] = endpoint
            print(f"    S3 endpoint {endpoint or '(AWS default)'}; MLflow {mlflow_uri}")

        world = out / "world"
        data_url = settings.data
        if not data_url:
            with stages.stage("synthetic PIAA world"):
                spec = settings.world
                summary_world = usecases.synth(
                    out=world,
                    **({"users": settings.users, "images": settings.images, "seed": settings.seed}
                       if spec is None else {"users": spec.users, "images": spec.images,
                                             "seed": spec.seed, "test_fraction": spec.test_fraction,
                                             "ratings_per_user": spec.ratings_per_user,
                                             "image_size": spec.image_size}),
                )
                summary["world"] = {"users": summary_world.users, "images": summary_world.images,
                                    "ratings": summary_world.ratings}
                print(f"    {summary_world.ratings} ratings by {summary_world.users} users "
                      f"({summary_world.test_users} test) on {summary_world.images} images -> {world}")
            with stages.stage("ingest into S3 shards"):
                data_url = f"s3://{BUCKET}/world"
                ingest_report = _ingest(world, data_url, endpoint)
                summary["ingest"] = ingest_report
                # The local S3 endpoint goes away with the demo; a folder copy of the same
                # shards keeps the report's follow-up commands runnable afterwards.
                usecases.ingest(format="flickr-aes", root=world, out=str(out / "shards"),
                                test_users=world / TEST_WORKERS_FILE)
        summary["data"] = data_url

        # Without --ray-address each Ray stage (train, tune) starts its own local Ray and stops
        # it when done, so nothing one stage reserved can starve the next.
        ray_address = settings.ray_address or None

        name = cfg.run.register_name or "blg-piaa"
        champion = f"models:/{name}@champion"
        with stages.stage(f"meta-training on Ray ({settings.workers} Train workers)"):
            train_out = out / "train"
            # Registered, and promoted to champion if it beats the version holding the alias.
            trained = usecases.train(
                data=data_url, out=train_out, config=settings.config,
                overrides=[*settings.overrides, f"run.register_name={name}"], alias="champion",
                workers=settings.workers, s3_endpoint=endpoint or None, mlflow_uri=mlflow_uri,
                progress=False, ray_address=ray_address,
            )
            train_val = trained.val_srocc
            summary["train"] = {"model": str(trained.model_dir), "step": trained.step,
                                "best_step": trained.best_step, "stopped_early": trained.stopped_early,
                                "val_srocc": train_val, "mlflow_run_id": trained.mlflow_run_id,
                                "registered": trained.registered}
            # The registered model is the best validation checkpoint, not the last step's.
            ended = "stopped on its validation plateau" if trained.stopped_early else "ran all its meta-steps"
            if train_val is None:  # no validation configured: the last step is the model
                print(f"    meta-learner at step {trained.step} (no validation users: the last step)")
            else:
                print(f"    meta-training {ended} at step {trained.step}; best validation checkpoint "
                      f"(written, registered) at step {trained.best_step}, validation SROCC {train_val:.3f}")
            print(f"    {trained.promotion.message}")
            promotion, best_from = trained.promotion, "train"

        sweep = None
        if settings.tune_samples > 0:
            with stages.stage(f"Ray Tune sweep ({settings.tune_samples} trials, ASHA), refit of the winner"):
                # Short trials rank the hyperparameters; the winner is refit to full length and
                # becomes champion only if it beats the trained one on the same validation users.
                # A winner that is the config's own values would refit the run just trained:
                # no refit then, the trained (already registered) run is the winner.
                sweep = usecases.tune(
                    data=data_url, out=out / "tune", config=settings.config,
                    overrides=[*settings.overrides, *settings.tune_overrides, f"run.register_name={name}"],
                    samples=settings.tune_samples, workers_per_trial=1, alias="champion",
                    s3_endpoint=endpoint or None, mlflow_uri=mlflow_uri, ray_address=ray_address,
                    progress=False, trained=trained,
                )
                print(sweep.trials_table())
                for line in sweep.summary_lines():
                    print(f"    {line}")
                summary["tune"] = sweep.to_dict(trials=False)
                promotion = sweep.promotion
                if promotion.promoted and not sweep.winner_is_trained:
                    best_from = "tune"

        # The alias is where the last promotion left it; its holder's score on these users.
        version = promotion.holder
        best_score = promotion.val_srocc if promotion.holder == promotion.version else promotion.champion_val_srocc
        summary["registry"] = {"name": name, "version": version, "alias": champion, "source": best_from,
                               "val_srocc": best_score, "message": promotion.message}

        with stages.stage(f"meta-testing at {', '.join(map(str, settings.shots))} shots "
                          f"({settings.workers} Ray workers)"):
            eval_json = out / "evaluate.json"
            giaa_dir = trained.model_dir / "giaa"
            # The demo config is the evaluation's: its protocol and its GIAA budget.
            result_eval = usecases.evaluate(
                data=data_url, model=champion, shots=settings.shots, repeats=settings.repeats,
                json_out=eval_json, s3_endpoint=endpoint or None, mlflow_uri=mlflow_uri,
                giaa=giaa_dir if (giaa_dir / WEIGHTS_FILE).is_file() else None,
                config=settings.config, overrides=settings.overrides, workers=settings.workers,
            )
            print(presentation.format_table(result_eval))
            summary["evaluate"] = str(eval_json)

        personal_lines: list[str] = []
        personal_plot = None
        if not settings.data:
            with stages.stage("personalize one test user from 10 ratings"):
                personal_lines, personal_plot = _personalize_one(champion, world, out, mlflow_uri, settings)

        with stages.stage("report"):
            plots = {}
            fig = presentation.plot_srocc_vs_shots(result_eval)
            plots["SROCC against shots (mean ± spread over repeats; dashed: ceilings)"] = \
                presentation.save_figure(fig, out / "plots" / "srocc_vs_shots.png").relative_to(out).as_posix()
            fig = presentation.plot_training_curves(train_out / "metrics.jsonl")
            plots[f"Meta-training to its validation plateau ({settings.workers} Ray Train workers; "
                  "star: the best validation checkpoint, the registered model)"] = \
                presentation.save_figure(fig, out / "plots" / "training_curves.png").relative_to(out).as_posix()
            if personal_plot is not None:
                saved = presentation.save_figure(personal_plot, out / "plots" / "personalized_user.png")
                plots["One test user: predicted against true after 10-shot adaptation"] = \
                    saved.relative_to(out).as_posix()
            # the S3 endpoint the demo started is gone by now; its folder copy is not
            follow_data = str(out / "shards") if not settings.data else data_url
            summary_lines = [
                f"Data: `{data_url}`" + (f" (S3 endpoint `{endpoint}`)" if endpoint else ""),
                f"Meta-learner: `{cfg.model.backbone}` backbone, {cfg.meta.flavour.replace('_', '-')} "
                f"meta-gradients, {settings.workers} Ray Train workers, "
                f"{summary['train']['step']} meta-steps"
                + (" (stopped on its validation plateau)" if summary["train"]["stopped_early"] else "")
                + f"; the best validation checkpoint, step {summary['train']['best_step']}, is the model.",
                f"Champion: `{champion}` (version {version}, from the {best_from} run): "
                f"{summary['registry']['message']}.",
            ]
            # Only the embedded-defaults demo owns the README's table (not a run on real data).
            # The block goes to a file of this run: the README is copied from it on request
            # (`make readme-results` / --readme), so running the demo leaves the checkout clean.
            readme_block_file = None
            readme_lines: list[str] = []
            if not settings.data:
                readme_block_file = out / report.README_BLOCK_FILE
                readme_block_file.write_text(
                    report.readme_block(result_eval, summary.get("world", {}).get("users", "?")) + "\n")
                readme_lines = report.readme_instructions(readme_block_file)
            path = report.write_report(out, {
                "title": "piaa-dist demo report",
                "summary": summary_lines,
                "results": result_eval,
                "plots": plots,
                "personalization": personal_lines,
                "readme": readme_lines,
                "registry": [
                    f"- tracking URI: `{mlflow_uri}`",
                    f"- registered model `{name}`, version {version}, alias `champion` → `{champion}`",
                    f"- training run: `{summary['train'].get('mlflow_run_id')}`",
                ],
                "commands": [
                    f"mlflow ui --backend-store-uri {mlflow_uri}   # runs, metrics, plots, registry",
                    "ray start --head --dashboard-host 127.0.0.1   # then open http://127.0.0.1:8265",
                    f"MLFLOW_TRACKING_URI={mlflow_uri} piaa-dist evaluate "
                    f"--data {follow_data} --model {champion} --shots 10 100 --repeats 10 --json eval.json",
                    f"MLFLOW_TRACKING_URI={mlflow_uri} piaa-dist personalize --model {champion} "
                    "--ratings my_ratings.csv --images my_photos/ --score new_photos/ --out ranking.csv",
                ],
                "timings": timings,
            })
            summary["report"] = str(path)
            if readme_block_file is not None:
                summary["readme_block"] = str(readme_block_file)
                if settings.readme is not None:
                    if report.update_readme(settings.readme, readme_block_file.read_text()):
                        print(f"    README results table updated: {settings.readme}")
                    else:
                        log.warning("%s has no %s ... %s markers: README left as it is",
                                    settings.readme, report.README_START, report.README_END)
            print(f"    report: {path}")
    summary["timings"] = dict(timings)
    (out / "demo-summary.json").write_text(json.dumps(summary, indent=2, default=str))
    return summary


def _ingest(world: Path, data_url: str, endpoint: str) -> dict:
    """Ingest the synthetic world (FLICKR-AES layout) into ``data_url``; print the report."""
    from piaa_dist.data.ingest import format_report
    from piaa_dist.data.synth import TEST_WORKERS_FILE
    from piaa_dist.orchestration.usecases import ingest

    rep = ingest(format="flickr-aes", root=world, out=data_url, test_users=world / TEST_WORKERS_FILE,
                 s3_endpoint=endpoint or None, progress=True)
    print(format_report(rep))
    return rep


def _personalize_one(champion: str, world: Path, out: Path, mlflow_uri: str,
                     settings: DemoSettings) -> tuple[list[str], Any]:
    """Personalize the first test user from 10 ratings; compare with their other ratings."""
    import numpy as np

    from piaa_dist.data.synth import TEST_WORKERS_FILE
    from piaa_dist.metrics import srocc
    from piaa_dist.orchestration.usecases import personalize
    from piaa_dist.presentation import plot_predicted_vs_true

    with (world / TEST_WORKERS_FILE).open() as f:
        user = [line.strip() for line in f if line.strip()][1]
    ratings_csv, images_dir, to_score, truth = _personalization_inputs(world, out, user, 10, settings.seed)
    ranking = personalize(model=champion, ratings=ratings_csv, images=images_dir,
                          score=[images_dir / n for n in to_score],
                          out=out / "personalize" / f"{user}-ranking.csv",
                          mlflow_uri=mlflow_uri, seed=settings.seed)
    ranking_csv = ranking.out
    pred = np.array([s for _, s in ranking.ranked])
    true = np.array([truth[p.name] for p, _ in ranking.ranked], dtype=float)
    rho = float(srocc(pred, true))
    lines = [
        f"- user `{user}` (a test user, never seen in training) rated 10 images: "
        f"`{ratings_csv.relative_to(out)}`",
        f"- the champion adapted to them ranked their {len(ranking)} other rated images: "
        f"`{ranking_csv.relative_to(out)}`",
        f"- SROCC of that ranking against the user's own ratings: **{rho:.3f}**",
        f"- fine-tuning: {ranking.finetune}",
        f"- command: `piaa-dist personalize --model {champion} --ratings {ratings_csv} "
        f"--images {images_dir} --score <images> --out ranking.csv`",
    ]
    print(f"    user {user}: SROCC {rho:.3f} over {len(ranking)} images -> {ranking_csv}")
    fig = plot_predicted_vs_true(pred, true, f"user {user}: SROCC {rho:.3f} ({len(ranking)} images)")
    return lines, fig
