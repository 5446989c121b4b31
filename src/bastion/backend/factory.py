"""Open the backend a configuration names."""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING

from bastion.errors import ConfigError

if TYPE_CHECKING:
    from bastion.backend import Backend
    from bastion.config import Backend as BackendConfig


async def open_backend(cfg: BackendConfig, data_dir: Path) -> Backend:
    if cfg.type == "sqlite":
        from bastion.backend.sqlite import SQLiteBackend

        return await SQLiteBackend.open(cfg.resolved_path(data_dir))
    if cfg.type == "postgres" and cfg.dsn is not None:
        from bastion.backend.postgres import PostgresBackend

        return await PostgresBackend.open(cfg.dsn.get_secret_value())
    raise ConfigError("auth_service.backend.type", f'backend type "{cfg.type}" is not supported')
