"""The aesthetic model: an image backbone followed by the BLG-PIAA scoring head.

``build_model(cfg)`` returns an :class:`AestheticModel` whose forward maps images
``[N, 3, S, S]`` (ImageNet-normalised) to scores ``[N]`` in ``(0, 1)``; targets are
``score / 5``. Two backbones:

* ``resnet18``: torchvision's ResNet-18, the paper's backbone. ImageNet weights are loaded
  from a local file only (this project never downloads): ``pretrained`` is a path to a
  state-dict file, or ``"auto"`` to use torchvision's cache file
  ``$TORCH_HOME/hub/checkpoints/resnet18-f37072fd.pth`` when it exists, or ``"none"``.
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
from typing import Iterator

import torch
from torch import nn

from piaa_dist.config import BACKBONES, ModelConfig  # names validated at config load

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
        """Predict ``score / 5`` for each image."""
        return self.head(self.backbone(x))


def _resnet18_weights_path(pretrained: str) -> Path | None:
    """Resolve ``cfg.pretrained`` to an existing weights file, or None for scratch.

    Raises:
        FileNotFoundError: ``pretrained`` names an explicit path that does not exist (a typo
            should not silently become a from-scratch run).
    """
    if pretrained == "none":
        return None
    if pretrained == "auto":
        path = Path(torch.hub.get_dir()) / "checkpoints" / RESNET18_WEIGHTS_FILE
        if path.is_file():
            return path
        log.warning(
            "no ImageNet weights found at %s; training from scratch "
            "(place torchvision's %s there or set model.pretrained=PATH)",
            path,
            RESNET18_WEIGHTS_FILE,
        )
        return None
    path = Path(os.path.expanduser(pretrained))
    if not path.is_file():
        raise FileNotFoundError(f"model.pretrained: no weights file at {path}")
    return path


def _build_resnet18(cfg: ModelConfig) -> nn.Module:
    from torchvision.models import resnet18

    # weights=None: torchvision would otherwise try to download; we load the file ourselves.
    net = resnet18(weights=None)
    path = _resnet18_weights_path(cfg.pretrained)
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
        FileNotFoundError: ``cfg.pretrained`` is a path that does not exist.
    """
    if cfg.backbone not in BACKBONES:
        raise ValueError(f"model.backbone: unknown {cfg.backbone!r}; choose from {BACKBONES}")
    if cfg.feature_dim < 1 or any(h < 1 for h in cfg.head_hidden):
        raise ValueError("model.feature_dim and model.head_hidden must be positive")
    if not 0.0 <= cfg.dropout < 1.0:
        raise ValueError(f"model.dropout must be in [0, 1), got {cfg.dropout}")
    if cfg.backbone == "convnet":
        if cfg.pretrained not in ("auto", "none"):
            raise ValueError("model.pretrained: the convnet backbone has no pretrained weights")
        backbone: nn.Module = ConvNet(cfg.width, cfg.feature_dim, cfg.conv_blocks)
    else:
        backbone = _build_resnet18(cfg)
    head = AestheticHead(cfg.feature_dim, tuple(cfg.head_hidden), cfg.dropout)
    return AestheticModel(backbone, head)


def head_names(model: AestheticModel) -> set[str]:
    """Names (as in ``model.named_parameters()``) of the head's parameters."""
    return {f"head.{name}" for name, _ in model.head.named_parameters()}


def select_device(pref: str = "auto") -> torch.device:
    """Pick the compute device.

    Args:
        pref: ``"auto"`` (CUDA when available, else CPU), ``"cpu"``, ``"cuda"`` or
            ``"cuda:N"``; also accepts the RunConfig spellings ``"yes"``/``"no"``.

    Raises:
        RuntimeError: CUDA was asked for but is not available.
    """
    pref = {"yes": "cuda", "no": "cpu"}.get(pref, pref)
    if pref == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    device = torch.device(pref)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise RuntimeError(f"device {pref!r} requested but CUDA is not available")
    return device


@contextlib.contextmanager
def autocast(device: torch.device | str, enabled: bool = True) -> Iterator[None]:
    """bf16 autocast on CUDA; a no-op elsewhere (CPU runs stay float32 for exact math).

    Use around forward passes (including the inner loop); losses are computed in float32 by
    autocast's own policy for ``mse_loss``.
    """
    device = torch.device(device)
    if enabled and device.type == "cuda":
        with torch.autocast(device_type="cuda", dtype=torch.bfloat16):
            yield
    else:
        yield
