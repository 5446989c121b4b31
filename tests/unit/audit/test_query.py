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


@pytest.mark.parametrize("limit", ["0", "-1", "x", "100001"])
def test_bad_limit_is_refused(limit: str) -> None:
    with pytest.raises(ValidationError, match=r"^limit must be a number from 1 to 100000$"):
        query_from_params({"limit": limit})
