"""The CSRF token is bound to the session's credential; cookies always carry the strict flags."""

from __future__ import annotations

from bastion.webui import guard


def test_csrf_token_is_bound_to_its_session() -> None:
    a, b = guard.csrf_for("credential-a"), guard.csrf_for("credential-b")
    assert a != b
    assert guard.csrf_ok("credential-a", a)
    assert not guard.csrf_ok("credential-a", b)
    assert not guard.csrf_ok("credential-a", "")
    assert not guard.csrf_ok("", guard.csrf_for(""))
    assert not guard.csrf_ok("credential-a", a + "x" * 200)


def test_cookies_are_strict() -> None:
    c = guard.cookie(guard.SESSION_COOKIE, "v", max_age=60)
    assert c.startswith("__Host-")
    for flag in ("Path=/", "Secure", "HttpOnly", "SameSite=Strict", "Max-Age=60"):
        assert flag in c.split("; ")
    assert "Domain" not in c
    assert "Max-Age=0" in guard.cleared(guard.SESSION_COOKIE)


def test_origin_must_be_this_proxy() -> None:
    assert guard.same_origin("", "proxy.example:443", "proxy.example:443")
    assert guard.same_origin("https://proxy.example:443", "proxy.example:443", "x")
    assert not guard.same_origin("https://evil.example", "proxy.example:443", "proxy.example:443")
    assert not guard.same_origin("null", "proxy.example:443", "proxy.example:443")
    assert not guard.same_origin("http://proxy.example:443", "proxy.example:443", "proxy.example:443")
    # Browsers leave the default port out of Origin; case does not matter; IPv6 in brackets.
    assert guard.same_origin("https://Proxy.Example", "proxy.example:443", "")
    assert guard.same_origin("https://proxy.example", "proxy.example", "")
    assert not guard.same_origin("https://proxy.example", "proxy.example:3080", "")
    assert guard.same_origin("https://[::1]:3080", "[::1]:3080", "")
    assert not guard.same_origin("https://proxy.example.evil", "proxy.example:443", "proxy.example")
    assert not guard.same_origin("https://proxy.example:443/x", "proxy.example:443", "")


def test_csp_allows_nothing_inline_and_no_other_origin() -> None:
    assert "'unsafe-inline'" not in guard.CSP and "http" not in guard.CSP
    assert "script-src 'self'" in guard.CSP and "frame-ancestors 'none'" in guard.CSP
