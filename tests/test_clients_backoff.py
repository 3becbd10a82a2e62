import pytest

from fedveil.clients.backoff import Backoff, BackoffPolicy, GaveUp


class FakeClock:
    def __init__(self) -> None:
        self.now = 0.0
        self.sleeps: list[float] = []

    def __call__(self) -> float:
        return self.now

    def sleep(self, seconds: float) -> None:
        self.sleeps.append(seconds)
        self.now += seconds


class Transient(Exception):
    pass


class Fatal(Exception):
    pass


def flaky(failures: int, exc: type[Exception] = Transient):
    calls = {"n": 0}

    def op() -> str:
        calls["n"] += 1
        if calls["n"] <= failures:
            raise exc(f"failure {calls['n']}")
        return "ok"

    return op, calls


def test_waits_grow_exponentially_up_to_the_cap_without_jitter() -> None:
    clock = FakeClock()
    policy = BackoffPolicy(initial_delay_s=0.5, max_delay_s=3.0, multiplier=2.0, jitter=0.0, give_up_after_s=None)
    op, calls = flaky(5)
    result = Backoff(policy, sleep=clock.sleep, clock=clock).run(op, lambda e: isinstance(e, Transient))
    assert result == "ok" and calls["n"] == 6
    assert clock.sleeps == [0.5, 1.0, 2.0, 3.0, 3.0]


def test_full_jitter_stays_under_the_envelope_and_is_seeded() -> None:
    policy = BackoffPolicy(initial_delay_s=1.0, max_delay_s=8.0, jitter=1.0)
    a = Backoff(policy, seed=3).delays()
    b = Backoff(policy, seed=3).delays()
    first = [next(a) for _ in range(20)]
    assert first == [next(b) for _ in range(20)]
    for k, d in enumerate(first):
        assert 0.0 <= d <= policy.ceiling(k)
    assert len(set(first)) == 20  # jittered, not constant


def test_fatal_errors_are_not_retried() -> None:
    clock = FakeClock()
    op, calls = flaky(3, Fatal)
    with pytest.raises(Fatal):
        Backoff(sleep=clock.sleep, clock=clock).run(op, lambda e: isinstance(e, Transient))
    assert calls["n"] == 1 and clock.sleeps == []


def test_gives_up_at_the_time_limit_with_a_last_try_at_the_deadline() -> None:
    clock = FakeClock()
    policy = BackoffPolicy(initial_delay_s=1.0, max_delay_s=4.0, jitter=0.0, give_up_after_s=6.0)
    op, _calls = flaky(100)
    with pytest.raises(GaveUp, match="gave up after 4 attempts") as info:
        Backoff(policy, sleep=clock.sleep, clock=clock).run(op, lambda e: True)
    assert clock.sleeps == [1.0, 2.0, 3.0]  # 1 + 2 = 3 s, then 3 s more reaches the 6 s limit exactly
    assert isinstance(info.value.last_error, Transient)


def test_gives_up_after_max_attempts_and_reports_retries() -> None:
    clock = FakeClock()
    seen: list[tuple[int, float]] = []
    policy = BackoffPolicy(initial_delay_s=0.1, jitter=0.0, max_attempts=3)
    op, calls = flaky(10)
    backoff = Backoff(policy, sleep=clock.sleep, clock=clock, on_retry=lambda n, d, e: seen.append((n, d)))
    with pytest.raises(GaveUp):
        backoff.run(op, lambda e: True)
    assert calls["n"] == 3 and seen == [(1, 0.1), (2, 0.2)]


@pytest.mark.parametrize(
    ("kwargs", "fragment"),
    [
        ({"initial_delay_s": 0}, "initial_delay_s"),
        ({"max_delay_s": 0.01}, "max_delay_s"),
        ({"multiplier": 0.5}, "multiplier"),
        ({"jitter": 2}, "jitter"),
        ({"max_attempts": 0}, "max_attempts"),
    ],
)
def test_bad_policies_are_named(kwargs: dict, fragment: str) -> None:
    with pytest.raises(ValueError, match=fragment):
        BackoffPolicy(**kwargs)
