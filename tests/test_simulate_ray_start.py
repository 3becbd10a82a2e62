"""Starting a local Ray: a node that missed one of Ray's 30 s start-up windows (the raylet's
registration, the GCS server's port file) is started once more; any other failure, and a second
miss, is not retried (a fake ``ray`` module, no Ray started)."""

from __future__ import annotations

from typing import Any

import pytest

from fedveil.errors import FedveilError
from fedveil.simulation.ray_backend import RAY_START_ATTEMPTS, init_local_ray

TIMED_OUT = ("The current node timed out during startup. This could happen because some of the raylet "
             "failed to startup or the GCS has become overloaded.")
NO_GCS_PORT = ("Timed out waiting for file /tmp/ray/session_2026-12-05_23-13-12_410409_10043/"
               "gcs_server_port_64027bc69549e76b40b1ea0bb3069b5e995616f6092f518959e724c7")


class FakeRay:
    def __init__(self, failures: list[Exception]) -> None:
        self.failures = failures
        self.inits: list[dict[str, Any]] = []
        self.shutdowns = 0

    def init(self, **kwargs: Any) -> None:
        self.inits.append(kwargs)
        if self.failures:
            raise self.failures.pop(0)

    def shutdown(self) -> None:
        self.shutdowns += 1


@pytest.mark.parametrize("missed", [Exception(TIMED_OUT), RuntimeError(NO_GCS_PORT)])
def test_a_node_that_missed_a_start_up_window_is_started_again(missed: Exception) -> None:
    ray = FakeRay([missed])
    init_local_ray(ray, num_cpus=2)  # type: ignore[arg-type]
    assert ray.inits == [{"num_cpus": 2}, {"num_cpus": 2}] and ray.shutdowns == 1


def test_a_node_that_misses_it_every_time_is_a_named_simulation_error() -> None:
    ray = FakeRay([Exception(TIMED_OUT), RuntimeError(NO_GCS_PORT)][:RAY_START_ATTEMPTS])
    with pytest.raises(FedveilError) as caught:
        init_local_ray(ray)  # type: ignore[arg-type]
    assert caught.value.field == "backend" and "did not start in time" in str(caught.value)
    assert len(ray.inits) == RAY_START_ATTEMPTS and ray.shutdowns == RAY_START_ATTEMPTS


@pytest.mark.parametrize("failure", [ValueError("object_store_memory: too small"), Exception("some other failure"),
                                     RuntimeError("Timed out waiting for the actor")])
def test_other_start_failures_are_not_retried(failure: Exception) -> None:
    ray = FakeRay([failure])
    with pytest.raises(type(failure)):
        init_local_ray(ray)  # type: ignore[arg-type]
    assert len(ray.inits) == 1 and ray.shutdowns == 0
