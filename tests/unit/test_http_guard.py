"""The HTTP guard of the worker's pages: the bearer token, the dashboard cookie, request
limits and id checks on path parameters, ``k`` bounds."""

from __future__ import annotations

from typing import Any

import pytest
from aiohttp.test_utils import make_mocked_request

from stream_knn.worker.web import (
    COOKIE,
    MAX_BODY_BYTES,
    MAX_QUERY_BYTES,
    _refusal,
    authorized,
    cookie_value,
    parse_k,
)

TOKEN = "an-http-token-of-some-length"


def _request(path: str = "/status", headers: dict[str, str] | None = None, **kw: Any) -> Any:
    return make_mocked_request("GET", path, headers=headers or {}, **kw)


def test_no_token_set_lets_everyone_in() -> None:
    assert authorized(_request(), "")


@pytest.mark.parametrize(
    ("headers", "allowed"),
    [
        ({}, False),
        ({"Authorization": f"Bearer {TOKEN}"}, True),
        ({"Authorization": f"bearer {TOKEN}"}, True),
        ({"Authorization": f"Bearer {TOKEN}x"}, False),
        ({"Authorization": f"Basic {TOKEN}"}, False),
        ({"Authorization": "Bearer"}, False),
        ({"Cookie": f"{COOKIE}={cookie_value(TOKEN)}"}, True),
        ({"Cookie": f"{COOKIE}={TOKEN}"}, False),  # the cookie is not the token itself
        ({"Cookie": f"{COOKIE}={cookie_value('another token')}"}, False),
    ],
)
def test_bearer_token_or_dashboard_cookie(headers: dict[str, str], allowed: bool) -> None:
    assert authorized(_request(headers=headers), TOKEN) is allowed


def test_token_in_the_query_only_where_allowed() -> None:
    request = _request(f"/?token={TOKEN}")
    assert not authorized(request, TOKEN)
    assert authorized(request, TOKEN, query_token=True)
    assert not authorized(_request("/?token=wrong"), TOKEN, query_token=True)


def test_query_string_and_body_over_the_limits_are_refused() -> None:
    long_query = "/recommendations/u1?k=5&pad=" + "x" * MAX_QUERY_BYTES
    assert _refusal(_request(long_query), (), 256) == (
        414,
        f"the query string has {MAX_QUERY_BYTES + 8} bytes; the limit is {MAX_QUERY_BYTES}",
    )
    big = _request(headers={"Content-Length": str(MAX_BODY_BYTES + 1)})
    assert _refusal(big, (), 256) == (
        413,
        f"the request body has {MAX_BODY_BYTES + 1} bytes; the limit is {MAX_BODY_BYTES}",
    )
    assert _refusal(_request("/status?x=1"), (), 256) is None


@pytest.mark.parametrize(
    ("user_id", "error"),
    [
        ("u1", None),
        ("é-ü-名前", None),
        ("x" * 9, "user_id has 9 characters; the limit is events.max_id_length = 8"),
        ("   ", "user_id is blank"),
        ("a\x1b[2Jb", "user_id holds a control character (U+001B at 1)"),
    ],
)
def test_ids_in_paths_follow_the_event_rules(user_id: str, error: str | None) -> None:
    request = _request("/recommendations/x", match_info={"user_id": user_id})
    refused = _refusal(request, ("user_id",), 8)
    assert refused == (None if error is None else (400, error))


@pytest.mark.parametrize(
    ("raw", "expected"),
    [
        (None, None),
        ("", None),
        ("1", 1),
        ("200", 200),
        ("0", "k must be an integer between 1 and 200, got 0"),
        ("201", "k must be an integer between 1 and 200, got 201"),
        ("-3", "k must be an integer between 1 and 200, got -3"),
        ("1e3", "k must be an integer between 1 and 200, got '1e3'"),
        ("9" * 5000, "k must be an integer between 1 and 200, got"),
    ],
)
def test_k_is_bounded_by_max_k(raw: str | None, expected: int | str | None) -> None:
    if isinstance(expected, str):
        with pytest.raises(ValueError, match=expected[:40]):
            parse_k(raw, 200)
    else:
        assert parse_k(raw, 200) == expected
