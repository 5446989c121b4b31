"""The engine with rate limits (decision 0051): a limited call is held for CheckRate; playbooks."""

from __future__ import annotations

from typing import Any

from bastion.audit import events as ev
from bastion.backend.rates import LocalRates
from bastion.policy import AccessChecker
from bastion.policy.limits import gcra
from bastion.protocol.jsonrpc import TOO_MANY_REQUESTS
from bastion.resources import App, Role
from bastion.session.engine import CheckRate, ForwardToUpstream, RecordAudit
from tests.unit.session.test_engine import APP, call, error_of, fwd, initialized


def limited(tools: list[str], per_user: str = "2/s", burst: int = 2) -> AccessChecker:
    role = Role.model_validate(
        {
            "metadata": {"name": "mcp-dev"},
            "spec": {
                "allow": {
                    "app_labels": {"env": "dev"},
                    "mcp": {
                        "tools": ["*"],
                        "rate_limits": [
                            {"name": "slow", "tools": tools, "per_user": per_user, "burst": burst}
                        ],
                    },
                }
            },
        }
    )
    return AccessChecker([role], {})


def test_a_limited_call_waits_for_its_buckets_then_goes_on() -> None:
    h = initialized(limited(["echo"]))
    (check,) = h.s.client_sent(call(1, "echo", {"m": 1}))
    assert isinstance(check, CheckRate) and check.request_id == 1
    (rule,) = check.rules
    assert rule.key == "everything/role/mcp-dev/0/alice" and rule.interval == 0.5 and rule.tolerance == 0.5
    assert 'rate limit "slow" of role "mcp-dev"' in rule.label
    # The id is held while the draw runs: a second request with it is refused.
    assert error_of(h.s.client_sent(call(1, "echo"))[-1])["message"].startswith("request id 1 is already")
    record, forward = h.s.rate_checked(1, None)
    assert isinstance(record, RecordAudit) and record.event.tool == "echo" and record.event.success
    assert forward == fwd(call(1, "echo", {"m": 1}))
    assert isinstance(h.s.client_sent(call(2, "get_x"))[-1], ForwardToUpstream)  # not limited


def test_a_refused_call_is_audited_with_retry_after() -> None:
    h = initialized(limited(["echo"]))
    (check,) = h.s.client_sent(call(1, "echo"))
    record, answer = h.s.rate_checked(1, (check.rules[0], 0.3456))
    assert isinstance(record, RecordAudit) and record.denied == "rate" and not record.event.success
    assert record.event.type == ev.REQUEST and record.event.error.startswith("rate limited: ")
    e = error_of(answer)
    assert e["code"] == TOO_MANY_REQUESTS and e["data"] == {"retryAfter": 0.346}
    assert "retry after 0.346 s" in e["message"]
    assert h.s.rate_checked(1, None) == []  # answered once


def test_an_app_wide_limit_applies_to_every_user() -> None:
    app = App.model_validate(
        {
            **APP.model_dump(mode="json"),
            "spec": {**APP.spec.model_dump(mode="json"), "rate_limit": {"rate": "10/m", "burst": 3}},
        }
    )
    h = initialized(app=app)
    (check,) = h.s.client_sent(call(1, "echo"))
    assert isinstance(check, CheckRate) and [r.key for r in check.rules] == ["everything/app"]
    assert check.rules[0].interval == 6.0 and check.rules[0].tolerance == 12.0


def test_gcra_and_local_buckets() -> None:
    assert gcra(None, 100.0, 0.2, 0.8) == (100.2, 0.0)
    assert gcra(100.9, 100.0, 0.2, 0.8) == (None, gcra(100.9, 100.0, 0.2, 0.8)[1])
    now = [0.0]
    rates = LocalRates(lambda: now[0])
    import asyncio

    async def burst(n: int) -> list[float]:
        return [await rates.take("k", 0.2, 0.8) for _ in range(n)]

    waits = asyncio.run(burst(7))
    assert waits[:5] == [0.0] * 5 and all(w > 0 for w in waits[5:])
    now[0] = 0.4  # two more tokens
    assert asyncio.run(burst(3))[:2] == [0.0, 0.0]


def test_rates_are_validated_where_they_are_written() -> None:
    import pytest
    from pydantic import ValidationError

    for bad in ("0/s", "5", "5/d", "x/m"):
        with pytest.raises(ValidationError, match="is not a rate"):
            limited(["echo"], per_user=bad)
    with pytest.raises(ValidationError, match="rate limits go under allow"):
        Role.model_validate(
            {"metadata": {"name": "r"}, "spec": {"deny": {"mcp": {"rate_limits": [{"per_user": "1/s"}]}}}}
        )
    spec: dict[str, Any] = {"uri": "mcp+http://h/mcp", "rate_limit": {"per_user": "1/s"}}
    with pytest.raises(ValidationError, match='says "rate"'):
        App.model_validate({"metadata": {"name": "a"}, "spec": spec})
