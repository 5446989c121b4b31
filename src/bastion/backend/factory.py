"""Open the backend a configuration names."""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING

from bastion.errors import ConfigError

if TYPE_CHECKING:
    from bastion.backend.sqlite import SQLiteBackend
    from bastion.config import Backend as BackendConfig


async def open_backend(cfg: BackendConfig, data_dir: Path) -> SQLiteBackend:
    if cfg.type == "sqlite":
        from bastion.backend.sqlite import SQLiteBackend

        return await SQLiteBackend.open(cfg.resolved_path(data_dir))
    raise ConfigError("auth_service.backend.type", f'backend type "{cfg.type}" is not supported')
