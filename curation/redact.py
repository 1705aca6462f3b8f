"""The one scrubber for everything a run writes or logs: passwords in URIs and secret query parameters become `***`.

Configs keep the real URIs (they are what connects to a store or a bucket); only their written and logged forms
(manifests, config files, MLflow params and tags, workflow.json, log lines) pass through here.
"""

from __future__ import annotations

import dataclasses
import re
from typing import Any

import yaml

MASK = "***"

# scheme://user:password@ -> scheme://user:***@. An AWS secret key may hold a '/' left unescaped, so one is allowed.
_USERINFO = re.compile(r"(?P<head>\b[A-Za-z][A-Za-z0-9+.-]*://[^:/?#@\s]*):(?P<secret>[^@?#\s]*)@")
# Query or fragment parameters whose names say they carry a credential (S3, GCS, Azure SAS, presigned URLs, tokens).
_SECRET_NAME = (r"[A-Za-z0-9_.-]*(?:secret|token|passw(?:or)?d|pwd|signature|credential|access[_-]?key|api[_-]?key"
                r"|private[_-]?key|account[_-]?key|auth)[A-Za-z0-9_.-]*|sig|key|sas")
_QUERY = re.compile(rf"(?P<head>[?&;#](?:{_SECRET_NAME})=)(?P<secret>[^&#\s'\"]*)", re.IGNORECASE)
# Config keys whose whole value is a secret (a `password:` or `token:` field), whatever it looks like.
_SECRET_KEY = re.compile(r"(?:^|[._-])(?:secret|token|password|passwd|api_key|access_key|private_key)s?$",
                         re.IGNORECASE)


def redact_uri(text: str) -> str:
    """`text` (a URI, or any text with URIs in it) with userinfo passwords and secret query parameters masked."""
    if not isinstance(text, str) or ("@" not in text and "=" not in text):
        return text
    text = _USERINFO.sub(lambda m: f"{m['head']}:{MASK}@" if m["secret"] else m[0], text)
    return _QUERY.sub(lambda m: m["head"] + (MASK if m["secret"] else ""), text)


def redact_config(config: Any) -> Any:
    """A config (dataclass, dict, list) as plain data with every string passed through redact_uri and the values
    of secret-named keys masked; the config itself is not changed."""
    if dataclasses.is_dataclass(config) and not isinstance(config, type):
        config = dataclasses.asdict(config)
    if isinstance(config, dict):
        return {key: MASK if _is_secret_key(key, value) else redact_config(value) for key, value in config.items()}
    if isinstance(config, (list, tuple)):
        return type(config)(redact_config(v) for v in config)
    if isinstance(config, str):
        return redact_uri(config)
    return config


def redacted_yaml(config: Any) -> str:
    """The resolved config as the YAML written beside outputs and into MLflow, secrets masked."""
    return yaml.safe_dump(redact_config(config), sort_keys=False)


def _is_secret_key(key: Any, value: Any) -> bool:
    return isinstance(key, str) and isinstance(value, str) and bool(value) and bool(_SECRET_KEY.search(key))
