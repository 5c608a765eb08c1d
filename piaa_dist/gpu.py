"""Is the GPU usable here, and if not, why: the NVIDIA driver found against the one torch needs.

A node can have a GPU assigned (by Ray, by Kubernetes) and still be unable to use it: the
commonest cause is a host driver older than the CUDA version the installed torch was built
for (torch 2.14.1 from PyPI bundles the CUDA 13.0 runtime, which needs driver >= 580.65.06).
``torch.cuda.is_available()`` is then simply False, and code that goes on to
``model.to("cuda")`` fails much later with a message that names neither version. Every place
that is about to use a GPU calls :func:`require_cuda` (or :func:`select_device`) first, so such
a job stops at once with a message naming the driver found, the driver needed and the fix.

Plain torch and the standard library (no Ray, MLflow or boto3): the Ray Train worker, the
driver's pre-flight probe and the CPU-side commands (evaluate, personalize, GIAA) share it.
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
from dataclasses import dataclass
from pathlib import Path

import torch

from piaa_dist.errors import UserError

#: Where the Linux NVIDIA kernel module states its version.
PROC_DRIVER_VERSION = Path("/proc/driver/nvidia/version")

#: Minimum Linux x86_64 NVIDIA driver per CUDA major.minor: the "toolkit driver version" of the
#: CUDA release notes (table 3; the driver the CUDA GA release was tested with). Newer CUDA
#: 12/13 user-space libraries may run on an older driver of the same major family (minor
#: version compatibility, :data:`CUDA_FAMILY_MINIMUM_DRIVER`) except for features that need
#: the newer driver, so the GA figure is the one this project requires and checks.
CUDA_MINIMUM_DRIVER: dict[str, str] = {
    "11.8": "520.61.05",
    "12.0": "525.60.13",
    "12.1": "530.30.02",
    "12.2": "535.54.03",
    "12.3": "545.23.06",
    "12.4": "550.54.14",
    "12.5": "555.42.02",
    "12.6": "560.28.03",
    "12.8": "570.26",
    "12.9": "575.51.03",
    "13.0": "580.65.06",
}
#: The absolute floor of each CUDA major family (minor version compatibility).
CUDA_FAMILY_MINIMUM_DRIVER: dict[str, str] = {"11": "450.80.02", "12": "525.60.13", "13": "580.65.06"}


class GpuUnavailable(UserError, RuntimeError):
    """A GPU was asked for (or assigned) but CUDA cannot use it here.

    The message is one line: what asked for the GPU, the NVIDIA driver found (or that none
    was found), the driver the installed torch needs, and what to do.
    """


def _version_tuple(version: str) -> tuple[int, ...]:
    return tuple(int(p) for p in re.findall(r"\d+", version))


def driver_version() -> tuple[str | None, str]:
    """The NVIDIA driver version of this machine, and where it was read.

    Reads ``/proc/driver/nvidia/version`` (the kernel module), else asks ``nvidia-smi``.

    Returns:
        ``(version, source)``: e.g. ``("550.54.14", "/proc/driver/nvidia/version")``, or
        ``(None, "no /proc/driver/nvidia/version and no nvidia-smi")`` when there is no driver.
    """
    try:
        text = PROC_DRIVER_VERSION.read_text(errors="replace")
    except OSError:
        text = ""
    # "NVRM version: NVIDIA UNIX x86_64 Kernel Module  550.54.14  ..." or
    # "NVRM version: NVIDIA UNIX Open Kernel Module for x86_64  580.65.06  Release Build ..."
    match = re.search(r"Kernel Module(?: for \S+)?\s+(\d+\.\d+(?:\.\d+)?)", text)
    if match:
        return match.group(1), str(PROC_DRIVER_VERSION)
    smi = shutil.which("nvidia-smi")
    if smi:
        try:
            out = subprocess.run(
                [smi, "--query-gpu=driver_version", "--format=csv,noheader"],
                capture_output=True, text=True, timeout=20, check=False,
            )
        except (OSError, subprocess.SubprocessError) as err:
            return None, f"nvidia-smi failed ({err})"
        first = (out.stdout.strip().splitlines() or [""])[0].strip()
        if out.returncode == 0 and re.fullmatch(r"\d+\.\d+(?:\.\d+)?", first):
            return first, "nvidia-smi"
        detail = (out.stderr or out.stdout).strip().splitlines()
        return None, f"nvidia-smi failed: {detail[0] if detail else f'exit {out.returncode}'}"
    return None, f"no {PROC_DRIVER_VERSION} and no nvidia-smi"


def required_driver(cuda: str | None = None) -> str | None:
    """The minimum NVIDIA driver for a CUDA version (default: the one torch was built with).

    Returns:
        e.g. ``"580.65.06"`` for ``"13.0"``; the family floor for an unlisted minor version of a
        known major; None for a CPU-only torch or an unknown CUDA major.
    """
    cuda = torch.version.cuda if cuda is None else cuda
    if not cuda:
        return None
    parts = _version_tuple(cuda)
    key = ".".join(str(p) for p in parts[:2])
    if key in CUDA_MINIMUM_DRIVER:
        return CUDA_MINIMUM_DRIVER[key]
    # An unlisted minor: the newest listed one of the same major at or below it.
    same = [k for k in CUDA_MINIMUM_DRIVER if _version_tuple(k)[0] == parts[0]
            and _version_tuple(k) <= parts[:2]]
    if same:
        return CUDA_MINIMUM_DRIVER[max(same, key=_version_tuple)]
    return CUDA_FAMILY_MINIMUM_DRIVER.get(str(parts[0]))


@dataclass(frozen=True)
class CudaReport:
    """What this process can tell about its GPU.

    Attributes:
        usable: ``torch.cuda.is_available()`` and at least one device.
        devices: visible CUDA devices (0 when not usable).
        driver: NVIDIA driver version found, or None.
        driver_source: where it was read, or why none was found.
        torch_version: e.g. ``"2.14.1+cu130"``.
        torch_cuda: the CUDA version torch was built for, or None for a CPU-only build.
        required_driver: the minimum driver for ``torch_cuda`` (None: CPU-only build).
        visible_devices: ``$CUDA_VISIBLE_DEVICES`` (what Ray or Kubernetes assigned), or None.
        hostname: this machine's name (which node of a cluster is speaking).
    """

    usable: bool
    devices: int
    driver: str | None
    driver_source: str
    torch_version: str
    torch_cuda: str | None
    required_driver: str | None
    visible_devices: str | None
    hostname: str

    @property
    def driver_too_old(self) -> bool:
        """True when a driver was found and is older than the one torch's CUDA needs."""
        return bool(self.driver and self.required_driver
                    and _version_tuple(self.driver) < _version_tuple(self.required_driver))

    def diagnosis(self) -> str:
        """One sentence: the driver found, the driver needed, and the likely cause."""
        if self.driver:
            found = f"NVIDIA driver {self.driver} found ({self.driver_source})"
        else:
            found = f"no NVIDIA driver found ({self.driver_source})"
        if self.torch_cuda is None:
            need = f"torch {self.torch_version} is a CPU-only build (no CUDA): install a CUDA build of torch"
        elif self.required_driver:
            need = (f"torch {self.torch_version} is built for CUDA {self.torch_cuda}, which needs "
                    f"NVIDIA driver >= {self.required_driver}")
        else:
            need = f"torch {self.torch_version} is built for CUDA {self.torch_cuda}"
        cause = ""
        if self.driver_too_old:
            cause = "; the driver is too old: use a machine image or node with a newer driver"
        elif self.driver and self.torch_cuda:
            cause = ("; the driver is new enough, so check that the container runs with the GPU exposed"
                     " (--gpus all / nvidia.com/gpu)")
        visible = "unset" if self.visible_devices is None else repr(self.visible_devices)
        return f"on {self.hostname}: {found}; {need}{cause} (CUDA_VISIBLE_DEVICES={visible})"


def cuda_report() -> CudaReport:
    """Probe this process's CUDA (cheap; never raises)."""
    try:
        usable = bool(torch.cuda.is_available()) and torch.cuda.device_count() > 0
        devices = torch.cuda.device_count() if usable else 0
    except Exception:  # noqa: BLE001 - a broken driver can make the probe itself raise
        usable, devices = False, 0
    driver, source = driver_version()
    return CudaReport(
        usable=usable,
        devices=devices,
        driver=driver,
        driver_source=source,
        torch_version=torch.__version__,
        torch_cuda=torch.version.cuda,
        required_driver=required_driver(),
        visible_devices=os.environ.get("CUDA_VISIBLE_DEVICES"),
        hostname=os.uname().nodename,
    )


def require_cuda(what: str) -> CudaReport:
    """Stop at once, with the driver versions in the message, when CUDA is not usable.

    Args:
        what: who wants the GPU, for the message (``"Train worker rank 1"``, ``"evaluate"``).

    Returns:
        The report (usable).

    Raises:
        GpuUnavailable: CUDA is not usable in this process.
    """
    report = cuda_report()
    if not report.usable:
        raise GpuUnavailable(
            f"{what}: a GPU was requested but CUDA is not usable {report.diagnosis()}. "
            "Fix the node (driver/image) or set run.use_gpu=no to run on CPU"
        )
    return report


def select_device(pref: str = "auto", what: str = "this job") -> torch.device:
    """The compute device for a preference, failing loudly instead of falling back to CPU.

    Args:
        pref: ``"auto"`` (CUDA when usable, else CPU), ``"cpu"``, ``"cuda"`` or ``"cuda:N"``;
            also the RunConfig spellings ``"yes"`` (= ``"cuda"``) and ``"no"`` (= ``"cpu"``).
        what: who asks, for the error message.

    Raises:
        GpuUnavailable: CUDA was asked for but is not usable (names the driver versions).
    """
    pref = {"yes": "cuda", "no": "cpu"}.get(pref, pref)
    if pref == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    device = torch.device(pref)
    if device.type == "cuda":
        require_cuda(f"{what} (device {pref!r})")
    return device


__all__ = [
    "CUDA_FAMILY_MINIMUM_DRIVER",
    "CUDA_MINIMUM_DRIVER",
    "CudaReport",
    "GpuUnavailable",
    "cuda_report",
    "driver_version",
    "require_cuda",
    "required_driver",
    "select_device",
]
