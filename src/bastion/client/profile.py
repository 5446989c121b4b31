"""Login profiles and identity files on disk.

``$BASTION_HOME`` (default ``~/.bastion``) holds::

    current-profile            name of the active profile (the proxy address)
    profiles/<proxy>.yaml      proxy, user, cluster, credential, expiry, pinned CA
    cas/<proxy>.pem            the cluster CA pinned for a proxy (kept after a plain logout;
                               ``logout --proxy`` and ``login --ca-fingerprint`` change it)

Files holding a credential are written atomically with mode 0600 in a 0700
directory.  An identity file (``bastion auth sign --out``) has the same fields
and is used with ``-i FILE``.  :meth:`Profile.trust` is what a client accepts from the
proxy (``bastion.apiclient.Trust``: the system trust store or the CA pinned in the file).
"""

from __future__ import annotations

import os
import tempfile
from dataclasses import asdict, dataclass, field
from datetime import datetime
from pathlib import Path
from typing import Any

import yaml

from bastion.apiclient import Trust
from bastion.errors import AuthenticationError, ValidationError


def home() -> Path:
    return Path(os.environ.get("BASTION_HOME") or Path.home() / ".bastion")


@dataclass
class Profile:
    proxy: str
    user: str
    cluster_name: str
    token: str
    expires: str
    ca_pem: str = ""
    insecure: bool = False
    kind: str = "profile"
    #: The file this was read from (not written to it): named in TLS errors.
    path: str = field(default="", compare=False)

    def trust(self, *, insecure: bool = False) -> Trust:
        """What a client accepts from this profile's proxy (``insecure``: the --insecure flag)."""
        hint = (
            "check its CA fingerprint and log in again with --ca-fingerprint=SHA256:..., which re-pins it"
            if self.kind == "profile"
            else "ask for a new identity file (`bastion auth sign`)"
        )
        return Trust(
            ca_pem=self.ca_pem,
            pinned_in=self.path,
            insecure=insecure or self.insecure,
            hint=hint,
        )

    @property
    def expires_at(self) -> datetime:
        return datetime.fromisoformat(self.expires)

    def is_expired(self, now: datetime) -> bool:
        return self.expires_at <= now

    def to_yaml(self) -> str:
        data = asdict(self)
        del data["path"]
        return yaml.safe_dump(data, sort_keys=False)

    @classmethod
    def from_yaml(cls, text: str, *, source: str) -> Profile:
        try:
            data: Any = yaml.safe_load(text)
            if not isinstance(data, dict):
                raise TypeError("not a mapping")
            fields = {k: v for k, v in data.items() if k in cls.__dataclass_fields__ and k != "path"}
            return cls(**fields, path=source)
        except (yaml.YAMLError, TypeError) as e:
            raise ValidationError(f"{source}: not a bastion profile or identity file ({e})") from None


def write_private(path: Path, text: str) -> None:
    """Atomically write ``text`` to ``path`` with mode 0600."""
    root = home()
    if path.is_relative_to(root) and not root.exists():
        root.mkdir(parents=True, mode=0o700)
    path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.")
    try:
        os.fchmod(fd, 0o600)
        with os.fdopen(fd, "w") as f:
            f.write(text)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def _profile_path(proxy: str) -> Path:
    safe = proxy.replace("/", "_").replace(":", "_")
    return home() / "profiles" / f"{safe}.yaml"


def save(profile: Profile) -> Path:
    path = _profile_path(profile.proxy)
    write_private(path, profile.to_yaml())
    write_private(home() / "current-profile", profile.proxy + "\n")
    return path


def load_current(proxy: str | None = None) -> Profile | None:
    """The profile for ``proxy`` (or the current one); ``None`` if there is none."""
    if proxy is None:
        cur = home() / "current-profile"
        if not cur.exists():
            return None
        proxy = cur.read_text().strip()
    path = _profile_path(proxy)
    if not path.exists():
        return None
    return Profile.from_yaml(path.read_text(), source=str(path))


def ca_pin_path(proxy: str) -> Path:
    """Where the cluster CA for ``proxy`` is pinned (whether or not it is)."""
    return home() / "cas" / (proxy.replace(":", "_") + ".pem")


def pinned_ca(proxy: str) -> str:
    """The CA pinned for ``proxy`` by an earlier login (kept after a plain logout)."""
    path = ca_pin_path(proxy)
    return path.read_text() if path.exists() else ""


def pin_ca(proxy: str, ca_pem: str) -> str:
    """Pin ``ca_pem`` for ``proxy``; the CA pinned before, if it was another one ("" if none)."""
    before = pinned_ca(proxy)
    if before != ca_pem:
        write_private(ca_pin_path(proxy), ca_pem)
    return before if before != ca_pem else ""


def forget_ca(proxy: str) -> Path | None:
    """Remove the CA pinned for ``proxy``; the file it was in, or ``None`` if none was pinned."""
    path = ca_pin_path(proxy)
    if not path.exists():
        return None
    path.unlink()
    return path


def remove(proxy: str | None = None) -> Profile | None:
    prof = load_current(proxy)
    if prof is None:
        return None
    _profile_path(prof.proxy).unlink(missing_ok=True)
    cur = home() / "current-profile"
    if cur.exists() and cur.read_text().strip() == prof.proxy:
        cur.unlink()
    return prof


def load_identity(path: str) -> Profile:
    p = Path(path)
    try:
        text = p.read_text()
    except OSError as e:
        raise ValidationError(f"cannot read identity file {path}: {e.strerror}") from None
    prof = Profile.from_yaml(text, source=path)
    if not prof.token:
        raise AuthenticationError(f"identity file {path} holds no credential")
    return prof
