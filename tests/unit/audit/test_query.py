"""``query_from_params``: what ``bastion audit search`` and ``GET /v1/audit/events`` ask the stores."""

from __future__ import annotations

import pytest

from bastion.audit.query import query_from_params
from bastion.errors import ValidationError


def test_default_is_the_newest_thousand_newest_first() -> None:
    q = query_from_params({})
    assert (q.order, q.limit) == ("desc", 1000)


def test_order_and_limit() -> None:
    q = query_from_params({"order": "asc", "limit": "5"})
    assert (q.order, q.limit) == ("asc", 5)
    assert query_from_params({"order": "desc"}).order == "desc"


def test_unknown_order_is_refused() -> None:
    with pytest.raises(ValidationError, match=r'^order must be asc or desc, not "up"$'):
        query_from_params({"order": "up"})


@pytest.mark.parametrize("limit", ["-1", "x", "1e3", "9" * 13])
def test_bad_limit_is_refused(limit: str) -> None:
    with pytest.raises(ValidationError, match=r"^limit must be a whole number \(0: no limit\)$"):
        query_from_params({"limit": limit})


def test_limit_zero_means_all_and_there_is_no_cap() -> None:
    assert query_from_params({"limit": "0"}).limit == 0
    assert query_from_params({"limit": "1000000"}).limit == 1_000_000


def test_tool_and_outcome() -> None:
    q = query_from_params({"tool": "echo", "outcome": "failure"})
    assert (q.tool, q.outcome) == ("echo", "failure")
    with pytest.raises(ValidationError, match=r'^outcome must be success or failure, not "maybe"$'):
        query_from_params({"outcome": "maybe"})
