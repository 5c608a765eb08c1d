"""The README's "Using it" sequence on the default synthetic world, and what the registry ends with.

Runs the ``piaa-dist`` lines of the README's "Using it" block as a new user would (the 1M-user
scale world and ``s3-local`` itself left out: this script starts the local S3 endpoint and
applies its exports), in a fresh working folder, then measures every registered version of
``blg-piaa`` with one fixed protocol:

* **val SROCC**: ``evaluate.validation_srocc`` on the validation users of
  ``jobs/configs/cpu.yaml`` (8 held-out training users, 10 shots, 10 repeats, the config's
  fine-tuning budget), the same users and protocol for every version;
* **test SROCC 10 / 100-shot**: ``piaa-dist evaluate`` of that version (``blg-piaa`` only, 10
  repeats) on the test users;
* **alias**: the aliases that point at it when the sequence is done.

It also keeps what the train and tune commands printed about the registry (their last lines),
and the README's own ``evaluate`` of the alias (with the GIAA baseline).

``--code DIR`` runs another checkout's README and code (e.g. the main branch, for a before /
after table); by default this checkout's. Usage::

    python benchmarks/readme_flow.py [--code DIR] [--label after] [--work DIR]

Writes ``benchmarks/results/readme_flow-<label>.json`` and prints a table. Slow: the whole
sequence at full size (minutes to an hour on a busy 2-core machine).
"""

from __future__ import annotations

import argparse
import csv
import json
import os
import re
import shlex
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "benchmarks" / "results"


def readme_commands(readme: Path) -> list[str]:
    """The ``piaa-dist`` lines of the README's "Using it" bash block (comments dropped)."""
    text = readme.read_text()
    section = text[text.index("## Using it"):]
    start = section.index("```bash\n") + len("```bash\n")
    block = section[start:section.index("\n```", start)]
    lines = []
    for raw in block.splitlines():
        line = raw.split("  #")[0].strip()
        if line.startswith("piaa-dist ") and " s3-local" not in line and "--scale" not in line:
            lines.append(line)
    return lines


def _personal_files(work: Path) -> None:
    """``me.csv``, ``my_photos/`` and ``new_photos/`` of one test user of ``world`` (what the
    README's personalize line names)."""
    world = work / "world"
    user = [line.strip() for line in (world / "test_workers.csv").read_text().splitlines() if line.strip()][1]
    rows = [r for r in csv.reader((world / "FLICKR-AES_image_labeled_by_each_worker.csv").open())
            if r and r[0].strip() == user]
    (work / "me.csv").write_text("image,score\n" + "".join(f"{r[1].strip()},{r[2].strip()}\n" for r in rows[:10]))
    (work / "my_photos").mkdir(exist_ok=True)
    (work / "new_photos").mkdir(exist_ok=True)
    for r in rows[:10]:
        shutil.copy(world / "images" / r[1].strip(), work / "my_photos")
    for r in rows[10:30]:
        shutil.copy(world / "images" / r[1].strip(), work / "new_photos")


def run_flow(code: Path, work: Path, env: dict) -> list[dict]:
    """Run the README's lines in ``work``; return one record per command."""
    records = []
    for line in readme_commands(code / "README.md"):
        argv = shlex.split(line)
        if argv[1] == "personalize":
            _personal_files(work)
        t0 = time.perf_counter()
        proc = subprocess.run([sys.executable, "-m", "piaa_dist.cli", *argv[1:]], cwd=work, env=env,
                              capture_output=True, text=True)
        seconds = time.perf_counter() - t0
        (work / f"log-{len(records):02d}-{argv[1]}.txt").write_text(proc.stdout + proc.stderr)
        print(f"[{seconds:7.1f}s] rc={proc.returncode} {line}", flush=True)
        records.append({"command": line, "rc": proc.returncode, "seconds": round(seconds, 1),
                        "stdout_tail": proc.stdout.splitlines()[-12:],
                        "stderr_tail": proc.stderr.splitlines()[-6:]})
        if proc.returncode != 0:
            print(proc.stdout[-3000:] + proc.stderr[-3000:], flush=True)
            break
    return records


def measure_versions(code: Path, work: Path, data: str, env: dict, name: str = "blg-piaa") -> list[dict]:
    """Every version of ``name``: source, fixed-protocol val SROCC, test SROCC, aliases."""
    from mlflow import MlflowClient

    from piaa_dist.checkpoint import load_model
    from piaa_dist.config import load_config
    from piaa_dist.data.stream import Dataset
    from piaa_dist.evaluate import validation_srocc
    from piaa_dist.orchestration.tracking import resolve_model
    from piaa_dist.train import validation_users

    uri = f"sqlite:///{work / 'mlflow.db'}"
    client = MlflowClient(tracking_uri=uri)
    protocol = load_config(code / "jobs" / "configs" / "cpu.yaml")
    dataset = Dataset.open(data, endpoint_url=env["AWS_ENDPOINT_URL"])
    users = validation_users(protocol, dataset)
    # search results do not carry aliases: the registered model does
    aliases: dict[int, list[str]] = {}
    for alias, version in (client.get_registered_model(name).aliases or {}).items():
        aliases.setdefault(int(version), []).append(alias)
    rows = []
    for mv in sorted(client.search_model_versions(f"name='{name}'"), key=lambda v: int(v.version)):
        folder = resolve_model(f"models:/{name}/{mv.version}", uri=uri, dst=work / f"v{mv.version}")
        model, model_cfg, info = load_model(folder)
        # one protocol for every version: cpu.yaml's eval budget and seed, each model's own
        # architecture and adaptation parameters
        from piaa_dist.config import config_from_dict, config_to_dict

        d = config_to_dict(model_cfg)
        d["eval"] = config_to_dict(protocol)["eval"]
        d["run"]["seed"] = protocol.run.seed
        cfg = config_from_dict(d)
        val = validation_srocc(cfg, dataset, model, users, shots=min(protocol.eval.shots),
                               repeats=protocol.eval.repeats)
        out_json = work / f"eval-v{mv.version}.json"
        subprocess.run([sys.executable, "-m", "piaa_dist.cli", "evaluate", "--data", data, "--model",
                        f"models:/{name}/{mv.version}", "--shots", "10", "100", "--repeats", "10",
                        "--json", str(out_json), "--no-mlflow", "--no-progress", "eval.methods=[blg-piaa]"],
                       cwd=work, env=env, check=True, capture_output=True, text=True)
        result = json.loads(out_json.read_text())["methods"]["blg-piaa"]
        run = client.get_run(mv.run_id)
        rows.append({
            "version": int(mv.version),
            "source": run.data.tags.get("piaa_dist.kind", "?"),
            "steps": int(info.get("step") or info.get("metrics", {}).get("step") or 0) or None,
            "val_srocc": round(float(val), 4),
            "test_srocc_10": round(result["10"]["srocc_mean"], 4),
            "test_srocc_100": round(result["100"]["srocc_mean"], 4),
            "aliases": sorted(aliases.get(int(mv.version), [])),
            "tags": {k: v for k, v in (mv.tags or {}).items() if not k.endswith("sha256")},
        })
    return rows


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--code", default=str(ROOT), help="checkout whose README and code run")
    parser.add_argument("--label", default="after", help="results name: readme_flow-LABEL.json")
    parser.add_argument("--work", default="", help="working folder (default: a new temporary one)")
    parser.add_argument("--measure-only", action="store_true",
                        help="measure the registry a previous run left in --work (no commands)")
    args = parser.parse_args()
    code = Path(args.code).resolve()
    sys.path.insert(0, str(code))
    work = Path(args.work or tempfile.mkdtemp(prefix="readme-flow-")).resolve()
    work.mkdir(parents=True, exist_ok=True)
    if not (work / "jobs").exists():
        (work / "jobs").symlink_to(code / "jobs")

    from piaa_dist.s3local import FAKE_CREDENTIALS, start_local_s3

    s3 = start_local_s3(bucket="piaa")
    env = {k: v for k, v in os.environ.items() if k not in ("MLFLOW_TRACKING_URI", "AWS_PROFILE")}
    env.update(FAKE_CREDENTIALS, AWS_ENDPOINT_URL=s3.endpoint_url, PYTHONPATH=str(code))
    os.environ.update(FAKE_CREDENTIALS)
    t0 = time.perf_counter()
    previous = RESULTS / f"readme_flow-{args.label}.json"
    try:
        if args.measure_only:
            # the S3 endpoint was in memory: the dataset is ingested again from the same world
            commands = json.loads(previous.read_text())["commands"]
            ingest = next(c["command"] for c in commands if " ingest " in f" {c['command']} ")
            subprocess.run([sys.executable, "-m", "piaa_dist.cli", *shlex.split(ingest)[1:]], cwd=work,
                           env=env, check=True, capture_output=True)
        else:
            commands = run_flow(code, work, env)
        data = next(re.search(r"--data (\S+)", c["command"]).group(1) for c in commands
                    if " evaluate " in f" {c['command']} ")
        versions = measure_versions(code, work, data, env)
    finally:
        s3.stop()
    champion = json.loads((work / "eval.json").read_text()) if (work / "eval.json").is_file() else None
    payload = {"label": args.label, "code": str(code), "work": str(work),
               "seconds": round(time.perf_counter() - t0, 1), "commands": commands,
               "versions": versions,
               "champion_eval": None if champion is None else {
                   m: {k: round(v["srocc_mean"], 4) for k, v in by_k.items()}
                   for m, by_k in champion["methods"].items()},
               "load_average_1m": os.getloadavg()[0]}
    from _util import machine, save, table  # this script's folder (benchmarks/) is on sys.path

    payload["machine"] = machine()
    print(table([{**v, "alias": ",".join(v["aliases"]) or "-", "steps": v["steps"] or 0} for v in versions],
                [("version", "version", "d"), ("source", "source", "s"), ("steps", "steps", "d"),
                 ("val_srocc", "val SROCC", ".3f"), ("test_srocc_10", "test 10-shot", ".3f"),
                 ("test_srocc_100", "test 100-shot", ".3f"), ("alias", "alias", "s")]))
    for c in commands:
        if c["command"].split()[1] in ("train", "tune"):
            print(f"\n$ {c['command']}\n" + "\n".join(c["stdout_tail"][:6]))
    print(f"\nchampion's evaluate: {payload['champion_eval']}")
    print(f"wrote {save(f'readme_flow-{args.label}', payload)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
