"""The one home of secret handling: URLs lose their credentials, and known secret values are scrubbed from text.

API keys and header values live only in memory (the client's headers). Anything that may reach disk, a report, a
log or an error message passes through `redact_url` (URLs) or `Scrubber.scrub` (free text) first.
"""

from __future__ import annotations

import re
from urllib.parse import parse_qsl, urlencode, urlsplit, urlunsplit

MASK = "***"
# Query parameters that carry credentials in the wild (Azure `api-key`, Google `key`, signed URLs, ...).
_SECRET_QUERY = re.compile(r"(key|token|secret|password|passwd|pwd|sig|signature|auth|credential)", re.I)
# Secrets shorter than this are not scrubbed from free text: masking "a" would mangle every message.
_MIN_SECRET_LEN = 4


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
    found += [v for k, v in parse_qsl(parts.query, keep_blank_values=True) if v and _SECRET_QUERY.search(k)]
    return found


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
