"""Secret redaction for audit events: what must never reach the audit log.

Contract:

- ``Redactor(keys)(value)`` returns ``value`` with the value of every dict
  entry whose key is secret replaced by ``"<REDACTED>"``, at any depth,
  through dicts, lists and tuples.  The input is never mutated; subtrees
  holding nothing secret are *shared* with the input rather than copied, so
  the common case (no secret anywhere) allocates nothing and returns the
  input itself.
- A key is secret when, lower-cased and with ``-`` and ``_`` removed (so
  ``API-Key``, ``api_key``, ``apiKey`` and ``APIKEY`` are all ``apikey``),
  it *equals* one of the names, or *contains* one of the names that are at
  least ``SUBSTRING_MIN`` characters long (``password``, ``token``,
  ``clientSecret``...).  Short names (``pwd``, ``auth``, ``otp``) only match
  exactly, so ``author`` or ``keyboard`` stay readable.
- Whatever is nested deeper than ``MAX_DEPTH`` is replaced by
  ``"<REDACTED>"`` as a whole: it cannot be inspected without unbounded
  recursion, and what cannot be inspected must not be stored.
- ``redact_headers`` always replaces ``Authorization``,
  ``Proxy-Authorization``, ``Cookie``, ``Set-Cookie`` and ``X-API-Key``
  (whatever the key list), plus every header whose name is secret by the
  rules above.

This module must not do I/O.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from typing import Any, Final

__all__ = [
    "DEFAULT_SECRET_KEYS",
    "MAX_DEPTH",
    "REDACTED",
    "SUBSTRING_MIN",
    "Redactor",
    "redact_headers",
]

REDACTED: Final = "<REDACTED>"

#: Names whose values are secrets.  Names of ``SUBSTRING_MIN`` characters or
#: more (after normalisation) also match keys that contain them.
DEFAULT_SECRET_KEYS: Final[tuple[str, ...]] = (
    "password",
    "passwd",
    "passphrase",
    "pwd",
    "pass",
    "secret",
    "token",
    "api_key",
    "apikey",
    "authorization",
    "auth",
    "bearer",
    "private_key",
    "access_key",
    "session_key",
    "credential",
    "cookie",
    "otp",
    "totp",
    "jwt",
)

#: Keys that contain a secret word but name a count or a setting, never a secret
#: (normalised).  Listed exactly: a looser rule ("ends with tokens") would let
#: ``api_tokens`` through.
NOT_SECRET: Final = frozenset(
    {
        "maxtokens",
        "maxcompletiontokens",
        "maxoutputtokens",
        "maxinputtokens",
        "maxnewtokens",
        "numtokens",
        "tokencount",
        "totaltokens",
        "prompttokens",
        "completiontokens",
        "inputtokens",
        "outputtokens",
        "tokenizer",
        "passthrough",
        "passes",
        "compass",
        "bypass",
    }
)

#: Normalised names at least this long match as substrings of a key.
SUBSTRING_MIN: Final = 5
#: Containers nested deeper than this are redacted whole.
MAX_DEPTH: Final = 64

#: Headers redacted whatever the key list says.
_ALWAYS_SECRET_HEADERS: Final = frozenset(
    {"authorization", "proxy-authorization", "cookie", "set-cookie", "x-api-key"}
)

# Keys come from clients, so the cache of decisions must not grow without
# bound; past this size, new keys are decided each time (still correct).
_CACHE_MAX = 4096

# ``str.translate`` table deleting the separators that normalisation ignores.
_SEPARATORS = str.maketrans("", "", "-_")


def _normalise(name: str) -> str:
    return name.lower().translate(_SEPARATORS)


class Redactor:
    """Replaces the values of secret keys in JSON-like data; see the module doc.

    Instances are immutable as far as callers can tell (the decision cache
    only memoises a pure function) and may be shared freely.
    """

    __slots__ = ("_cache", "_exact", "_substrings")

    def __init__(self, keys: Iterable[str] = DEFAULT_SECRET_KEYS) -> None:
        names = {_normalise(k) for k in keys}
        names.discard("")  # an empty name would "contain" every key
        self._exact: frozenset[str] = frozenset(names)
        # Longest first only for determinism; any match is enough.
        self._substrings: tuple[str, ...] = tuple(
            sorted((n for n in names if len(n) >= SUBSTRING_MIN), key=lambda n: (-len(n), n))
        )
        self._cache: dict[str, bool] = {}

    def is_secret(self, key: str) -> bool:
        """Whether values under ``key`` are redacted."""
        hit = self._cache.get(key)
        if hit is not None:
            return hit
        norm = _normalise(key)
        secret = norm not in NOT_SECRET and (norm in self._exact or any(s in norm for s in self._substrings))
        if len(self._cache) < _CACHE_MAX:
            self._cache[key] = secret
        return secret

    def __call__(self, value: Any) -> Any:
        """``value`` with secrets replaced; the input itself when nothing was."""
        return self._value(value, 0)

    def _value(self, value: Any, depth: int) -> Any:
        # Exact type checks first: parsed JSON only ever holds these, and
        # they are cheaper than isinstance against the ABCs.
        kind = type(value)
        if kind is dict or (kind is not list and kind is not tuple and isinstance(value, Mapping)):
            return self._mapping(value, depth + 1)
        if kind is list or kind is tuple:
            return self._sequence(value, depth + 1)
        return value

    def _mapping(self, value: Mapping[Any, Any], depth: int) -> Any:
        if depth > MAX_DEPTH:
            return REDACTED
        out: dict[Any, Any] | None = None
        for key, item in value.items():
            if isinstance(key, str) and self.is_secret(key):
                new = REDACTED
            elif type(item) in _SCALARS:
                continue
            else:
                new = self._value(item, depth)
            if new is not item:
                if out is None:
                    out = dict(value)  # copy on first change only
                out[key] = new
        if out is not None:
            return out
        # A non-dict Mapping is returned as a plain dict so the result is
        # always JSON-ready; a dict with nothing to redact is returned as is.
        return value if type(value) is dict else dict(value)

    def _sequence(self, value: list[Any] | tuple[Any, ...], depth: int) -> Any:
        if depth > MAX_DEPTH:
            return REDACTED
        out: list[Any] | None = None
        for i, item in enumerate(value):
            if type(item) in _SCALARS:
                continue
            new = self._value(item, depth)
            if new is not item:
                if out is None:
                    out = list(value)
                out[i] = new
        if out is None:
            return value
        return out if type(value) is list else tuple(out)


# Leaves that can never hold a secret key: skipped without a call.
_SCALARS: Final = frozenset({str, int, float, bool, type(None)})

_DEFAULT = Redactor()


def redact_headers(headers: Mapping[str, str], *, redactor: Redactor | None = None) -> dict[str, str]:
    """A copy of ``headers`` with credentials replaced by ``"<REDACTED>"``.

    Names keep their original spelling.  ``redactor`` (default: the default
    key list) decides which other names are secret; the fixed set in the
    module doc is redacted regardless.
    """
    r = redactor or _DEFAULT
    return {
        name: REDACTED if name.lower() in _ALWAYS_SECRET_HEADERS or r.is_secret(name) else value
        for name, value in headers.items()
    }
