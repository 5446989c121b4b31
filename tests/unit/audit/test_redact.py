"""Redaction: which keys are secret, nested values, sharing of unchanged data, headers."""

from __future__ import annotations

import copy
from collections.abc import Iterator, Mapping
from typing import Any

import pytest

from bastion.audit.redact import (
    DEFAULT_SECRET_KEYS,
    MAX_DEPTH,
    REDACTED,
    Redactor,
    redact_headers,
)

redact = Redactor()


# ------------------------------------------------------------------ which keys


@pytest.mark.parametrize(
    "key",
    [
        "password",
        "Password",
        "PASSWORD",
        "api_key",
        "api-key",
        "apiKey",
        "API_KEY",
        "apikey",
        "x-api-key",
        "X-Api-Key",
        "client_secret",
        "clientSecret",
        "access_token",
        "refreshToken",
        "token",
        "Authorization",
        "proxy-authorization",
        "private_key",
        "privateKey",
        "aws_access_key_id",
        "credentials",
        "db_credential",
        "cookie",
        "set-cookie",
        "session_cookie",
        "user_password_hash",
        "pwd",
        "auth",
        "pass",
        "otp",
    ],
)
def test_secret_keys(key: str) -> None:
    assert redact.is_secret(key)
    assert redact({key: "s3cr3t"}) == {key: REDACTED}


@pytest.mark.parametrize(
    "key",
    [
        "author",  # contains the short name "auth": short names match exactly only
        "authors",
        "passenger",  # contains "pass"
        "bypass",
        "compass",
        "keyboard",
        "key",
        "name",
        "path",
        "query",
        "otp_enabled_count",  # contains "otp", a short name
        "",
    ],
)
def test_ordinary_keys(key: str) -> None:
    assert not redact.is_secret(key)
    assert redact({key: "value"}) == {key: "value"}


def test_custom_keys_replace_the_default_list() -> None:
    r = Redactor(["ssn", "card_number"])
    assert r({"ssn": "1", "cardNumber": "2", "my-card-number": "3", "password": "4"}) == {
        "ssn": REDACTED,
        "cardNumber": REDACTED,
        "my-card-number": REDACTED,  # "cardnumber" is long enough to match inside keys
        "password": "4",
    }


def test_empty_name_in_key_list_matches_nothing() -> None:
    assert Redactor(["", "-", "token"])({"a": 1, "token": 2}) == {"a": 1, "token": REDACTED}


def test_default_list_has_the_documented_names() -> None:
    for name in ("password", "secret", "token", "api_key", "apikey", "authorization"):
        assert name in DEFAULT_SECRET_KEYS
    for name in ("private_key", "access_key", "credential", "cookie"):
        assert name in DEFAULT_SECRET_KEYS


# ------------------------------------------------------------------ values


def test_nested_dicts_and_lists() -> None:
    params = {
        "name": "deploy",
        "arguments": {
            "env": "prod",
            "auth": {"user": "bob", "password": "hunter2"},
            "targets": [
                {"host": "a", "ssh_private_key": "-----BEGIN"},
                {"host": "b", "opts": [{"token": "t0k"}, "plain"]},
            ],
        },
    }
    assert redact(params) == {
        "name": "deploy",
        "arguments": {
            "env": "prod",
            "auth": REDACTED,  # the whole value of a secret key, whatever it is
            "targets": [
                {"host": "a", "ssh_private_key": REDACTED},
                {"host": "b", "opts": [{"token": REDACTED}, "plain"]},
            ],
        },
    }


@pytest.mark.parametrize("value", [123456, 1.5, True, None, ["a", "b"], {"nested": 1}])
def test_any_value_type_under_a_secret_key(value: Any) -> None:
    assert redact({"otp": value}) == {"otp": REDACTED}


def test_secret_looking_strings_under_ordinary_keys_are_kept() -> None:
    # Only keys decide; values are not guessed at.
    assert redact({"note": "password=hunter2"}) == {"note": "password=hunter2"}


@pytest.mark.parametrize("value", ["text", 1, 2.5, None, True, [], {}, [1, [2, [3]]], ("a", "b")])
def test_scalars_and_clean_containers_come_back_unchanged(value: Any) -> None:
    assert redact(value) is value


def test_nothing_secret_returns_the_input_itself() -> None:
    params = {"a": {"b": [{"c": 1}, {"d": [1, 2, {"e": "f"}]}]}, "g": "h"}
    before = copy.deepcopy(params)
    assert redact(params) is params
    assert params == before


def test_unchanged_subtrees_are_shared_and_the_input_is_not_mutated() -> None:
    clean = {"deep": [{"x": 1}]}
    params: dict[str, Any] = {
        "clean": clean,
        "dirty": {"token": "t", "keep": [1, 2]},
        "list": [clean, {"secret": 1}],
    }
    before = copy.deepcopy(params)
    out = redact(params)
    assert params == before  # input untouched
    assert out is not params
    assert out["clean"] is clean  # unchanged subtree shared, not copied
    assert out["dirty"]["keep"] is params["dirty"]["keep"]
    assert out["list"][0] is clean
    assert out["dirty"]["token"] == REDACTED
    assert out["list"][1] == {"secret": REDACTED}


def test_tuples_stay_tuples() -> None:
    out = redact(({"token": "t"}, "x"))
    assert out == ({"token": REDACTED}, "x")
    assert isinstance(out, tuple)


class _ReadOnly(Mapping[str, Any]):
    def __init__(self, data: dict[str, Any]) -> None:
        self._data = data

    def __getitem__(self, key: str) -> Any:
        return self._data[key]

    def __iter__(self) -> Iterator[str]:
        return iter(self._data)

    def __len__(self) -> int:
        return len(self._data)


def test_other_mappings_become_plain_dicts() -> None:
    assert redact(_ReadOnly({"token": "t", "a": 1})) == {"token": REDACTED, "a": 1}
    out = redact(_ReadOnly({"a": 1}))
    assert type(out) is dict
    assert out == {"a": 1}


def test_non_string_keys_are_left_alone() -> None:
    assert redact({1: "one", None: "none", "token": "t"}) == {1: "one", None: "none", "token": REDACTED}


def _nest(depth: int, leaf: Any) -> Any:
    value = leaf
    for _ in range(depth):
        value = {"n": value}
    return value


def test_too_deep_is_redacted_whole() -> None:
    # Within the limit: inspected and kept.
    shallow = _nest(MAX_DEPTH, "leaf")
    assert redact(shallow) is shallow
    # Beyond it: cannot be checked cheaply, so it is not stored.
    out = redact(_nest(MAX_DEPTH + 5, "leaf"))
    node = out
    for _ in range(MAX_DEPTH):
        node = node["n"]
    assert node == REDACTED


def test_very_deep_input_does_not_overflow_the_stack() -> None:
    deep: Any = "leaf"
    for _ in range(5000):
        deep = [deep]
    out = redact(deep)
    assert isinstance(out, list)


def test_many_distinct_keys_still_decided_correctly() -> None:
    # More keys than the decision cache holds (keys come from clients).
    data = {f"field{i}": i for i in range(10_000)} | {"zz_token": "t"}
    out = redact(data)
    assert out["zz_token"] == REDACTED
    assert out["field9999"] == 9999
    assert Redactor().is_secret("x_password_y")


# ------------------------------------------------------------------ headers


def test_headers_credentials_are_always_redacted() -> None:
    headers = {
        "Authorization": "Bearer abc",
        "Proxy-Authorization": "Basic xyz",
        "Cookie": "sid=1",
        "Set-Cookie": "sid=2",
        "X-API-Key": "k",
        "Content-Type": "application/json",
        "Mcp-Session-Id": "s-1",
        "User-Agent": "claude-code/1.0",
    }
    assert redact_headers(headers) == {
        "Authorization": REDACTED,
        "Proxy-Authorization": REDACTED,
        "Cookie": REDACTED,
        "Set-Cookie": REDACTED,
        "X-API-Key": REDACTED,
        "Content-Type": "application/json",
        "Mcp-Session-Id": "s-1",
        "User-Agent": "claude-code/1.0",
    }


@pytest.mark.parametrize("name", ["authorization", "AUTHORIZATION", "x-api-key", "set-cookie", "cookie"])
def test_header_names_are_case_insensitive(name: str) -> None:
    assert redact_headers({name: "v"}) == {name: REDACTED}


def test_headers_matching_the_key_list_are_redacted() -> None:
    assert redact_headers({"X-Auth-Token": "t", "X-Upstream-Secret": "s", "X-Request-Id": "r"}) == {
        "X-Auth-Token": REDACTED,
        "X-Upstream-Secret": REDACTED,
        "X-Request-Id": "r",
    }


def test_fixed_headers_are_redacted_whatever_the_key_list() -> None:
    nothing_secret = Redactor([])
    out = redact_headers({"Authorization": "a", "X-API-Key": "k", "X-Token": "t"}, redactor=nothing_secret)
    assert out == {"Authorization": REDACTED, "X-API-Key": REDACTED, "X-Token": "t"}


def test_redact_headers_returns_a_new_dict() -> None:
    headers = {"Accept": "text/event-stream"}
    out = redact_headers(headers)
    assert out == headers
    assert out is not headers


@pytest.mark.parametrize(
    "key", ["max_tokens", "maxTokens", "max_completion_tokens", "tokenizer", "prompt_tokens"]
)
def test_token_counts_are_not_secrets(key: str) -> None:
    assert Redactor().is_secret(key) is False
    assert Redactor()({key: 512}) == {key: 512}


@pytest.mark.parametrize("key", ["api_tokens", "access_token", "refreshToken", "token", "github_token"])
def test_tokens_still_are(key: str) -> None:
    assert Redactor().is_secret(key) is True
