"""Keep secrets out of what the system shows and stores: one rule for URIs with passwords.

A URI may carry credentials in its user-info part (``http://user:pass@host/...``, as MLflow
tracking servers behind basic auth are often written). Wherever such a URI is logged, printed,
stored (an MLflow param or tag, a saved ``config.yaml``, Tune's trial config) or put into an
error message, it is shown as ``http://user:***@host/...``: the user name stays (it says
*which* account), the password never appears.

* :func:`redact_uri` redacts one URI; :func:`redact_text` every URI inside a message;
  :func:`redact_value` every string inside a (nested) mapping or sequence, e.g. a config dict.
* :func:`split_credentials` takes a URI apart into the URI without user-info and the user
  name and password, so a caller can hand the credentials to the process environment (where
  client libraries read them) and use the bare URI everywhere else.
* :func:`environment_secrets` lists the secret values this process holds in its environment
  (AWS secret key and session token, MLflow password and token); :func:`redact_text` blanks
  those too, wherever they appear.

Plain Python (no third-party imports): every layer may use it.
"""

from __future__ import annotations

import os
import re
from collections.abc import Mapping, Sequence
from typing import Any
from urllib.parse import urlsplit, urlunsplit

#: what a redacted password (or secret value) is replaced with
MASK = "***"

#: environment variables whose values are secrets (never shown, logged or stored)
SECRET_ENV_VARS = (
    "AWS_SECRET_ACCESS_KEY",
    "AWS_SESSION_TOKEN",
    "AWS_SECURITY_TOKEN",
    "MLFLOW_TRACKING_PASSWORD",
    "MLFLOW_TRACKING_TOKEN",
)

# scheme://user:password@host... inside free text. The password ends at the last "@" before
# the host (passwords should percent-encode "@", but be lenient: the match is greedy) and may not
# contain whitespace, "/" or quotes, so one match never runs across two URIs in a message.
_URI_WITH_PASSWORD = re.compile(
    r"(?P<head>\b[A-Za-z][A-Za-z0-9+.\-]*://[^\s/@:'\"<>]*:)(?P<password>[^\s/'\"<>]*)(?P<at>@)(?=[^\s/@'\"<>]+)"
)
# Secret *values* shorter than this are not scrubbed from text: a short value (moto's fake key
# "testing") would blank unrelated words in every param, tag and path. Real AWS secret keys
# (40 characters) and session tokens are longer; URI passwords of any length are redacted
# structurally by the URI rule.
_MIN_SECRET_LEN = 12


def split_credentials(uri: str) -> tuple[str, str | None, str | None]:
    """A URI without its user-info, and the user name and password it carried.

    Args:
        uri: any string; only ``scheme://user[:password]@host...`` forms carry credentials.

    Returns:
        ``(bare_uri, user, password)``; ``user`` and ``password`` are None when absent (then
        ``bare_uri`` is ``uri`` unchanged). Percent-encoded characters stay encoded.
    """
    if "://" not in uri or "@" not in uri:
        return uri, None, None
    try:
        parts = urlsplit(uri)
    except ValueError:  # e.g. an unbalanced "[" in the host: not a URI we can take apart
        return uri, None, None
    if "@" not in parts.netloc:
        return uri, None, None
    userinfo, _, host = parts.netloc.rpartition("@")
    user, sep, password = userinfo.partition(":")
    bare = urlunsplit((parts.scheme, host, parts.path, parts.query, parts.fragment))
    return bare, user or None, (password if sep else None)


def redact_uri(uri: str) -> str:
    """``uri`` with its password replaced by ``***`` (``http://user:***@host/path``).

    A URI without a password (or a string that is not a URI) is returned unchanged; a user
    name without a password is kept (it is not a secret).
    """
    if "://" not in uri or "@" not in uri:
        return uri
    try:
        parts = urlsplit(uri)
    except ValueError:
        return redact_text(uri)
    userinfo, at, host = parts.netloc.rpartition("@")
    if not at:
        return uri
    user, sep, _password = userinfo.partition(":")
    if not sep:
        return uri
    return urlunsplit((parts.scheme, f"{user}:{MASK}@{host}", parts.path, parts.query, parts.fragment))


def environment_secrets(environ: Mapping[str, str] | None = None) -> list[str]:
    """The secret values set in the environment (see :data:`SECRET_ENV_VARS`), longest first."""
    env = os.environ if environ is None else environ
    values = {env.get(name, "") for name in SECRET_ENV_VARS}
    return sorted((v for v in values if len(v) >= _MIN_SECRET_LEN), key=len, reverse=True)


def redact_text(text: str, secrets: Sequence[str] | None = None) -> str:
    """``text`` with every URI password and every known secret value replaced by ``***``.

    Args:
        text: a message, log line or error text.
        secrets: secret values to blank as well (default: :func:`environment_secrets`).
    """
    out = _URI_WITH_PASSWORD.sub(lambda m: f"{m['head']}{MASK}{m['at']}", text)
    for secret in environment_secrets() if secrets is None else secrets:
        if secret and len(secret) >= _MIN_SECRET_LEN:
            out = out.replace(secret, MASK)
    return out


def redact_value(value: Any) -> Any:
    """A copy of ``value`` with :func:`redact_text` applied to every string inside it.

    Mappings, lists and tuples are walked (keys are kept as they are); other values are
    returned unchanged. For config dicts (``config.config_to_dict``), MLflow params and tags.
    """
    if isinstance(value, str):
        return redact_text(value)
    if isinstance(value, Mapping):
        return {k: redact_value(v) for k, v in value.items()}
    if isinstance(value, tuple):
        return tuple(redact_value(v) for v in value)
    if isinstance(value, list):
        return [redact_value(v) for v in value]
    return value


__all__ = [
    "MASK",
    "SECRET_ENV_VARS",
    "environment_secrets",
    "redact_text",
    "redact_uri",
    "redact_value",
    "split_credentials",
]
