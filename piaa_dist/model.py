"""The aesthetic model: an image backbone followed by the BLG-PIAA scoring head.

``build_model(cfg)`` returns an :class:`AestheticModel` whose forward maps images
``[N, 3, S, S]`` (ImageNet-normalised) to scores ``[N]`` in ``(0, 1)``; targets are
``score / 5``. Two backbones:

* ``resnet18``: torchvision's ResNet-18, the paper's backbone. ImageNet weights are loaded
  from a local file only (this project never downloads): ``pretrained`` is a path to a
  state-dict file, or ``"auto"`` to use torchvision's cache file
  ``$TORCH_HOME/hub/checkpoints/resnet18-f37072fd.pth`` when it exists, ``"required"`` for the
  same file when it must exist (:class:`WeightsMissing` otherwise), or ``"none"``.
* ``convnet``: a small CNN (4 × conv3x3-BN-ReLU-maxpool, global average pool, linear) that
  makes a CPU meta-step cheap at 32-64 px. It has no pretrained weights.

The head follows the paper: ``feature_dim → head_hidden... → 1`` with Linear, BatchNorm1d,
PReLU and Dropout per hidden layer, then a sigmoid.

Configurations (``ModelConfig``):

* CPU (the defaults): ``backbone=convnet, width=32, feature_dim=128, head_hidden=(64, 32),
  dropout=0.2`` with ``data.image_size=64``.
* Paper / GPU: :data:`PAPER_MODEL` (``resnet18``, ImageNet weights, ``feature_dim=1000``,
  ``head_hidden=(1024, 512)``, ``dropout=0.5``) with ``data.image_size=224``.
"""

from __future__ import annotations

import contextlib
import logging
import os
from pathlib import Path
from typing import Callable, Iterator

import torch
from torch import nn

from piaa_dist.config import BACKBONES, ModelConfig  # names validated at config load
from piaa_dist.errors import UserError

log = logging.getLogger(__name__)

#: torchvision's file name for ResNet-18 ImageNet weights (``ResNet18_Weights.IMAGENET1K_V1``).
RESNET18_WEIGHTS_FILE = "resnet18-f37072fd.pth"

#: The paper's model (use with ``data.image_size=224``, on a GPU).
PAPER_MODEL = ModelConfig(
    backbone="resnet18",
    pretrained="auto",
    feature_dim=1000,
    head_hidden=(1024, 512),
    dropout=0.5,
)



class ConvNet(nn.Module):
    """Small CPU-friendly CNN: ``blocks`` × (conv3x3 → BN → ReLU → maxpool 2), GAP, linear.

    With 4 blocks a 64-px input ends at 4×4 and a 32-px one at 2×2 before the global pool, so
    the receptive field covers the whole image at the sizes this backbone is meant for.

    Args:
        width: channels of every conv block.
        feature_dim: size of the output feature vector.
        blocks: number of conv blocks.
    """

    def __init__(self, width: int = 32, feature_dim: int = 128, blocks: int = 4) -> None:
        super().__init__()
        layers: list[nn.Module] = []
        in_ch = 3
        for _ in range(blocks):
            layers += [
                # bias is redundant before BatchNorm (its shift absorbs it).
                nn.Conv2d(in_ch, width, kernel_size=3, padding=1, bias=False),
                nn.BatchNorm2d(width),
                nn.ReLU(inplace=False),
                nn.MaxPool2d(2),
            ]
            in_ch = width
        self.features = nn.Sequential(*layers)
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(width, feature_dim)
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Map ``[N, 3, S, S]`` to ``[N, feature_dim]``."""
        return self.fc(torch.flatten(self.pool(self.features(x)), 1))


class AestheticHead(nn.Module):
    """The paper's head: per hidden size Linear → BatchNorm1d → PReLU → Dropout; Linear → sigmoid.

    Args:
        in_dim: backbone feature size.
        hidden: hidden layer sizes, e.g. ``(1024, 512)``.
        dropout: dropout probability after each hidden layer (0 disables it).
    """

    def __init__(self, in_dim: int, hidden: tuple[int, ...], dropout: float) -> None:
        super().__init__()
        layers: list[nn.Module] = []
        prev = in_dim
        for h in hidden:
            layers += [nn.Linear(prev, h), nn.BatchNorm1d(h), nn.PReLU(), nn.Dropout(dropout)]
            prev = h
        layers += [nn.Linear(prev, 1)]
        self.mlp = nn.Sequential(*layers)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Map ``[N, in_dim]`` to scores ``[N]`` in ``(0, 1)``."""
        return torch.sigmoid(self.mlp(x)).squeeze(-1)


class AestheticModel(nn.Module):
    """Backbone + head; ``forward(images [N,3,S,S]) -> scores [N]`` in ``(0, 1)``."""

    def __init__(self, backbone: nn.Module, head: nn.Module) -> None:
        super().__init__()
        self.backbone = backbone
        self.head = head

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Predict ``score / 5`` for each image.

        Under autocast (:func:`autocast`) only the backbone runs in reduced precision: the
        head, which maps features to a score in (0, 1) whose differences from the targets
        are a few hundredths, runs in float32 (bf16 resolves ~0.004 at 0.6, which would be
        most of a residual). It is a tiny part of the compute.
        """
        feats = self.backbone(x)
        device_type = feats.device.type
        # (autocast has no notion of some device types, e.g. "meta": never active there)
        if device_type in ("cuda", "cpu") and torch.is_autocast_enabled(device_type):
            with torch.autocast(device_type=device_type, enabled=False):
                return self.head(feats.float())
        return self.head(feats)


class WeightsMissing(UserError, FileNotFoundError):
    """ImageNet weights were required (``model.pretrained: required`` or a path) but are not there.

    The message names every place looked at and how to provide the file.
    """


def weights_cache_path() -> Path:
    """Where torchvision's ResNet-18 ImageNet weights are looked for:
    ``$TORCH_HOME/hub/checkpoints/resnet18-f37072fd.pth`` (``torch.hub.get_dir()``)."""
    return Path(torch.hub.get_dir()) / "checkpoints" / RESNET18_WEIGHTS_FILE


def resolve_pretrained(pretrained: str) -> Path | None:
    """Resolve ``model.pretrained`` to an existing weights file, or None for from scratch.

    * ``"none"``: None.
    * ``"auto"``: :func:`weights_cache_path` when it exists, else None with a warning.
    * ``"required"``: :func:`weights_cache_path`, which must exist (the GPU configs use this:
      a multi-hour GPU run must not silently start from scratch).
    * a path: that file, which must exist.

    Raises:
        WeightsMissing: ``required`` or an explicit path, and no file there (the message names
            the path looked at and how to provide the weights).
    """
    if pretrained == "none":
        return None
    if pretrained in ("auto", "required"):
        path = weights_cache_path()
        if path.is_file():
            return path
        if pretrained == "required":
            raise WeightsMissing(
                f"model.pretrained=required: no ImageNet ResNet-18 weights at {path} "
                f"($TORCH_HOME/hub/checkpoints/{RESNET18_WEIGHTS_FILE} on {os.uname().nodename}). "
                "Provide torchvision's file there on every node (docker/Dockerfile bakes "
                f"docker/weights/{RESNET18_WEIGHTS_FILE} into the image; see README, GPU clusters) "
                "or set model.pretrained=PATH, or model.pretrained=auto to allow training from scratch"
            )
        log.warning(
            "no ImageNet weights found at %s; training from scratch "
            "(place torchvision's %s there or set model.pretrained=PATH)",
            path,
            RESNET18_WEIGHTS_FILE,
        )
        return None
    path = Path(os.path.expanduser(pretrained))
    if not path.is_file():
        raise WeightsMissing(f"model.pretrained: no weights file at {path} (on {os.uname().nodename})")
    return path


def _build_resnet18(cfg: ModelConfig) -> nn.Module:
    from torchvision.models import resnet18

    # weights=None: torchvision would otherwise try to download; we load the file ourselves.
    net = resnet18(weights=None)
    path = resolve_pretrained(cfg.pretrained)
    if path is not None:
        state = torch.load(path, map_location="cpu", weights_only=True)
        net.load_state_dict(state)
        log.info("loaded ImageNet weights for resnet18 from %s", path)
    if cfg.feature_dim != net.fc.out_features:
        # A new projection: the ImageNet classifier only fits feature_dim == 1000.
        net.fc = nn.Linear(net.fc.in_features, cfg.feature_dim)
    return net


def build_model(cfg: ModelConfig) -> AestheticModel:
    """Build the aesthetic model described by ``cfg``.

    Args:
        cfg: backbone name, pretrained-weights policy, sizes and dropout.

    Returns:
        An :class:`AestheticModel` (on CPU, float32, in train mode).

    Raises:
        ValueError: unknown backbone or invalid sizes.
        WeightsMissing: ``cfg.pretrained`` is ``required`` or a path, and the file is not
            there (a ``FileNotFoundError``).
    """
    if cfg.backbone not in BACKBONES:
        raise ValueError(f"model.backbone: unknown {cfg.backbone!r}; choose from {BACKBONES}")
    if cfg.feature_dim < 1 or any(h < 1 for h in cfg.head_hidden):
        raise ValueError("model.feature_dim and model.head_hidden must be positive")
    if not 0.0 <= cfg.dropout < 1.0:
        raise ValueError(f"model.dropout must be in [0, 1), got {cfg.dropout}")
    backbone = BACKBONE_BUILDERS[cfg.backbone](cfg)
    head = AestheticHead(cfg.feature_dim, tuple(cfg.head_hidden), cfg.dropout)
    return AestheticModel(backbone, head)


def _build_convnet(cfg: ModelConfig) -> nn.Module:
    if cfg.pretrained not in ("auto", "none"):  # "required" too: a convnet has none
        raise ValueError("model.pretrained: the convnet backbone has no pretrained weights")
    return ConvNet(cfg.width, cfg.feature_dim, cfg.conv_blocks)


#: The backbone registry: name -> builder of an ``nn.Module`` mapping images to
#: ``cfg.feature_dim`` features. Its keys are ``config.BACKBONES`` (checked by
#: tests/test_configs.py); tests/test_model.py parametrizes over it.
BACKBONE_BUILDERS: dict[str, Callable[[ModelConfig], nn.Module]] = {
    "convnet": _build_convnet,
    "resnet18": _build_resnet18,
}


def head_names(model: AestheticModel) -> set[str]:
    """Names (as in ``model.named_parameters()``) of the head's parameters."""
    return {f"head.{name}" for name, _ in model.head.named_parameters()}


def select_device(pref: str = "auto", what: str = "this job") -> torch.device:
    """Pick the compute device (see :func:`piaa_dist.gpu.select_device`).

    Args:
        pref: ``"auto"`` (CUDA when usable, else CPU), ``"cpu"``, ``"cuda"`` or
            ``"cuda:N"``; also accepts the RunConfig spellings ``"yes"``/``"no"``.
        what: who asks, for the error message.

    Raises:
        GpuUnavailable: CUDA was asked for but is not usable (a ``RuntimeError`` whose message
            names the NVIDIA driver found and the one torch needs).
    """
    from piaa_dist.gpu import select_device as _select

    return _select(pref, what)


#: The reduced precision of :func:`autocast` (the GPU configs' ``run.amp``).
AMP_DTYPE = torch.bfloat16


@contextlib.contextmanager
def autocast(device: torch.device | str, enabled: bool = True, *,
             emulate_on_cpu: bool = False) -> Iterator[None]:
    """bf16 autocast of the backbone on CUDA; a no-op elsewhere (CPU runs stay float32).

    What runs in bf16 is deliberately narrow, because the meta-gradient differentiates
    through the inner loop twice: only autocast's own op lists inside the backbone
    (convolutions, linear layers). :class:`AestheticModel` runs its head in float32 and
    :func:`piaa_dist.meta.loss_fn` computes the loss against float32 targets.

    Args:
        device: the compute device; autocast is active only for CUDA.
        enabled: False makes this a no-op.
        emulate_on_cpu: apply the same bf16 policy on CPU (tests and benchmarks use it to
            measure what the GPU configuration does to the meta-gradient).
    """
    device = torch.device(device)
    if enabled and (device.type == "cuda" or (emulate_on_cpu and device.type == "cpu")):
        with torch.autocast(device_type=device.type, dtype=AMP_DTYPE):
            yield
    else:
        yield


def set_float32_precision(tf32: bool) -> None:
    """Whether CUDA float32 convolutions and matmuls may use TF32 tensor cores (process-wide).

    PyTorch lets cuDNN convolutions use TF32 by default on Ampere and newer GPUs; ``tf32=False``
    makes float32 mean IEEE float32 for both convolutions and matmuls (what the precision test
    checks and the determinism note assumes). A no-op without CUDA.
    """
    mode = "tf32" if tf32 else "ieee"
    conv = getattr(torch.backends.cudnn, "conv", None)
    if conv is not None and hasattr(conv, "fp32_precision"):  # torch >= 2.9's API
        conv.fp32_precision = mode
        torch.backends.cuda.matmul.fp32_precision = mode
    else:
        torch.backends.cudnn.allow_tf32 = tf32
        torch.backends.cuda.matmul.allow_tf32 = tf32
