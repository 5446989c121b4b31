"""SSE: the spec's line rules, chunk boundaries anywhere, size limits, and the encoder."""

from __future__ import annotations

import pytest

from bastion.errors import LimitExceededError
from bastion.protocol.sse import EventTooLargeError, SSEEvent, SSEParser, encode_event


def parse_all(stream: bytes, *, step: int | None = None, parser: SSEParser | None = None) -> list[SSEEvent]:
    p = parser or SSEParser()
    if step is None:
        return p.feed(stream)
    out: list[SSEEvent] = []
    for i in range(0, len(stream), step):
        out += p.feed(stream[i : i + step])
    return out


# A stream that exercises every rule: comments, CRLF, CR, LF, multi-line data,
# fields without a space or without a colon, id/retry-only blocks, unknown fields.
STREAM = (
    b": keep-alive\r\n"
    b"event: message\r\n"
    b"id: 1\r\n"
    b'data: {"jsonrpc":"2.0",\r\n'
    b'data:"id":1}\r\n'
    b"\r\n"
    b"retry: 3000\r"
    b"\r"
    b"event: endpoint\n"
    b"data: /messages?session=abc\n"
    b"foo: ignored\n"
    b"\n"
    b"data\n"
    b"\n"
)
EXPECTED = [
    SSEEvent(b'{"jsonrpc":"2.0",\n"id":1}', "message", "1", None),
    SSEEvent(b"", "message", None, 3000),
    SSEEvent(b"/messages?session=abc", "endpoint", None, None),
    SSEEvent(b"", "message", None, None),
]


def test_whole_stream() -> None:
    p = SSEParser()
    assert p.feed(STREAM) == EXPECTED
    assert p.last_event_id == "1"


@pytest.mark.parametrize("step", range(1, 12))
def test_any_chunking(step: int) -> None:
    assert parse_all(STREAM, step=step) == EXPECTED


def test_every_split_point() -> None:
    for cut in range(len(STREAM) + 1):
        p = SSEParser()
        assert p.feed(STREAM[:cut]) + p.feed(STREAM[cut:]) == EXPECTED, cut


def test_crlf_split_between_cr_and_lf() -> None:
    p = SSEParser()
    assert p.feed(b"data: a\r") == []
    assert p.feed(b"\n\r") == [SSEEvent(b"a")]  # \r\n is one line end; the next \r ends the event
    assert p.feed(b"\ndata: b\n\n") == [SSEEvent(b"b")]


def test_cr_then_cr_is_two_line_ends() -> None:
    p = SSEParser()
    assert p.feed(b"data: a\r") == []
    assert p.feed(b"\r") == [SSEEvent(b"a")]


def test_lf_after_cr_is_skipped_only_once() -> None:
    p = SSEParser()
    assert p.feed(b"data: a\r") == []
    assert p.feed(b"") == []  # an empty chunk changes nothing
    assert p.feed(b"\n") == []
    assert p.feed(b"\n") == [SSEEvent(b"a")]


def test_only_one_leading_space_is_removed() -> None:
    assert SSEParser().feed(b"data:  two\ndata:none\n\n") == [SSEEvent(b" two\nnone")]


def test_data_with_colons_is_kept_whole() -> None:
    assert SSEParser().feed(b'data: {"a":"b:c"}\n\n') == [SSEEvent(b'{"a":"b:c"}')]


def test_empty_data_line_is_an_empty_event() -> None:
    # MCP priming events: an id and an empty data field.
    assert SSEParser().feed(b"id: ev-0\ndata:\n\n") == [SSEEvent(b"", "message", "ev-0")]


def test_block_without_data_id_or_retry_is_not_an_event() -> None:
    assert SSEParser().feed(b"event: ping\n\n: comment only\n\n\n\n") == []


def test_event_type_resets_after_each_event() -> None:
    p = SSEParser()
    assert p.feed(b"event: endpoint\ndata: /x\n\ndata: y\n\n") == [
        SSEEvent(b"/x", "endpoint"),
        SSEEvent(b"y", "message"),
    ]


def test_id_rules() -> None:
    p = SSEParser()
    events = p.feed(b"id: a\ndata: 1\n\ndata: 2\n\nid: b\0c\ndata: 3\n\nid\ndata: 4\n\n")
    assert events == [
        SSEEvent(b"1", id="a"),
        SSEEvent(b"2"),  # the id of its own block only
        SSEEvent(b"3"),  # an id containing NUL is ignored
        SSEEvent(b"4", id=""),  # an empty id resets the last event id
    ]
    assert p.last_event_id == ""


def test_last_event_id_persists() -> None:
    p = SSEParser()
    p.feed(b"id: 7\ndata: x\n\ndata: y\n\n")
    assert p.last_event_id == "7"


@pytest.mark.parametrize("value", [b"abc", b"-1", b"1.5", b" 10", b"\xd9\xa1"])
def test_retry_must_be_ascii_digits(value: bytes) -> None:
    # " 10" keeps a space after the one removed, so it is not all digits either.
    assert SSEParser().feed(b"retry: " + value + b"\ndata: x\n\n") == [SSEEvent(b"x")]


def test_byte_order_mark_only_at_the_start() -> None:
    bom = b"\xef\xbb\xbf"
    assert SSEParser().feed(bom + b"data: x\n\n") == [SSEEvent(b"x")]
    p = SSEParser()
    assert p.feed(bom[:1]) == []
    assert p.feed(bom[1:2]) == []
    assert p.feed(bom[2:] + b"data: x\n\n") == [SSEEvent(b"x")]
    # Later, the same bytes are just part of a field name: an unknown field.
    assert p.feed(bom + b"data: y\n\n") == []


def test_stream_that_starts_like_a_bom_but_is_not() -> None:
    p = SSEParser()
    assert p.feed(b"\xef") == []
    assert p.feed(b"data: x\n\n") == []  # "\xefdata" is an unknown field
    assert p.feed(b"data: y\n\n") == [SSEEvent(b"y")]


def test_non_utf8_in_names_is_replaced_not_fatal() -> None:
    assert SSEParser().feed(b"event: \xff\nid: \xfe\ndata: \xfd\n\n") == [
        SSEEvent(b"\xfd", "\ufffd", "\ufffd")
    ]


def test_incomplete_event_at_end_is_not_returned() -> None:
    p = SSEParser()
    assert p.feed(b"data: partial\n") == []
    assert p.feed(b"data: more") == []


class TestLimits:
    def test_data_over_the_limit(self) -> None:
        p = SSEParser(max_event_size=10)
        with pytest.raises(EventTooLargeError) as info:
            p.feed(b"data: 12345\ndata: 67890\n\n")
        assert info.value.limit == 10
        assert isinstance(info.value, LimitExceededError)
        assert "10 bytes" in info.value.message

    def test_long_partial_line(self) -> None:
        p = SSEParser(max_event_size=16)
        assert p.feed(b"data: 0123456789") == []
        with pytest.raises(EventTooLargeError):
            p.feed(b"abcdef")

    def test_partial_line_counts_with_data_already_held(self) -> None:
        p = SSEParser(max_event_size=20)
        assert p.feed(b"data: 0123456789\n") == []
        with pytest.raises(EventTooLargeError):
            p.feed(b"data: 0123456789")

    def test_within_the_limit(self) -> None:
        p = SSEParser(max_event_size=10)
        assert p.feed(b"data: 12345\ndata: 6789\n\n") == [SSEEvent(b"12345\n6789")]
        # The limit is per event, not per stream.
        assert p.feed(b"data: 123456789\n\n") == [SSEEvent(b"123456789")]

    def test_invalid_limit(self) -> None:
        with pytest.raises(ValueError, match="positive"):
            SSEParser(0)


# -------------------------------------------------------------------- encoder


def test_encode_common_case() -> None:
    assert encode_event(b'{"a":1}') == b'data: {"a":1}\n\n'


def test_encode_all_fields() -> None:
    assert encode_event(b"x", id="7", event="message", retry=1000) == (
        b"event: message\nid: 7\nretry: 1000\ndata: x\n\n"
    )


def test_encode_multi_line_data() -> None:
    assert encode_event(b"a\nb\r\nc\rd") == b"data: a\ndata: b\ndata: c\ndata: d\n\n"


def test_encode_empty_data() -> None:
    assert encode_event(b"", id="p") == b"id: p\ndata: \n\n"


@pytest.mark.parametrize(
    "kwargs",
    [{"id": "a\nb"}, {"id": "a\rb"}, {"id": "a\0b"}, {"event": "x\ny"}, {"retry": -1}],
)
def test_encode_refuses_field_injection(kwargs: dict[str, object]) -> None:
    with pytest.raises(ValueError, match="SSE"):
        encode_event(b"x", **kwargs)  # type: ignore[arg-type]


@pytest.mark.parametrize(
    "event",
    [
        SSEEvent(b'{"jsonrpc":"2.0","id":1,"result":{}}'),
        SSEEvent(b" leading space and trailing \n"),
        SSEEvent(b"", "message", "prime-1", 500),
        SSEEvent(b"multi\nline\ndata", "endpoint", "9"),
    ],
)
def test_round_trip(event: SSEEvent) -> None:
    raw = encode_event(event.data, id=event.id, event=event.event, retry=event.retry)
    assert SSEParser().feed(raw) == [event]
