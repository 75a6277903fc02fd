"""Secrets: what counts as a credential, and masking it in everything the package prints, raises, logs or
writes.

* A config value is masked when its key looks like a token, key, secret or password (`is_secret_name`);
  credentials inside other values are masked by their shape: URL passwords, a URL's query parameters
  named like credentials, known token prefixes (`redact`).
* `mask_secrets` makes a nested config safe to log or write; `redact` does the same for a message.
"""

from __future__ import annotations

import re
from typing import Any

SECRET_PARTS = {"token", "key", "secret", "password", "passwd", "pwd", "credential", "credentials", "auth", "apikey",
                "passphrase", "authorization", "bearer", "cookie"}
# Inside one word, without separators: `hftoken`, `mypassphrase`, `awssecretkey`, `dbpassword`, `privatekey`.
SECRET_INFIXES = ("secret", "password", "passwd", "passphrase", "credential", "apikey", "accesskey", "privatekey")
SECRET_SUFFIXES = ("token", "pwd", "auth")  # `hftoken`, `dbpwd`, `mlflowauth` — not `tokenizer`, `max_new_tokens`
# Credentials by the shape of their value, whatever their key is called: known token prefixes, private keys.
_TOKEN_SHAPES = re.compile(
    r"(?<![A-Za-z0-9_-])(?:"
    r"hf_[A-Za-z0-9]{16,}"  # Hugging Face
    r"|sk-(?:proj-|ant-)?[A-Za-z0-9_-]{16,}"  # OpenAI, Anthropic
    r"|(?:ghp|gho|ghu|ghs|ghr)_[A-Za-z0-9]{20,}|github_pat_[A-Za-z0-9_]{20,}"  # GitHub
    r"|glpat-[A-Za-z0-9_-]{16,}"  # GitLab
    r"|(?:AKIA|ASIA)[0-9A-Z]{16}"  # AWS access key ids
    r"|xox[abposr]-[A-Za-z0-9-]{10,}"  # Slack
    r"|AIza[0-9A-Za-z_-]{30,}"  # Google API keys
    r"|eyJ[A-Za-z0-9_-]{8,}\.eyJ[A-Za-z0-9_-]{8,}\.[A-Za-z0-9_-]+"  # JWTs
    r")"
    r"|-----BEGIN [A-Z ]*PRIVATE KEY-----[\s\S]*?(?:-----END [A-Z ]*PRIVATE KEY-----|$)"
)
# scheme://AUTHORITY: the userinfo is what comes before the authority's last '@'.
_URL_AUTHORITY = re.compile(r"(?P<scheme>\b[A-Za-z][A-Za-z0-9+.-]*://)(?P<authority>[^\s/?#'\"<>]+)")
# A URL's query parameter whose name is a credential's (``s3://bucket/x?access_key=…&secret_key=…``, as
# pyarrow and Ray accept for object stores): masked when its name is secret (`is_secret_name`).
_URL_QUERY = re.compile(r"(?P<head>\b[A-Za-z][A-Za-z0-9+.-]*://[^\s?#'\"<>]*\?)(?P<query>[^\s#'\"<>]+)")
MASK = "***"


def is_secret_name(name: str) -> bool:
    """A key whose value is a credential: a secret word as a part of the name (`hf_token`, `api-key`,
    `MLFLOW_TRACKING_PASSWORD`), inside one word (`hftoken`, `passphrase`) or ending it (`dbpwd`)."""
    lowered = name.lower()
    parts = {p for p in re.split(r"[^a-z0-9]+|_", lowered) if p}
    compact = re.sub(r"[^a-z0-9]", "", lowered)
    return (bool(parts & SECRET_PARTS) or any(s in compact for s in SECRET_INFIXES)
            or any(p.endswith(SECRET_SUFFIXES) for p in parts))


def _mask_userinfo(match: re.Match) -> str:
    authority = match.group("authority")
    userinfo, at, host = authority.rpartition("@")
    if not at:
        return match.group(0)
    user, colon, _password = userinfo.partition(":")
    return f"{match.group('scheme')}{user if colon else MASK}{':' + MASK if colon else ''}@{host}"


def _mask_query(match: re.Match) -> str:
    def masked(param: str) -> str:
        name, sep, value = param.partition("=")
        return f"{name}={MASK}" if sep and value and is_secret_name(name) else param

    return match.group("head") + "&".join(masked(p) for p in match.group("query").split("&"))


def redact(text: str) -> str:
    """`text` with the credentials in it masked: the password of every URL (``https://u:pw@host`` →
    ``https://u:***@host``; a user-only userinfo, often a token, becomes ``***@host``), a URL's query
    parameters named like credentials (``?secret_key=…`` → ``?secret_key=***``) and every value shaped
    like a known token (``hf_…``, ``sk-…``, ``ghp_…``, ``AKIA…``, ``xox…-``, JWTs, private-key blocks).
    For everything the package prints, raises or writes."""
    if not isinstance(text, str):
        return text
    return _TOKEN_SHAPES.sub(MASK, _URL_QUERY.sub(_mask_query, _URL_AUTHORITY.sub(_mask_userinfo, text)))


def looks_secret(value: Any) -> bool:
    """True when a string holds a credential by its shape (see `redact`)."""
    return isinstance(value, str) and redact(value) != value


def mask_secrets(tree: Any) -> Any:
    """A copy of a nested config that is safe to write: values under secret-looking keys replaced by
    '***' (see `is_secret_name`), and credentials inside other strings masked by their shape (`redact`)."""
    if isinstance(tree, dict):
        return {k: (MASK if is_secret_name(str(k)) and v is not None and not isinstance(v, dict) else mask_secrets(v))
                for k, v in tree.items()}
    if isinstance(tree, (list, tuple)):
        return [mask_secrets(v) for v in tree]
    return redact(tree) if isinstance(tree, str) else tree
