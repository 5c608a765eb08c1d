"""What the train and tune commands share: one way to turn flags into a job config."""

from __future__ import annotations

from pathlib import Path
from typing import Any, Mapping, Sequence

from piaa_dist.config import ConfigError, JobConfig, load_config, with_overrides


def job_config(
    config: str | Path | None,
    overrides: Sequence[str],
    *,
    data: str | None = None,
    s3_endpoint: str | None = None,
    updates: Mapping[str, Any] | None = None,
) -> JobConfig:
    """The YAML config with ``key=value`` overrides, then the command's flags on top.

    Flags win over the file because they are what the user typed last; ``None`` flags leave the
    file's value alone.

    Raises:
        ConfigError: bad config or overrides, or no dataset URL from either source.
    """
    cfg = load_config(config, overrides)
    flags: dict[str, Any] = {k: v for k, v in (updates or {}).items() if v is not None}
    if data:
        flags["data.url"] = data
    if s3_endpoint:
        flags["data.s3_endpoint"] = s3_endpoint
    if flags:
        cfg = with_overrides(cfg, flags)
    if not cfg.data.url:
        raise ConfigError("no dataset: pass --data URL (or set data.url in the config)")
    return cfg
