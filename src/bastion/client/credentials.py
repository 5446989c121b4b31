"""The credential ``bastion mcp connect`` sends: re-read when a new login changes it on disk.

:class:`Credentials` wraps a :class:`CredentialSource` (identity file or login profile)
and reloads it when its file changes, so a ``bastion login`` in a terminal applies to a
running bridge; an expired one raises :class:`CredentialExpiredError`.  The bridge
needs only :class:`TokenSource` of it (tests hand it a fake).
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any, Protocol

from bastion._time import utcnow
from bastion.client import profile as profiles
from bastion.client.local_proxy import CredentialSource
from bastion.client.rpc_errors import EXPIRED_MESSAGE
from bastion.errors import AuthenticationError, BastionError

__all__ = ["CredentialExpiredError", "Credentials", "TokenSource"]

log = logging.getLogger("bastion.mcp.connect")


class CredentialExpiredError(AuthenticationError):
    """The credential's expiry passed (and no newer one is on disk)."""

    code = "credential_expired"


class TokenSource(Protocol):
    def token(self) -> str:
        """The bearer token; ``CredentialExpiredError`` or another ``BastionError`` if there is none."""
        ...

    def renewed(self, sent: str) -> bool:
        """Re-read the credential now: True if it is valid and not the ``sent`` one."""
        ...

    def expired(self) -> bool: ...

    @property
    def proxy(self) -> str: ...


class Credentials:
    """A :class:`CredentialSource`, re-read whenever its file changes on disk.

    The file (identity file, or the profile directory and ``current-profile``) is
    ``stat``-ed on every request: a changed inode, size or mtime means a new
    ``bastion login`` or ``bastion auth sign``, and the profile is reloaded.
    """

    def __init__(self, source: CredentialSource) -> None:
        self.source = source
        self._stamp: tuple[Any, ...] | None = self._stat()

    @property
    def proxy(self) -> str:
        return self.source.profile.proxy

    @property
    def profile(self) -> profiles.Profile:
        return self.source.profile

    def _paths(self) -> list[Path]:
        if self.source.identity is not None:
            return [self.source.identity]
        root = profiles.home()
        # The directory changes when a login renames a new profile in; the file, if edited in place.
        return [root / "current-profile", root / "profiles", profiles._profile_path(self.proxy)]

    def _stat(self) -> tuple[Any, ...]:
        out: list[Any] = []
        for p in self._paths():
            try:
                st = p.stat()
            except OSError:
                out.append(None)
            else:
                out.append((st.st_ino, st.st_size, st.st_mtime_ns))
        return tuple(out)

    def _refresh(self) -> None:
        stamp = self._stat()
        if stamp == self._stamp:
            return
        try:
            self.source.reload()
        except BastionError as e:
            log.warning("cannot reload the credential: %s", e.message)
            self._stamp = None  # look again next time
        else:
            self._stamp = stamp
            log.info("credential reloaded (user %s)", self.source.profile.user)

    def token(self) -> str:
        self._refresh()
        try:
            return self.source.token()
        except AuthenticationError:
            if self.expired():
                raise CredentialExpiredError(EXPIRED_MESSAGE) from None
            raise

    def expired(self) -> bool:
        return self.source.profile.is_expired(utcnow())

    def renewed(self, sent: str) -> bool:
        try:
            prof = self.source.reload()
        except BastionError:
            return False
        self._stamp = self._stat()
        return prof.token != sent and not prof.is_expired(utcnow())
