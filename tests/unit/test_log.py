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


def _record(msg: str, **extra: object) -> logging.LogRecord:
    rec = logging.LogRecord("bastion.proxy", logging.INFO, __file__, 1, msg, None, None)
    for k, v in extra.items():
        setattr(rec, k, v)
    return rec


FORGED = "x\r\n2026-12-07T12:00:00.000Z INFO  [bastion.tunnel] host joined host=evil"


def test_text_records_stay_one_line_whatever_their_values_hold() -> None:
    line = logs.TextFormatter().format(_record(f"no route {FORGED}", path=FORGED, who="a admin=yes"))
    assert "\n" not in line and "\r" not in line
    assert "no route x\\r\\n2026-12-07" in line  # the forged record is inside this one, escaped
    assert 'path="x\\r\\n2026-12-07' in line
    assert 'who="a admin=yes"' in line  # one field, not two


@pytest.mark.parametrize("ch", ["\x00", "\x1b", "\x85", "\u2028", "\u2029", "\u202e", "\x7f"])
def test_every_non_printable_character_is_escaped(ch: str) -> None:
    line = logs.TextFormatter().format(_record(f"a{ch}b", v=f"c{ch}d"))
    assert ch not in line
    assert logs.escape(f"a{ch}b") in line


def test_tracebacks_cannot_pass_for_records() -> None:
    try:
        raise ValueError(FORGED)
    except ValueError:
        import sys

        rec = _record("failed")
        rec.exc_info = sys.exc_info()
    lines = logs.TextFormatter().format(rec).split("\n")
    assert all(ln.startswith("    | ") for ln in lines[1:])
    assert not any(ln.startswith("2026-") for ln in lines[1:])
