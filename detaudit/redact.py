"""The one home of secret handling: URLs lose their credentials, and known secret values are scrubbed from text.

API keys and header values live only in memory (the client's headers). Anything that may reach disk, a report, a
log or an error message passes through `redact_url` (URLs) or `Scrubber.scrub` (free text) first.
"""

from __future__ import annotations

import base64
import os
import re
from collections.abc import Mapping
from urllib.parse import parse_qsl, unquote, urlencode, urlsplit, urlunsplit

MASK = "***"
# Query parameters that carry credentials in the wild (Azure `api-key`, Google `key`, signed URLs, ...).
_SECRET_QUERY = re.compile(r"(key|token|secret|password|passwd|pwd|sig|signature|auth|credential)", re.I)
# Names of options and environment variables whose values are secrets (OPENAI_API_KEY, HF_TOKEN, --api-key, ...).
SECRET_NAME = re.compile(r"(key|token|secret|password|passwd|credential|auth)", re.I)
# Secrets shorter than this are not scrubbed from free text: masking "a" would mangle every message.
_MIN_SECRET_LEN = 4
# Values of secret-named environment variables shorter than this are flags, not secrets (TOKENIZERS_...=false).
_MIN_ENV_SECRET_LEN = 8


def redact_url(url: str) -> str:
    """`url` without user:password and with credential-like query values masked."""
    try:
        parts = urlsplit(url)
    except ValueError:
        return MASK
    netloc = parts.netloc
    if "@" in netloc:
        netloc = f"{MASK}@{netloc.rsplit('@', 1)[1]}"
    query = parts.query
    if query:
        pairs = parse_qsl(query, keep_blank_values=True)
        query = urlencode([(k, MASK if _SECRET_QUERY.search(k) else v) for k, v in pairs], safe="*")
    return urlunsplit((parts.scheme, netloc, parts.path, query, parts.fragment))


def url_secrets(url: str) -> list[str]:
    """The secret pieces of `url` (password, credential query values), to scrub from any text.

    The user name is masked in URLs by redact_url but not scrubbed from free text: it is rarely secret and often
    a common word."""
    try:
        parts = urlsplit(url)
    except ValueError:
        return [url]
    found = [s for s in (parts.password,) if s]
    if parts.password:
        found.append(unquote(parts.password))
    basic = basic_auth_token(url)
    if basic:
        found.append(basic)
    found += [v for k, v in parse_qsl(parts.query, keep_blank_values=True) if v and _SECRET_QUERY.search(k)]
    return list(dict.fromkeys(found))


def basic_auth_token(url: str) -> str | None:
    """The base64 token of the `Authorization: Basic` header httpx derives from user:password in `url`.

    It is as secret as the password and looks nothing like it: a server that echoes the header leaks it."""
    try:
        parts = urlsplit(url)
    except ValueError:
        return None
    if parts.username is None and parts.password is None:
        return None
    # httpx percent-decodes both parts and joins them with ":" (httpx._auth.BasicAuth).
    userpass = f"{unquote(parts.username or '')}:{unquote(parts.password or '')}"
    return base64.b64encode(userpass.encode("utf-8", "surrogateescape")).decode()


def env_secrets(environ: Mapping[str, str]) -> list[str]:
    """Values of the variables in `environ` whose names look secret (OPENAI_API_KEY, HF_TOKEN, AWS_SECRET_...)."""
    return [v for k, v in environ.items() if SECRET_NAME.search(k) and len(v) >= _MIN_ENV_SECRET_LEN]


class Scrubber:
    """Replaces every registered secret value in a string by ***; holds the values in memory only."""

    def __init__(self, secrets: list[str] | None = None) -> None:
        self._secrets: set[str] = set()
        for s in secrets or []:
            self.add(s)

    def add(self, secret: str | None) -> None:
        if secret and len(secret) >= _MIN_SECRET_LEN:
            self._secrets.add(secret)
            # "Bearer sk-..." style values: also scrub the token part on its own.
            for part in secret.split():
                if len(part) >= 8:
                    self._secrets.add(part)

    def scrub(self, text: str) -> str:
        for s in sorted(self._secrets, key=len, reverse=True):
            if s in text:
                text = text.replace(s, MASK)
        return text


_session: Scrubber | None = None


def session_scrubber() -> Scrubber:
    """The command's one Scrubber: it knows every secret-looking value of the environment, and every API key, header
    value and URL credential the command line named (registered as they are parsed). Error lines, --debug
    tracebacks and managed servers' logs pass through it."""
    return _session if _session is not None else new_session()


def new_session() -> Scrubber:
    """Start the scrubber of a new command (the CLI entry point calls it, so commands run in one process, as tests
    do, neither share secrets nor miss an environment that changed in between)."""
    global _session
    _session = Scrubber(env_secrets(os.environ))
    return _session
