"""Secrets inside URLs and configs are never recorded (RELIABILITY 29).

An input URL can carry credentials: ``http://user:password@host/list.parquet``, a signed object-store
URL (``X-Amz-Signature=...``, ``X-Goog-Signature=...``, ``sig=...``), an API key in a query. Everything
curate writes down about a run (``_plan/run.json``, the manifest, its log lines) goes through
:func:`redact`: the password of a URL and the value of every query parameter whose name says it is a
secret become ``REDACTED``; the rest of the URL stays, so the record still says what was read.
A cluster job's entrypoint is shown to anyone who can list jobs, so a step whose arguments hold a
secret is refused there (:func:`secret_in`) rather than submitted.
"""

from __future__ import annotations

import logging
import re
from typing import Any

MARK = "REDACTED"

# scheme://user:password@  or  scheme://token@  (the part before @ in the authority)
_USERINFO = re.compile(r"(?P<scheme>[a-zA-Z][a-zA-Z0-9+.-]*://)(?P<info>[^/@\s?#]+)@")
# query parameters whose names say they hold a secret (AWS/GCS/Azure signatures, tokens, keys)
_SECRET_NAME = (r"(?:x-amz-signature|x-amz-credential|x-amz-security-token|x-goog-signature|x-goog-credential|"
                r"sig|signature|token|access_token|id_token|refresh_token|api_key|apikey|key|secret|"
                r"password|passwd|pwd|auth|authorization|sessiontoken|credential)")
_QUERY = re.compile(r"(?P<sep>[?&;])(?P<name>" + _SECRET_NAME + r")=(?P<value>[^&#\s'\"]*)", re.IGNORECASE)


def redact_text(text: str) -> str:
    """``text`` with every URL password / token and every secret query value replaced by REDACTED."""
    if "://" not in text and "=" not in text:
        return text
    out = _USERINFO.sub(lambda m: f"{m['scheme']}{_info(m['info'])}@", text)
    return _QUERY.sub(lambda m: f"{m['sep']}{m['name']}={MARK}" if m["value"] else m[0], out)


def _info(info: str) -> str:
    user, _, password = info.partition(":")
    # user:password -> user:REDACTED; a bare token before @ is a secret itself
    return f"{user}:{MARK}" if password else MARK


def redact(value: Any) -> Any:
    """A copy of ``value`` (JSON-like: dicts, lists, strings) with secrets in its strings redacted."""
    if isinstance(value, str):
        return redact_text(value)
    if isinstance(value, dict):
        return {k: redact(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [redact(v) for v in value]
    return value


def secret_in(value: Any) -> bool:
    return redact(value) != (list(value) if isinstance(value, tuple) else value)


class RedactingFilter(logging.Filter):
    """Redacts the formatted message of every record a handler emits."""

    def filter(self, record: logging.LogRecord) -> bool:
        try:
            message = record.getMessage()
        except Exception:  # noqa: BLE001 - a malformed record is logging's to report, not ours
            return True
        clean = redact_text(message)
        if clean != message:
            record.msg, record.args = clean, None
        return True
