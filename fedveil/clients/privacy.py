"""A site's privacy as the site itself can vouch for it (``federation.privacy``).

Two levels, as in :mod:`fedveil.dp.ledger`: **sample level** — what the site's own DP-SGD
(Opacus) spent on any one of its records, from its own accountant; **user level** — what the
released sums it took part in reveal about its whole update, from the noise it can rely on
(:mod:`fedveil.clients.site_state`). Nothing here is the server's claim. Before the first round
both are 0; a release with no noise the site can rely on makes the user-level ε infinite, and the
report says which releases those were and why.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from fedveil.clients.policy import SitePolicy
from fedveil.clients.site_state import SITE_PARTY, SiteState
from fedveil.protocol import fedveil_pb2 as pb


@dataclass(frozen=True)
class SitePrivacy:
    """A snapshot of this site's privacy; ``epsilon`` is the headline figure (see :attr:`epsilon`)."""

    sample_epsilon: float
    """ε of the site's DP-SGD on one record (0 without local DP)."""
    sample_delta: float
    user_epsilon: float
    """ε of the released sums on the site's whole update, as the site can guarantee it (∞ if unprotected)."""
    user_delta: float
    releases: int
    unprotected: tuple[str, ...]
    """One line per release without user-level noise the site can rely on."""
    local_dp: bool
    trust_server: bool
    lifetime_sample_epsilon: float = 0.0
    """ε of the DP-SGD steps of every job the site's state records (at the site's δ): the figure the
    policy's ``max_lifetime_local_epsilon`` caps."""
    live: bool = False
    """``sample_epsilon`` is the running job's live accountant (else the state's ledger: every job)."""

    @classmethod
    def of(cls, state: SiteState, local: pb.LocalPrivacySpend | None, trust_server: bool) -> SitePrivacy:
        """From the site's state; ``local`` is its live DP-SGD accountant's spend when it has one (the
        state's own ledger of its DP-SGD steps otherwise, e.g. when read from the state file).

        The sample-level ε is never reported at a δ looser than the site's own (``state.delta``): a
        live spend at a larger δ (the job's, which the site's policy normally refuses) is replaced by
        the state's ledger of the same DP-SGD steps, accounted at the site's δ."""
        unprotected = tuple(f"run {r.run_id} round {r.round} attempt {r.attempt} ({r.dp_mode}): {r.note}"
                            for r in state.unprotected_releases)
        local_dp = local is not None or SITE_PARTY in state.ledger.clients
        live = local is not None and float(local.delta) <= state.delta
        return cls(
            sample_epsilon=float(local.epsilon) if live and local is not None else state.sample_epsilon(),
            sample_delta=float(local.delta) if live and local is not None else state.delta,
            user_epsilon=state.user_epsilon(),
            user_delta=state.delta,
            releases=len(state.releases),
            unprotected=unprotected,
            local_dp=local_dp,
            trust_server=trust_server,
            lifetime_sample_epsilon=state.lifetime_local_epsilon(),
            live=live,
        )

    def to_dict(self) -> dict[str, object]:
        """The snapshot as JSON values (an infinite ε is null, with ``*_infinite`` true)."""
        return {
            "sample_epsilon": None if math.isinf(self.sample_epsilon) else self.sample_epsilon,
            "sample_epsilon_infinite": math.isinf(self.sample_epsilon),
            "sample_delta": self.sample_delta,
            "sample_epsilon_covers": "this job" if self.live else "every job recorded",
            "lifetime_sample_epsilon": None if math.isinf(self.lifetime_sample_epsilon)
            else self.lifetime_sample_epsilon,
            "user_epsilon": None if math.isinf(self.user_epsilon) else self.user_epsilon,
            "user_epsilon_infinite": math.isinf(self.user_epsilon),
            "user_delta": self.user_delta,
            "releases": self.releases,
            "unprotected_releases": list(self.unprotected),
            "local_dp": self.local_dp,
        }

    @property
    def epsilon(self) -> float:
        """The ε an Opacus user expects to print: sample level under local DP, else user level."""
        return self.sample_epsilon if self.local_dp else self.user_epsilon

    @property
    def delta(self) -> float:
        return self.sample_delta if self.local_dp else self.user_delta

    def report(self) -> str:
        """A few lines for a privacy officer."""
        def fmt(eps: float) -> str:
            return "∞" if math.isinf(eps) else f"{eps:.4g}"

        lines = [f"site privacy (own accounting; the server's claims are not used; "
                 f"{'trusting' if self.trust_server else 'not trusting'} the server)",
                 f"  sample level (DP-SGD on one record), {'this job' if self.live else 'every job recorded'}: "
                 f"ε = {fmt(self.sample_epsilon)} at δ = {self.sample_delta:g}"
                 + ("" if self.local_dp else " (no local DP)"),
                 f"  user level (the site's whole update), {self.releases} release(s) recorded: "
                 f"ε = {fmt(self.user_epsilon)} at δ = {self.user_delta:g} (what max_user_epsilon caps)"]
        if self.live:
            lines.insert(2, f"  sample level, every job recorded: ε = {fmt(self.lifetime_sample_epsilon)} at "
                            f"δ = {self.user_delta:g} (what max_lifetime_local_epsilon caps)")
        for line in self.unprotected[:10]:
            lines.append(f"    unprotected: {line}")
        if len(self.unprotected) > 10:
            lines.append(f"    … and {len(self.unprotected) - 10} more unprotected release(s)")
        return "\n".join(lines)


@dataclass(frozen=True)
class CapHeadroom:
    """One of a site policy's ε caps over every job its state records, against what the state holds."""

    setting: str
    """The policy setting (``max_user_epsilon``, ``max_lifetime_local_epsilon``)."""
    level: str
    cap: float
    epsilon: float
    delta: float

    @property
    def left(self) -> float:
        """ε the cap still allows (0 once reached or passed, as for an unbounded user-level ε)."""
        return max(0.0, self.cap - self.epsilon)

    def line(self) -> str:
        spent = "∞" if math.isinf(self.epsilon) else f"{self.epsilon:.4g}"
        return (f"  {self.setting} = {self.cap:g}: {self.level} ε = {spent} at δ = {self.delta:g}, "
                f"{self.left:.4g} left")


def policy_headroom(state: SiteState, policy: SitePolicy) -> list[CapHeadroom]:
    """What ``policy``'s caps over every job (0: no cap, left out) still allow, from ``state``: what a
    privacy officer reads before the site joins another job (``fedveil budget report STATE --policy``)."""
    caps = [("max_user_epsilon", "user-level", policy.max_user_epsilon, state.user_epsilon()),
            ("max_lifetime_local_epsilon", "sample-level (DP-SGD, every job)", policy.max_lifetime_local_epsilon,
             state.lifetime_local_epsilon())]
    return [CapHeadroom(setting, level, cap, spent, state.delta) for setting, level, cap, spent in caps if cap]
