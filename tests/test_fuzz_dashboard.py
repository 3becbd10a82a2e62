"""Fuzzing the dashboard's HTTP API (issue 10): random methods, paths, queries, headers and bodies,
with and without the login token. No response may be a 5xx, echo a traceback, exception text, a
filesystem path or the token, and requests without the token must never succeed."""

from __future__ import annotations

from pathlib import Path

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from tests.dashboard_helpers import TOKEN, Board, board  # noqa: F401 (the fixture)
from tests.fuzz_inputs import dashboard_requests
from tests.fuzz_targets import Outcomes, dashboard_call

BUDGET = 400


def test_fuzzed_dashboard_requests_get_clean_answers_and_nothing_without_the_token(
    board: Board, tmp_path: Path,  # noqa: F811
) -> None:
    server, _runs, _dirs = board
    url = server.url
    with_token, without_token = Outcomes(), Outcomes()
    api_without_token: list[tuple[str, str, int | None]] = []

    @settings(max_examples=BUDGET, deadline=None, database=None,
              suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])
    @given(dashboard_requests(), st.sampled_from(["token", "token", "token", "none", "wrong"]))
    def fuzz(request: tuple[str, str, bytes, dict[str, str]], who: str) -> None:
        method, path, body, headers = request
        token = {"token": TOKEN.value, "none": None, "wrong": "w" * 43}[who]
        outcomes = with_token if who == "token" else without_token
        status = dashboard_call(url, method, path, body, headers, token, outcomes,
                                secrets=(TOKEN.value, str(tmp_path)))
        if token != TOKEN.value and "/api/" in path:
            api_without_token.append((method, path, status))

    fuzz()
    failures = with_token.failures + without_token.failures
    assert failures == [], "\n\n".join(failures)
    assert with_token.total + without_token.total >= BUDGET
    # without the token every API call is refused (only static pages and the login may answer)
    assert api_without_token and all(status is not None and status >= 400 for _m, _p, status in api_without_token), [
        a for a in api_without_token if a[2] is None or a[2] < 400]
