"""Static checks of cluster/ and docker/: valid, and consistent with the package and each other.

Nothing here starts a container or a cluster (neither can run in CI). The Ray cluster launcher
config goes through Ray's own ``prepare_config`` + ``validate_config`` (what ``ray up`` runs
before touching AWS); the KubeRay manifest is checked against the ``ray.io/v1`` field names; the
compose file and the Dockerfile are parsed and cross-checked: entry points, console script,
ports, environment variables, image versions, bucket names.
"""

from __future__ import annotations

import ast
import copy
import fnmatch
import re
import shlex
import shutil
import subprocess
from pathlib import Path
from urllib.parse import urlparse

import pytest
import tomllib
import yaml

from piaa_dist.config import load_config

REPO = Path(__file__).resolve().parents[1]
CLUSTER = REPO / "cluster"
DOCKER = REPO / "docker"

# The ports every deployment must agree on.
GCS, DASHBOARD, CLIENT, MLFLOW, MINIO = 6379, 8265, 10001, 5000, 9000
RAY_PORTS = {"--port": GCS, "--dashboard-port": DASHBOARD, "--ray-client-server-port": CLIENT}
# The environment variables the package reads (checked below to be read somewhere in piaa_dist).
ENV_NAMES = ("AWS_ENDPOINT_URL", "MLFLOW_TRACKING_URI")
# Ray job entry points of issue 4 (jobs/ is written alongside; the specs and docs name these).
EXPECTED_JOBS = ("jobs/train.py", "jobs/tune.py", "jobs/evaluate.py", "jobs/personalize.py")

# KubeRay ray.io/v1 field names (KubeRay API reference, v1.1-v1.4): a misspelt field is silently
# dropped by the API server's pruning, so unknown keys are errors here.
RAYJOB_SPEC_FIELDS = {
    "activeDeadlineSeconds", "backoffLimit", "rayClusterSpec", "submitterPodTemplate", "metadata",
    "clusterSelector", "submitterConfig", "managedBy", "deletionStrategy", "entrypoint",
    "runtimeEnvYAML", "jobId", "submissionMode", "entrypointResources", "entrypointNumCpus",
    "entrypointNumGpus", "ttlSecondsAfterFinished", "shutdownAfterJobFinishes", "suspend",
}
RAYCLUSTER_SPEC_FIELDS = {
    "authOptions", "suspend", "managedBy", "autoscalerOptions", "headServiceAnnotations",
    "enableInTreeAutoscaling", "gcsFaultToleranceOptions", "headGroupSpec", "rayVersion",
    "workerGroupSpecs",
}
HEAD_GROUP_FIELDS = {"template", "headService", "enableIngress", "rayStartParams", "serviceType"}
WORKER_GROUP_FIELDS = {
    "groupName", "replicas", "minReplicas", "maxReplicas", "idleTimeoutSeconds", "rayStartParams",
    "template", "scaleStrategy", "numOfHosts", "suspend",
}
SUBMISSION_MODES = {"K8sJobMode", "HTTPMode", "InteractiveMode", "SidecarMode"}


# ---------------------------------------------------------------------------------------------
# loading helpers


def _yaml_files() -> list[Path]:
    return sorted(p for d in (CLUSTER, DOCKER) for p in d.iterdir() if p.suffix in (".yaml", ".yml"))


def _load(path: Path) -> dict:
    docs = [d for d in yaml.safe_load_all(path.read_text()) if d is not None]
    assert len(docs) == 1, f"{path}: expected one YAML document"
    assert isinstance(docs[0], dict), f"{path}: top level must be a mapping"
    return docs[0]


@pytest.fixture(scope="module")
def aws() -> dict:
    return _load(CLUSTER / "aws-gpu.yaml")


@pytest.fixture(scope="module")
def rayjob() -> dict:
    return _load(CLUSTER / "kuberay.yaml")


@pytest.fixture(scope="module")
def compose() -> dict:
    return _load(DOCKER / "compose.yaml")


@pytest.fixture(scope="module")
def pyproject() -> dict:
    return tomllib.loads((REPO / "pyproject.toml").read_text())


def _dockerfile() -> list[tuple[str, str]]:
    """(INSTRUCTION, arguments) pairs with line continuations joined and comments dropped."""
    text = (DOCKER / "Dockerfile").read_text()
    logical, buf = [], ""
    for line in text.splitlines():
        if not buf and (not line.strip() or line.lstrip().startswith("#")):
            continue
        if buf and line.lstrip().startswith("#"):
            continue  # comment lines inside a continued instruction
        if line.rstrip().endswith("\\"):
            buf += line.rstrip()[:-1] + " "
            continue
        logical.append(buf + line)
        buf = ""
    out = []
    for item in logical:
        instr, _, args = item.strip().partition(" ")
        out.append((instr.upper(), args.strip()))
    return out


def _dockerfile_args() -> dict[str, str]:
    args = {}
    for instr, rest in _dockerfile():
        if instr == "ARG" and "=" in rest:
            k, v = rest.split("=", 1)
            args[k.strip()] = v.strip().strip('"')
    return args


def _all_strings(obj) -> list[str]:
    if isinstance(obj, str):
        return [obj]
    if isinstance(obj, dict):
        return [s for k, v in obj.items() for s in _all_strings(k) + _all_strings(v)]
    if isinstance(obj, list):
        return [s for v in obj for s in _all_strings(v)]
    return []


def _flag_value(args: list[str], flag: str) -> str | None:
    for i, a in enumerate(args):
        if a == flag and i + 1 < len(args):
            return args[i + 1]
        if a.startswith(flag + "="):
            return a.split("=", 1)[1]
    return None


def _ray_start_ports(command: str) -> dict[str, int]:
    args = shlex.split(command.replace(";", " "))
    ports = {}
    for flag in ("--port", "--dashboard-port", "--ray-client-server-port"):
        value = _flag_value(args, flag)
        if value is not None:
            ports[flag] = int(value)
    return ports


def _image_name(ref: str) -> str:
    """'public.ecr.aws/x/piaa-dist:0.1.0' -> 'piaa-dist:0.1.0'."""
    return ref.rsplit("/", 1)[-1]


def _compose_env(service: dict) -> dict[str, str]:
    env = service.get("environment") or {}
    if isinstance(env, list):
        env = dict(e.split("=", 1) for e in env)
    return {k: str(v) for k, v in env.items()}


def _k8s_env(container: dict) -> dict[str, str]:
    return {e["name"]: str(e.get("value", "")) for e in container.get("env", [])}


def _rayjob_containers(rayjob: dict) -> list[dict]:
    spec = rayjob["spec"]["rayClusterSpec"]
    groups = [spec["headGroupSpec"], *spec["workerGroupSpecs"]]
    return [c for g in groups for c in g["template"]["spec"]["containers"]]


# ---------------------------------------------------------------------------------------------
# every file


def test_every_yaml_parses_and_the_expected_files_exist():
    names = {p.relative_to(REPO).as_posix() for p in _yaml_files()}
    assert {"cluster/aws-gpu.yaml", "cluster/kuberay.yaml", "docker/compose.yaml"} <= names
    for path in _yaml_files():
        _load(path)
    assert (DOCKER / "Dockerfile").is_file()
    assert (DOCKER / "Dockerfile.dockerignore").is_file()


def test_entry_points_named_in_the_specs_exist_and_accept_their_flags():
    """Every `jobs/*.py` and `jobs/configs/*.yaml` mentioned anywhere in cluster/ or docker/."""
    texts = {p: p.read_text() for p in [*_yaml_files(), DOCKER / "Dockerfile"]}
    scripts = {m for t in texts.values() for m in re.findall(r"\bjobs/[\w/-]+\.py\b", t)}
    configs = {m for t in texts.values() for m in re.findall(r"\bjobs/configs/[\w-]+\.ya?ml\b", t)}
    assert set(EXPECTED_JOBS) <= scripts, "the specs/docs should name every Ray job entry point"
    for rel in sorted(scripts | set(EXPECTED_JOBS)):
        assert (REPO / rel).is_file(), f"{rel} is named in cluster/ or docker/ but does not exist"
    for rel in sorted(configs):
        assert (REPO / rel).is_file(), f"{rel} is named in cluster/ or docker/ but does not exist"
        load_config(REPO / rel)  # valid against the typed config


def test_console_script_matches_the_package(pyproject):
    scripts = pyproject["project"]["scripts"]
    assert scripts["piaa-dist"] == "piaa_dist.cli:main"
    from piaa_dist import cli

    assert callable(cli.main)
    # every `piaa-dist <subcommand>` the specs run exists (commands only: YAML values, RUN/CMD)
    commands = [s for p in _yaml_files() for s in _all_strings(_load(p))]
    commands += [a for i, a in _dockerfile() if i in ("RUN", "CMD", "ENTRYPOINT")]
    invoked = [m for c in commands for m in re.findall(r"(?:^|[\s;&|\"'\[,])piaa-dist\s+([\w-]+)", c)]
    for sub in invoked:
        assert sub.startswith("-") or sub in cli.COMMANDS, f"`piaa-dist {sub}` is not a subcommand"
    assert any(re.search(r"\bpiaa-dist --help\b", c) for c in commands), "specs should smoke-test the console script"
    cmd = next(a for i, a in _dockerfile() if i == "CMD")
    assert "piaa-dist" in cmd


def test_the_package_reads_the_env_vars_the_specs_set():
    """The names are string literals somewhere in piaa_dist (os.environ lookups)."""
    literals: set[str] = set()
    for path in (REPO / "piaa_dist").rglob("*.py"):
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Constant) and isinstance(node.value, str):
                literals.add(node.value)
    for name in ENV_NAMES:
        assert name in literals, f"no module of piaa_dist reads ${name}"


def test_image_versions_agree(aws, rayjob, compose, pyproject):
    version = pyproject["project"]["version"]
    refs = [aws["docker"]["image"], *(c["image"] for c in _rayjob_containers(rayjob))]
    refs += [s["image"] for s in compose["services"].values() if "build" in s]
    assert {_image_name(r) for r in refs} == {f"piaa-dist:{version}"}
    # the image's Ray version is the RayCluster's rayVersion and meets the package's floor
    ray_version = _dockerfile_args()["RAY_VERSION"]
    assert rayjob["spec"]["rayClusterSpec"]["rayVersion"] == ray_version
    floor = next(d for d in pyproject["project"]["dependencies"] if d.startswith("ray["))
    floor_v = re.search(r">=\s*([\d.]+)", floor).group(1)
    as_tuple = lambda v: tuple(int(x) for x in v.split("."))  # noqa: E731
    assert as_tuple(ray_version) >= as_tuple(floor_v)


# ---------------------------------------------------------------------------------------------
# cluster/aws-gpu.yaml


def test_aws_cluster_config_passes_rays_own_validation(aws):
    from ray.autoscaler._private.util import prepare_config, validate_config

    validate_config(prepare_config(copy.deepcopy(aws)))
    # the validator is strict: a misspelt top-level key is refused (so the pass above means something)
    import jsonschema

    bad = copy.deepcopy(aws)
    bad["max_worker"] = bad.pop("max_workers")
    with pytest.raises(jsonschema.ValidationError):
        validate_config(prepare_config(bad))


def test_aws_cluster_has_gpu_workers_sized_for_the_gpu_job(aws):
    assert aws["provider"]["type"] == "aws"
    types = aws["available_node_types"]
    head = types[aws["head_node_type"]]
    assert head.get("resources", {}).get("GPU", 0) == 0, "keep Train workers off the head"
    instance = {name: t["node_config"]["InstanceType"] for name, t in types.items()}
    gpu_types = {n: t for n, t in types.items() if t.get("resources", {}).get("GPU", 0) > 0}
    families = {instance[n].split(".")[0] for n in gpu_types}
    assert {"g5", "p4d"} <= families
    gpu_cfg = load_config(REPO / "jobs/configs/gpu.yaml")
    for name, t in gpu_types.items():
        res = t["resources"]
        assert res["CPU"] >= gpu_cfg.run.cpus_per_worker, name
    # enough GPUs for the GPU config's Train workers on either worker type
    assert any(t["max_workers"] * t["resources"]["GPU"] >= gpu_cfg.run.workers for t in gpu_types.values())
    assert sum(t.get("min_workers", 0) for t in types.values()) <= aws["max_workers"]


def test_aws_cluster_ports_env_image_and_setup(aws):
    head_cmds = " ".join(aws["head_start_ray_commands"])
    assert _ray_start_ports(head_cmds) == RAY_PORTS
    assert "--dashboard-host=0.0.0.0" in head_cmds
    assert any(f"$RAY_HEAD_IP:{GCS}" in c for c in aws["worker_start_ray_commands"])
    env = {}
    for opt in aws["docker"]["run_options"]:
        parts = shlex.split(opt)
        if parts[0] in ("-e", "--env"):
            k, v = parts[1].split("=", 1)
            env[k] = v
    for name in ENV_NAMES:
        assert env.get(name), f"docker run_options should set {name}"
    assert urlparse(env["MLFLOW_TRACKING_URI"]).port == MLFLOW
    # file mounts point at real local paths; the setup installs the synced package
    for remote, local in aws["file_mounts"].items():
        assert (REPO / local).exists(), f"file_mounts {remote}: {local} does not exist"
    setup = " ".join(aws["setup_commands"])
    assert "pip install" in setup and any(r in setup for r in aws["file_mounts"])


# ---------------------------------------------------------------------------------------------
# cluster/kuberay.yaml


def test_rayjob_uses_current_kuberay_fields(rayjob):
    assert rayjob["apiVersion"] == "ray.io/v1"
    assert rayjob["kind"] == "RayJob"
    spec = rayjob["spec"]
    assert set(spec) <= RAYJOB_SPEC_FIELDS, set(spec) - RAYJOB_SPEC_FIELDS
    assert spec.get("submissionMode", "K8sJobMode") in SUBMISSION_MODES
    cluster = spec["rayClusterSpec"]
    assert set(cluster) <= RAYCLUSTER_SPEC_FIELDS, set(cluster) - RAYCLUSTER_SPEC_FIELDS
    assert set(cluster["headGroupSpec"]) <= HEAD_GROUP_FIELDS
    assert cluster["workerGroupSpecs"], "needs a worker group"
    for group in cluster["workerGroupSpecs"]:
        assert set(group) <= WORKER_GROUP_FIELDS, set(group) - WORKER_GROUP_FIELDS
        # rayStartParams values must be strings (map[string]string in the CRD)
        assert all(isinstance(v, str) for v in group["rayStartParams"].values())
    assert all(isinstance(v, str) for v in cluster["headGroupSpec"]["rayStartParams"].values())
    runtime_env = yaml.safe_load(spec["runtimeEnvYAML"]) if "runtimeEnvYAML" in spec else {}
    assert isinstance(runtime_env, dict)


def test_rayjob_entrypoint_runs_a_real_job_with_a_valid_config(rayjob):
    spec = rayjob["spec"]
    args = shlex.split(spec["entrypoint"])
    assert args[:2] == ["python", "jobs/train.py"]
    # The job parses with its command's parser (commands/train.py's add_arguments), so its
    # options are read from that parser, not from the script's text; parsing the whole
    # entrypoint must succeed too (argparse exits on an unknown flag).
    import importlib.util

    spec_ = importlib.util.spec_from_file_location("job_entrypoint", REPO / args[1])
    job = importlib.util.module_from_spec(spec_)
    spec_.loader.exec_module(job)
    parser = job.build_parser()
    options = {o for action in parser._actions for o in action.option_strings}
    flags = [a.split("=", 1)[0] for a in args[2:] if a.startswith("--")]
    for flag in flags:
        assert flag in options, f"{args[1]} has no {flag} option"
    parser.parse_args(args[2:])
    overrides = [a for a in args[2:] if "=" in a and not a.startswith("--")]
    cfg = load_config(REPO / _flag_value(args, "--config"), overrides)
    assert _flag_value(args, "--data").startswith("s3://")
    env = _k8s_env(_rayjob_containers(rayjob)[0])
    assert _flag_value(args, "--mlflow-uri") == env["MLFLOW_TRACKING_URI"]
    # the worker group has one GPU per Train worker of that config
    group = spec["rayClusterSpec"]["workerGroupSpecs"][0]
    limits = group["template"]["spec"]["containers"][0]["resources"]["limits"]
    assert int(limits["nvidia.com/gpu"]) >= 1
    assert group["replicas"] * int(limits["nvidia.com/gpu"]) >= cfg.run.workers
    assert float(limits["cpu"]) >= cfg.run.cpus_per_worker
    assert cfg.run.use_gpu == "yes"
    # working_dir (if any) is where the image puts the repository
    runtime_env = yaml.safe_load(spec.get("runtimeEnvYAML", "")) or {}
    if "working_dir" in runtime_env:
        assert runtime_env["working_dir"] == "/home/ray/app"
        assert any(i == "WORKDIR" and a == "/home/ray/app" for i, a in _dockerfile())


def test_rayjob_ports_and_env(rayjob):
    cluster = rayjob["spec"]["rayClusterSpec"]
    head = cluster["headGroupSpec"]
    params = head["rayStartParams"]
    assert int(params.get("port", GCS)) == GCS
    assert int(params.get("dashboard-port", DASHBOARD)) == DASHBOARD
    assert int(params.get("ray-client-server-port", CLIENT)) == CLIENT
    head_ports = {p["containerPort"] for p in head["template"]["spec"]["containers"][0]["ports"]}
    assert {GCS, DASHBOARD, CLIENT} <= head_ports
    for container in _rayjob_containers(rayjob):
        env = _k8s_env(container)
        for name in ENV_NAMES:
            assert env.get(name), f"{container['name']} should set {name}"
        assert urlparse(env["AWS_ENDPOINT_URL"]).port == MINIO
        assert urlparse(env["MLFLOW_TRACKING_URI"]).port == MLFLOW
    for group in cluster["workerGroupSpecs"]:
        pod = group["template"]["spec"]
        assert pod.get("securityContext", {}).get("runAsNonRoot") is True
    assert head["template"]["spec"].get("securityContext", {}).get("runAsNonRoot") is True


# ---------------------------------------------------------------------------------------------
# docker/compose.yaml


def _service_ports(service: dict) -> set[int]:
    """Container ports; a published port must keep its number (the docs use localhost:PORT)."""
    ports = set()
    for p in service.get("ports", []):
        fields = str(p).split("/")[0].split(":")
        container = int(fields[-1])
        if len(fields) > 1:
            assert int(fields[-2]) == container, f"port {p}: host and container ports differ"
        ports.add(container)
    return ports


def test_compose_services_ports_and_env(compose):
    services = compose["services"]
    assert {"ray-head", "ray-worker", "minio", "minio-init", "mlflow"} <= set(services)
    assert {GCS, DASHBOARD, CLIENT} <= _service_ports(services["ray-head"])
    assert {MINIO, 9001} <= _service_ports(services["minio"])
    assert MLFLOW in _service_ports(services["mlflow"])

    head_cmd = " ".join(services["ray-head"]["command"])
    assert _ray_start_ports(head_cmd) == RAY_PORTS
    worker_cmd = " ".join(services["ray-worker"]["command"])
    assert f"--address=ray-head:{GCS}" in worker_cmd

    for name in ("ray-head", "ray-worker", "mlflow"):
        env = _compose_env(services[name])
        assert env.get("AWS_ENDPOINT_URL") == f"http://minio:{MINIO}", name
        assert env.get("MLFLOW_TRACKING_URI") == f"http://mlflow:{MLFLOW}", name


def test_compose_builds_from_the_dockerfile(compose):
    for name in ("ray-head", "ray-worker", "mlflow"):
        build = compose["services"][name]["build"]
        context = (DOCKER / build["context"]).resolve()
        assert context == REPO, f"{name}: build context should be the repository root"
        assert (context / build["dockerfile"]).resolve() == (DOCKER / "Dockerfile").resolve()


def test_compose_mlflow_server_and_buckets(compose):
    services = compose["services"]
    cmd = services["mlflow"]["command"]
    cmd = cmd if isinstance(cmd, list) else shlex.split(cmd)
    joined = " ".join(cmd)
    assert cmd[:2] == ["mlflow", "server"]
    assert f"--port={MLFLOW}" in joined and "--host=0.0.0.0" in joined
    backend = _flag_value(cmd, "--backend-store-uri")
    assert backend.startswith("sqlite:////")
    db_dir = str(Path(backend[len("sqlite:///"):]).parent)
    mounts = [str(v).split(":")[1] for v in services["mlflow"].get("volumes", [])]
    assert db_dir in mounts, "the SQLite store must live on a volume"
    assert "--serve-artifacts" in cmd or _flag_value(cmd, "--default-artifact-root")
    # MLflow 3's Host-header check must admit the name the other containers use
    uri = urlparse(_compose_env(services["ray-head"])["MLFLOW_TRACKING_URI"])
    assert uri.netloc in _flag_value(cmd, "--allowed-hosts").split(",")
    # the init job creates the artifact bucket and the bucket the job examples read from
    minio_init = services["minio-init"]
    init = " ".join(_all_strings(minio_init.get("entrypoint", [])) + _all_strings(minio_init.get("command", [])))
    assert "mc mb" in init
    art = urlparse(_flag_value(cmd, "--artifacts-destination") or "s3://none")
    buckets = set(re.findall(r"mc mb (?:--ignore-existing )?local/([\w.-]+)", init))
    assert art.netloc in buckets
    header = (DOCKER / "compose.yaml").read_text()
    data_buckets = {urlparse(u).netloc for u in re.findall(r"--data (s3://\S+)", header)}
    assert data_buckets and data_buckets <= buckets
    assert services["minio-init"]["depends_on"]["minio"]["condition"] == "service_healthy"


def test_docker_compose_config_if_available():
    """`docker compose config` validates the file without a daemon, when the plugin exists."""
    docker = shutil.which("docker")
    if docker is None:
        pytest.skip("docker CLI not installed")
    probe = subprocess.run([docker, "compose", "version"], capture_output=True, text=True)
    if probe.returncode != 0:
        pytest.skip("docker compose plugin not installed")
    proc = subprocess.run(
        [docker, "compose", "-f", str(DOCKER / "compose.yaml"), "config", "--quiet"],
        capture_output=True, text=True, cwd=REPO, timeout=60,
    )
    assert proc.returncode == 0, proc.stderr


# ---------------------------------------------------------------------------------------------
# docker/Dockerfile


def _ignored(rel: str, patterns: list[str]) -> bool:
    """Docker's rule: the last matching pattern wins; '!' re-includes; a dir match covers children."""
    ignored = False
    parts = rel.split("/")
    prefixes = ["/".join(parts[: i + 1]) for i in range(len(parts))]
    for pat in patterns:
        neg = pat.startswith("!")
        p = pat[1:] if neg else pat
        p = p.strip("/")
        if any(fnmatch.fnmatchcase(pre, p) or (p.startswith("**/") and fnmatch.fnmatchcase(pre.split("/")[-1], p[3:]))
               for pre in prefixes):
            ignored = not neg
    return ignored


def test_dockerfile_copies_existing_files_not_excluded_by_its_ignore_file():
    patterns = [
        line.strip()
        for line in (DOCKER / "Dockerfile.dockerignore").read_text().splitlines()
        if line.strip() and not line.startswith("#")
    ]
    copies = [a for i, a in _dockerfile() if i in ("COPY", "ADD")]
    assert copies
    for args in copies:
        parts = [p for p in shlex.split(args) if not p.startswith("--")]
        for src in parts[:-1]:
            assert (REPO / src).exists(), f"Dockerfile copies {src}, which does not exist"
            assert not _ignored(src, patterns), f"{src} is excluded by Dockerfile.dockerignore"
    # and the usual junk stays out of the build context
    for junk in (".venv/bin/python", ".git/HEAD", "mlflow.db", "mlruns/0", "out/x", "piaa_dist/__pycache__/x.pyc"):
        assert _ignored(junk, patterns), junk
    # the package must be installable from what is copied
    copied = {p for a in copies for p in shlex.split(a)[:-1] if not p.startswith("--")}
    assert {"pyproject.toml", "piaa_dist", "jobs"} <= copied
    readme = tomllib.loads((REPO / "pyproject.toml").read_text())["project"].get("readme")
    if readme:
        assert readme in copied, "pyproject's readme must be in the image for `pip install .`"


def test_dockerfile_base_user_pins_and_no_weight_downloads():
    instrs = _dockerfile()
    args = _dockerfile_args()
    froms = [a for i, a in instrs if i == "FROM"]
    assert len(froms) == 1 and froms[0].startswith("rayproject/ray:${RAY_VERSION}")
    users = [a for i, a in instrs if i == "USER"]
    assert users and users[-1] not in ("root", "0"), "the image must run as a non-root user"
    # torch pinned to the Makefile's versions
    makefile = (REPO / "Makefile").read_text()
    assert f'torch=={args["TORCH_VERSION"]}' in makefile
    assert f'torchvision=={args["TORCHVISION_VERSION"]}' in makefile
    runs = " ".join(a for i, a in instrs if i == "RUN")
    assert "torch==${TORCH_VERSION}" in runs and "pip install ." in runs
    for forbidden in ("wget", "curl", "torch.hub", "load_state_dict_from_url", "huggingface", ".pth"):
        assert forbidden not in runs, f"the image must not download weights ({forbidden})"
    exposed = {int(p) for i, a in instrs if i == "EXPOSE" for p in a.split()}
    assert {GCS, DASHBOARD, CLIENT, MLFLOW} <= exposed


# ---------------------------------------------------------------------------------------------
# The GPU stack: image, pinned torch, driver requirement, machine images, node selection


@pytest.fixture(scope="module")
def stack() -> dict:
    return _load(CLUSTER / "gpu-stack.yaml")


def _cuda_of_tag(tag: str) -> str:
    """'cu121' -> '12.1', 'cu130' -> '13.0' (Ray's and PyTorch's platform tags)."""
    digits = re.fullmatch(r"cu(\d+)(\d)", tag)
    assert digits, f"not a CUDA platform tag: {tag!r}"
    return f"{digits.group(1)}.{digits.group(2)}"


def test_gpu_stack_agrees_with_the_image_the_pins_and_the_installed_torch(stack):
    """cluster/gpu-stack.yaml records the choice; everything that installs or checks it agrees."""
    import importlib.metadata

    import torch

    from piaa_dist.gpu import required_driver

    args = _dockerfile_args()
    assert args["RAY_VERSION"] == stack["ray_version"]
    assert f"rayproject/ray:{args['RAY_VERSION']}-py311-{args['RAY_CUDA']}" == stack["ray_image"]
    assert _cuda_of_tag(args["RAY_CUDA"]) == stack["ray_image_cuda"]
    assert args["TORCH_VERSION"] == stack["torch"] and args["TORCHVISION_VERSION"] == stack["torchvision"]
    assert args["TORCH_CUDA"] == stack["torch_cuda"]
    makefile = (REPO / "Makefile").read_text()
    assert f'torch=={stack["torch"]}' in makefile and f'torchvision=={stack["torchvision"]}' in makefile
    # The torch build is PyPI's (the one the Makefile installs and the tests run): no other index.
    runs = [a for i, a in _dockerfile() if i == "RUN" and "torch==" in a]
    assert runs and not any("index-url" in r for r in runs)
    # The image tells the NVIDIA container toolkit which CUDA it needs: torch's, not the base's.
    envs = " ".join(a for i, a in _dockerfile() if i == "ENV")
    assert 'NVIDIA_REQUIRE_CUDA="cuda>=${TORCH_CUDA}"' in envs
    # The installed torch is that build: its version, and the CUDA runtime its wheel bundles.
    if torch.__version__.split("+")[0] != stack["torch"] or torch.version.cuda is None:
        pytest.skip(f"installed torch {torch.__version__} is not the pinned CUDA build")
    assert torch.version.cuda == stack["torch_cuda"]
    runtime = [r for r in importlib.metadata.requires("torch") or []
               if r.startswith(("cuda-toolkit", "nvidia-cuda-runtime"))]  # the wheel's CUDA libraries
    assert runtime and re.search(rf"=={re.escape(stack['torch_cuda'])}\.", runtime[0]), runtime
    # The driver: what piaa_dist.gpu checks at run time, and enough for the image's own CUDA too.
    assert stack["min_nvidia_driver"] == required_driver(stack["torch_cuda"])
    as_tuple = lambda v: tuple(int(x) for x in v.split("."))  # noqa: E731
    assert as_tuple(required_driver(stack["ray_image_cuda"])) <= as_tuple(stack["min_nvidia_driver"])
    assert stack["min_nvidia_driver_major"] == as_tuple(stack["min_nvidia_driver"])[0]


def test_aws_nodes_boot_the_pinned_machine_image(aws, stack):
    """No `latest_dlami` (Ray 2.60 resolves it to a CUDA 11-era AMI): every node type boots the
    image of cluster/gpu-stack.yaml, and the spec says which driver it must carry."""
    for name, node_type in aws["available_node_types"].items():
        assert node_type["node_config"]["ImageId"] == stack["aws_image_id"], name
    assert stack["aws_image_id"].startswith("resolve:ssm:/aws/service/deeplearning/ami/")
    header = (CLUSTER / "aws-gpu.yaml").read_text()
    assert stack["min_nvidia_driver"] in header and "gpu-stack.yaml" in header


def test_kuberay_gpu_pods_only_land_on_nodes_with_the_driver(rayjob, stack):
    spec = rayjob["spec"]["rayClusterSpec"]
    assert spec["rayVersion"] == stack["ray_version"]
    threshold = str(stack["min_nvidia_driver_major"] - 1)
    gpu_groups = [g for g in spec["workerGroupSpecs"]
                  if any("nvidia.com/gpu" in c.get("resources", {}).get("limits", {})
                         for c in g["template"]["spec"]["containers"])]
    assert gpu_groups
    for group in gpu_groups:
        terms = group["template"]["spec"]["affinity"]["nodeAffinity"][
            "requiredDuringSchedulingIgnoredDuringExecution"]["nodeSelectorTerms"]
        labels = set()
        for term in terms:  # terms are OR-ed; each must demand the driver on its own
            (expr,) = term["matchExpressions"]
            assert expr["operator"] == "Gt" and expr["values"] == [threshold], expr
            labels.add(expr["key"])
        assert labels == set(stack["kubernetes_driver_labels"])


def test_dockerfile_bakes_the_weights_in_and_can_require_them(tmp_path):
    """docker/weights/ is copied into torchvision's cache (where model.pretrained looks), the build
    runs the package's own resolver with PRETRAINED (auto by default; required fails without the
    file, naming where it looked), and the file stays out of git and `ray job submit` uploads."""
    import os
    import subprocess
    import sys

    instrs = _dockerfile()
    copies = [shlex.split(a) for i, a in instrs if i == "COPY"]
    weights = [c for c in copies if c[-2] == "docker/weights/"]
    assert weights and weights[0][-1] == "${TORCH_HOME}/hub/checkpoints/"
    env = " ".join(a for i, a in instrs if i == "ENV")
    torch_home = re.search(r"TORCH_HOME=(\S+)", env).group(1)
    assert _dockerfile_args()["PRETRAINED"] == "auto"
    check = next(a for i, a in instrs if i == "RUN" and "resolve_pretrained" in a)
    assert "${PRETRAINED}" in check
    assert (DOCKER / "weights" / "README.md").is_file()
    assert "*.pth" in (DOCKER / "weights" / ".gitignore").read_text().split()
    assert "--build-arg PRETRAINED=required" in (DOCKER / "weights" / "README.md").read_text()
    assert "--build-arg PRETRAINED=required" in (CLUSTER / "aws-gpu.yaml").read_text()
    patterns = [line.strip() for line in (DOCKER / "Dockerfile.dockerignore").read_text().splitlines()
                if line.strip() and not line.startswith("#")]
    assert not _ignored("docker/weights/resnet18-f37072fd.pth", patterns)
    # The RUN line itself, as the build runs it (TORCH_HOME as the image sets it, here a temp dir).
    code = shlex.split(check)[-1]
    home = tmp_path / torch_home.strip("/")
    run = lambda pretrained: subprocess.run(  # noqa: E731
        [sys.executable, "-c", code.replace("${PRETRAINED}", pretrained)], capture_output=True, text=True,
        env={**os.environ, "TORCH_HOME": str(home)}, cwd=REPO, timeout=300)
    assert run("auto").returncode == 0
    failed = run("required")
    assert failed.returncode != 0 and f"{home}/hub/checkpoints/resnet18-f37072fd.pth" in failed.stderr
    (home / "hub" / "checkpoints").mkdir(parents=True)
    (home / "hub" / "checkpoints" / "resnet18-f37072fd.pth").write_bytes(b"weights")
    assert run("required").returncode == 0


# ---------------------------------------------------------------------------------------------
# The commands users copy: state on shared storage, GPUs where the driver computes


def _commands(text: str) -> list[str]:
    """Every `ray job submit ...` command in a text (README code, YAML comments), continuation
    lines joined and comment markers removed."""
    lines = [re.sub(r"^\s*#\s?", "", line) for line in text.splitlines()]
    start = re.compile(r"\bray job submit\s+-")  # a command, not `ray job submit` named in prose
    joined, buf = [], ""
    for line in lines:
        if buf or start.search(line):
            buf += " " + line.rstrip().rstrip("\\").strip()
            if not line.rstrip().endswith("\\"):
                joined.append(buf.strip())
                buf = ""
    return [j[j.index("ray job submit"):] for j in joined]


def _job(command: str) -> tuple[str, list[str]]:
    args = shlex.split(command)
    script = next(a for a in args if a.startswith("jobs/") and a.endswith(".py"))
    return script, args


def test_cluster_commands_keep_state_on_s3_and_ask_for_their_gpus(rayjob):
    readme = (REPO / "README.md").read_text()
    sources = {
        "README.md": _commands(readme),
        "cluster/aws-gpu.yaml": _commands((CLUSTER / "aws-gpu.yaml").read_text()),
        "docker/compose.yaml": _commands((DOCKER / "compose.yaml").read_text()),
        "jobs/configs/gpu.yaml": _commands((REPO / "jobs/configs/gpu.yaml").read_text().splitlines()[0]),
    }
    seen = set()
    for source, commands in sources.items():
        assert commands, f"{source} shows no `ray job submit` command"
        for command in commands:
            script, args = _job(command)
            seen.add((source, script))
            assert (REPO / script).is_file(), command
            if script in ("jobs/train.py", "jobs/tune.py"):
                # checkpoints and Tune results on S3, never the driver's disk
                storage = [a for a in args if a.startswith("run.storage_path=")]
                assert storage and storage[0].split("=", 1)[1].startswith("s3://"), f"{source}: {command}"
                assert _flag_value(args, "--data").startswith("s3://"), f"{source}: {command}"
            if script in ("jobs/evaluate.py", "jobs/personalize.py") and source != "docker/compose.yaml":
                # they compute in the driver: on a GPU cluster the driver must get a GPU
                gpus = _flag_value(args, "--entrypoint-num-gpus")
                assert gpus is not None and float(gpus) >= 1, f"{source}: {command}"
                assert args.index("--entrypoint-num-gpus") < args.index("--"), command
    # the README shows every job on a cluster
    assert {s for src, s in seen if src == "README.md"} == set(EXPECTED_JOBS)
    # the RayJob's entrypoint too
    args = shlex.split(rayjob["spec"]["entrypoint"])
    storage = [a for a in args if a.startswith("run.storage_path=")]
    assert storage and storage[0].split("=", 1)[1].startswith("s3://")
    assert "entrypointNumGpus" not in rayjob["spec"]  # a train driver needs none


def test_the_commands_flag_checker_can_fail():
    """The parser above sees a missing GPU request and a head-local storage path."""
    bad = ("ray job submit --working-dir . -- python jobs/evaluate.py --data s3://b/d \\\n"
           "    --model models:/m@a\n"
           "ray job submit -- python jobs/train.py --config jobs/configs/gpu.yaml --data s3://b/d")
    (evaluate, train) = _commands(bad)
    assert _flag_value(_job(evaluate)[1], "--entrypoint-num-gpus") is None
    assert not [a for a in _job(train)[1] if a.startswith("run.storage_path=")]
