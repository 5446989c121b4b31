"""Password hashing (argon2id) and TOTP second factor.

Hashing is deliberately slow; callers on the event loop run these functions
in a worker thread.  ``verify_password`` with ``None`` still spends the time
of a real verification, so an unknown user cannot be told apart by timing.
"""

from __future__ import annotations

import functools
import hmac
from datetime import UTC, datetime

import pyotp
from argon2 import PasswordHasher
from argon2.exceptions import InvalidHashError, VerificationError, VerifyMismatchError

MIN_PASSWORD_LENGTH = 12
_hasher = PasswordHasher()  # argon2id with the library's current recommended parameters


@functools.cache
def _dummy_hash() -> str:
    # Made on first use, not at import: hashing costs ~0.2 s, and every CLI
    # command imports this module.
    return _hasher.hash("not-a-real-password-used-for-timing-only")


def check_password_policy(password: str) -> None:
    """``ValueError`` with the reason when ``password`` is too weak."""
    if len(password) < MIN_PASSWORD_LENGTH:
        raise ValueError(f"the password must be at least {MIN_PASSWORD_LENGTH} characters long")
    if len(password) > 1024:
        raise ValueError("the password must be at most 1024 characters long")


def hash_password(password: str) -> str:
    return _hasher.hash(password)


def verify_password(stored_hash: str | None, password: str) -> bool:
    """True iff ``password`` matches; always costs one argon2 verification."""
    try:
        return _hasher.verify(stored_hash or _dummy_hash(), password) and stored_hash is not None
    except (VerifyMismatchError, VerificationError, InvalidHashError):
        return False


def new_totp_secret() -> str:
    return str(pyotp.random_base32())


def totp_uri(secret: str, *, user: str, cluster: str) -> str:
    return str(pyotp.TOTP(secret).provisioning_uri(name=user, issuer_name=f"bastion {cluster}"))


def verify_totp(secret: str, code: str, *, at: float) -> bool:
    """True iff ``code`` is valid at time ``at`` (one 30 s step of drift allowed)."""
    return totp_step(secret, code, at=at) is not None


def totp_step(secret: str, code: str, *, at: float) -> int | None:
    """The 30 s time step whose code ``code`` is, among those valid at ``at`` (one step of
    drift either way), or None.  A sign-in records the step it used, so that a code seen once
    (over a shoulder, by a phishing page) cannot sign in again (RFC 6238, section 5.2)."""
    code = code.strip().replace(" ", "")
    if not code.isdigit():
        return None
    totp = pyotp.TOTP(secret)
    now = totp.timecode(datetime.fromtimestamp(at, tz=UTC))
    for step in (now - 1, now, now + 1):
        if hmac.compare_digest(totp.generate_otp(step), code):
            return step
    return None
