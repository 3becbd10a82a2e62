"""Fuzzing every coordinator RPC during a real job (issue 10): nothing a site sends raises
anything but a protocol refusal, and the honest sites still finish with the exact mean.

The bounded budget here keeps ``make test`` quick; ``benchmarks/fuzz.py`` runs the long campaign.
"""

from __future__ import annotations

from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from tests.fuzz_inputs import edits
from tests.fuzz_targets import FUZZED_RPCS, UNARY_RPCS, FederationUnderFuzz

BUDGET = 600


def rpc_and_edits() -> st.SearchStrategy[tuple[str, list]]:
    def for_rpc(rpc: str) -> st.SearchStrategy[tuple[str, list]]:
        import fedveil.protocol.fedveil_pb2 as pb

        cls = UNARY_RPCS[rpc][0] if rpc in UNARY_RPCS else pb.MaskedInputChunk
        return st.tuples(st.just(rpc), edits(cls.DESCRIPTOR))

    return st.sampled_from(FUZZED_RPCS).flatmap(for_rpc)


@pytest.mark.slow
def test_fuzzed_requests_from_an_enrolled_site_are_refused_cleanly_and_honest_sites_finish(tmp_path: Path) -> None:
    target = FederationUnderFuzz(tmp_path, honest=5, rounds=2).start()  # |2·v| stays inside the clip range

    @settings(max_examples=BUDGET, deadline=None, database=None,
              suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])
    @given(rpc_and_edits())
    def fuzz(case: tuple[str, list]) -> None:
        target.send(*case)

    try:
        fuzz()
        summary = target.finish()
        exact = target.released_mean_is_exact()
    finally:
        target.finish(timeout=0)
        target.close()
    assert target.outcomes.failures == [], "\n\n".join(target.outcomes.failures)
    assert target.outcomes.total >= BUDGET
    assert summary is not None and summary.status == "completed", summary
    assert target.honest_errors() == {}
    assert exact, "the last released aggregate is not the honest sites' exact mean"
    # the fuzzing reached past the session checks: some requests were refused for their content
    assert set(target.outcomes.counts) - {"Replayed", "Unauthenticated"}, target.outcomes.counts
