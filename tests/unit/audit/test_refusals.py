"""Refusal auditing: a token bucket per source, a global bucket, one summary per flood."""

from __future__ import annotations

from datetime import UTC, datetime

from bastion.audit.events import AUTH_FAILED, SESSION_REJECTED, SUPPRESSED, AuditEvent
from bastion.audit.refusals import ALL_SOURCES, RefusalLimiter, Refusals
from bastion.errors import BackendError


class Clock:
    def __init__(self) -> None:
        self.t = 1000.0

    def __call__(self) -> float:
        return self.t

    def now(self) -> datetime:
        return datetime.fromtimestamp(self.t, UTC)


class Sink:
    def __init__(self) -> None:
        self.events: list[AuditEvent] = []
        self.full = False

    def record_nowait(self, event: AuditEvent) -> None:
        if self.full:
            raise BackendError("audit log unavailable")
        self.events.append(event)


def limiter(clock: Clock, **kw: float) -> RefusalLimiter:
    args: dict[str, float] = {"burst": 3, "per_minute": 3, "global_burst": 100, "global_per_minute": 100}
    args.update(kw)
    return RefusalLimiter(now=clock, window=60.0, **args)  # type: ignore[arg-type]


def test_a_burst_per_source_then_counted() -> None:
    clock = Clock()
    lim = limiter(clock)
    assert [lim.admit("1.2.3.4") for _ in range(5)] == [True, True, True, False, False]
    assert lim.admit("5.6.7.8")  # another source has its own bucket
    assert lim.due() == []  # the window has not passed
    clock.t += 60
    (c,) = lim.due()
    assert (c.source, c.count, c.since, c.until) == ("1.2.3.4", 2, 1000.0, 1000.0)
    assert lim.due() == []


def test_the_bucket_refills_at_its_rate() -> None:
    clock = Clock()
    lim = limiter(clock)
    for _ in range(3):
        assert lim.admit("a")
    assert not lim.admit("a")
    clock.t += 20  # 3 per minute: one token back
    assert lim.admit("a")
    assert not lim.admit("a")


def test_the_global_bucket_bounds_many_sources() -> None:
    clock = Clock()
    lim = limiter(clock, global_burst=5, global_per_minute=5)
    admitted = sum(lim.admit(f"10.0.0.{i}") for i in range(50))
    assert admitted == 5
    (c,) = lim.due(everything=True)
    assert (c.source, c.count) == (ALL_SOURCES, 45)


def test_tracked_sources_are_bounded() -> None:
    clock = Clock()
    lim = limiter(clock, max_sources=10)
    for i in range(1000):
        lim.admit(f"s{i}")
    assert len(lim._buckets) <= 10


def test_refusals_become_bounded_events_and_a_flood_one_summary() -> None:
    clock = Clock()
    sink = Sink()
    rec = Refusals(sink, cluster_name="c", clock=clock, limiter=limiter(clock))
    rec.refused(status=401, reason="bad credential", remote_addr="9.9.9.9", app="logger", auth=True)
    rec.refused(
        status=404,
        reason="x" * 100_000,
        remote_addr="9.9.9.9",
        user="limited",
        app="a" * 10_000,
        http_method="POST",
        path="/mcp/apps/" + "p" * 10_000,
    )
    first, second = sink.events
    assert (first.type, first.code, first.user, first.app) == (AUTH_FAILED, "BAUTH001E", "", "logger")
    assert first.extra["status"] == 401 and first.remote_addr == "9.9.9.9"
    assert second.type == SESSION_REJECTED and second.user == "limited"
    assert len(second.error) < 5000 and "sha256:" in second.error
    assert len(second.app) < 700 and len(second.extra["path"]) < 400
    for _ in range(100):
        rec.refused(status=404, reason="no", remote_addr="9.9.9.9")
    assert len(sink.events) == 3  # the burst of 3, then counted
    clock.t += 61
    rec.refused(status=404, reason="no", remote_addr="8.8.8.8")  # any refusal flushes what is due
    summary = next(e for e in sink.events if e.type == SUPPRESSED)
    assert summary.remote_addr == "9.9.9.9" and summary.extra["count"] == 99
    assert summary.code == "BAUD001E"


def test_a_full_audit_queue_does_not_fail_the_refusal() -> None:
    clock = Clock()
    sink = Sink()
    sink.full = True
    rec = Refusals(sink, cluster_name="c", clock=clock)
    rec.refused(status=403, reason="origin", remote_addr="1.1.1.1")
    assert sink.events == []
