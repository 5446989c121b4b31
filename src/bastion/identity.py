"""Who a verified credential belongs to: a plain value type.

This module imports nothing else of the project (and nothing outside the standard library), so
the pure layers (the session engine, policy, audit events) can name an identity without loading
the credential code, its storage interface, ``cryptography`` or PyJWT.  ``auth/credentials.py``
makes and verifies the credentials that produce it and re-exports it under its old name.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from datetime import datetime

__all__ = ["Identity"]


@dataclass(frozen=True)
class Identity:
    """Who a verified credential belongs to."""

    username: str
    cluster_name: str
    roles: tuple[str, ...]
    traits: Mapping[str, tuple[str, ...]]
    expires: datetime
    issued_at: datetime
    token_id: str = ""
    #: The ``uid`` of the user record the credential was issued for ("" for older ones).
    user_uid: str = ""
