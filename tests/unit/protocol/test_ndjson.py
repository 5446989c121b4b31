"""NDJSON framing: line ends, blank lines, chunk boundaries, the line limit."""

from __future__ import annotations

import pytest

from bastion.errors import LimitExceededError
from bastion.protocol.ndjson import LineSplitter, LineTooLongError

STREAM = b'{"a":1}\n{"b":2}\r\n\n   \r\n{"c":"x\\ny"}\n'
LINES = [b'{"a":1}', b'{"b":2}', b'{"c":"x\\ny"}']


def test_whole_stream() -> None:
    s = LineSplitter(100)
    assert s.feed(STREAM) == LINES
    assert s.pending == 0
    assert s.finish() == []


@pytest.mark.parametrize("step", range(1, 9))
def test_any_chunking(step: int) -> None:
    s = LineSplitter(100)
    out: list[bytes] = []
    for i in range(0, len(STREAM), step):
        out += s.feed(STREAM[i : i + step])
    assert out == LINES


def test_every_split_point() -> None:
    for cut in range(len(STREAM) + 1):
        s = LineSplitter(100)
        assert s.feed(STREAM[:cut]) + s.feed(STREAM[cut:]) == LINES, cut


def test_partial_line_is_held() -> None:
    s = LineSplitter(100)
    assert s.feed(b'{"a"') == []
    assert s.pending == 4
    assert s.feed(b":1}") == []
    assert s.feed(b"\n") == [b'{"a":1}']
    assert s.pending == 0


def test_finish_returns_an_unterminated_last_line() -> None:
    s = LineSplitter(100)
    assert s.feed(b'{"a":1}\n{"b":2}\r') == [b'{"a":1}']
    assert s.finish() == [b'{"b":2}']
    assert s.finish() == []


def test_finish_skips_blank_rest() -> None:
    s = LineSplitter(100)
    s.feed(b"  ")
    assert s.finish() == []


def test_empty_chunk() -> None:
    assert LineSplitter(10).feed(b"") == []


class TestLimit:
    def test_exactly_the_limit_is_fine(self) -> None:
        s = LineSplitter(5)
        assert s.feed(b"12345\r\n") == [b"12345"]  # the \r does not count
        assert s.feed(b"12345") == []
        assert s.feed(b"\r") == []
        assert s.feed(b"\n") == [b"12345"]

    def test_complete_line_over_the_limit(self) -> None:
        s = LineSplitter(5)
        with pytest.raises(LineTooLongError) as info:
            s.feed(b"123456\n")
        assert info.value.limit == 5
        assert isinstance(info.value, LimitExceededError)
        assert "5 bytes" in info.value.message

    def test_partial_line_over_the_limit_fails_early(self) -> None:
        s = LineSplitter(5)
        assert s.feed(b"1234") == []
        with pytest.raises(LineTooLongError):
            s.feed(b"5678")  # no newline yet, but already too long

    def test_rest_after_a_newline_over_the_limit(self) -> None:
        s = LineSplitter(5)
        with pytest.raises(LineTooLongError):
            s.feed(b"1\n12345678")

    def test_finish_over_the_limit(self) -> None:
        s = LineSplitter(5)
        s.feed(b"123456")  # within limit + 1 (a \r may follow)
        with pytest.raises(LineTooLongError):
            s.finish()

    def test_state_is_dropped_after_an_error(self) -> None:
        s = LineSplitter(5)
        with pytest.raises(LineTooLongError):
            s.feed(b"1234567")
        assert s.pending == 0

    def test_invalid_limit(self) -> None:
        with pytest.raises(ValueError, match="positive"):
            LineSplitter(0)
