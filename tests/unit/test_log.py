"""Log set-up: our format for our loggers and, on one line, for the libraries we use."""

from __future__ import annotations

import logging
from collections.abc import Iterator
from pathlib import Path

import pytest

from bastion import log as logs

NAMES = ("bastion", "uvicorn.error", "asyncpg")


@pytest.fixture(autouse=True)
def restore_logging() -> Iterator[None]:
    saved = {
        n: (logging.getLogger(n).handlers[:], logging.getLogger(n).level, logging.getLogger(n).propagate)
        for n in NAMES
    }
    yield
    logs._close_handlers(NAMES)
    for n, (handlers, level, propagate) in saved.items():
        logger = logging.getLogger(n)
        logger.handlers[:] = handlers
        logger.setLevel(level)
        logger.propagate = propagate


def test_library_errors_come_on_one_line_in_our_format(tmp_path: Path) -> None:
    out = tmp_path / "bastion.log"
    logs.setup("info", "text", str(out))
    try:
        raise ConnectionRefusedError(111, "Connect call failed ('127.0.0.1', 5432)")
    except ConnectionRefusedError:
        logging.getLogger("asyncpg.pool").warning(
            "Failed to restore the pool connection floor", exc_info=True
        )
    logging.getLogger("asyncpg.pool").info("chatter below warning is dropped")
    logging.getLogger("bastion.test").info("ours")
    for h in logging.getLogger("bastion").handlers:
        h.flush()
    lines = out.read_text().splitlines()
    assert len(lines) == 2, lines
    assert "[asyncpg.pool] Failed to restore the pool connection floor: ConnectionRefusedError:" in lines[0]
    assert "Connect call failed" in lines[0]
    assert "Traceback" not in out.read_text()
    assert lines[1].endswith("[bastion.test] ours")
    logs.setup("info", "text", str(out))  # again: one handler, not two
    assert len(logging.getLogger("asyncpg").handlers) == 1
