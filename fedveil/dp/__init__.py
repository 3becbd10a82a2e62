"""Differential privacy for fedveil: the pure privacy math (no I/O, no global state).

Stable interfaces (other packages build on these; change them only compatibly)
==============================================================================

Events (``fedveil.dp.accounting``) — frozen dataclasses, ``to_dict()`` / ``event_from_dict()``:

- ``SubsampledGaussianEvent(sample_rate, noise_multiplier, steps=1)`` — Poisson-subsampled Gaussian,
  self-composed ``steps`` times. User level: q = cohort ÷ population, one step per round.
  Sample level: q = batch ÷ local dataset size, one step per optimizer step.
- ``SampledWithoutReplacementGaussianEvent(population, sample_size, noise_multiplier, steps=1)`` — a
  fixed-size cohort of K of N, uniformly without replacement, then the Gaussian (z = std ÷ clip norm);
  replace-one relation, so the accountant uses z / 2 (sensitivity 2S). RDP accountant only.
- ``fedveil.dp.sampling.user_level_event(noise_multiplier, cohort_size, available_at_draw,
  sampling="fixed", amplification=True)`` → ``(event, details)``: the user-level event of one central-DP
  round from the sampling that really happened (q = 1 when K >= N or without amplification).
- ``RdpCurveEvent.from_function(mechanism, rdp_fn, orders=DEFAULT_ORDERS, steps=1, params={...})`` —
  any other mechanism given by its own RDP bound ``rdp_fn(orders: np.ndarray) -> np.ndarray`` for ONE
  application (e.g. Skellam / distributed discrete Gaussian). Only the RDP accountant composes it; PRV
  and PLD raise ``UnsupportedEventError`` (never a silent Gaussian stand-in).

Accountants (``fedveil.dp.accounting``), interface ``PrivacyAccountant`` (after Opacus's):

- ``compose(event)``, ``step(noise_multiplier=, sample_rate=, steps=1)``,
  ``get_epsilon(delta)``, ``epsilon_after(events, delta)`` (what-if), ``state_dict()`` /
  ``load_state_dict()`` (JSON-serializable), ``supports(event)``, ``history``, ``total_steps``.
- ``relation``: ``"add_remove"``, or ``"replace_one"`` once a without-replacement event is composed
  (plain Gaussian rounds are then re-expressed at z / 2; Poisson q < 1 and RDP curves are refused).
- ``RDPAccountant`` (Opacus RDP analysis; O(#orders) per compose, independent of ``steps``),
  ``PRVAccountant`` (Opacus PRV; upper bound within ``eps_error``), ``PLDAccountant`` (Google
  ``dp_accounting`` PLD; pessimistic discretization). ``make_accountant("rdp"|"prv"|"pld")``.
- ``compute_epsilon(...)`` and ``solve_noise_multiplier(target_epsilon=, delta=, sample_rate=, steps=,
  accountant=)`` → ``NoiseSolution`` with ε ≤ target and within 0.5 % of it.

Ledger (``fedveil.dp.ledger``):

- ``PrivacyLedger(LedgerConfig(accountant, federation_delta, client_delta, federation_epsilon_budget,
  client_epsilon_budget))``.
- ``reserve(round_index, federation=event, clients={client_id: event}, mechanism=label, details={...})``
  checks every party's budget and records the round only if all fit, else raises
  ``BudgetExceededError`` (attributes ``party``, ``epsilon_before``, ``epsilon_after``, ``budget``,
  ``remaining``). ``check_budget(...)`` is the same check without recording; ``record(...)`` records
  without checking; ``cancel_round(r)`` takes back the federation's reservation of an aborted latest
  round (``include_clients=True`` also drops clients' entries).
- ``epsilon(party)``, ``remaining(party)``, ``party_history(party, bound=None)``; party ``FEDERATION`` =
  ``"federation"`` (user level) or a client id (sample level). ``record(..., client_details={...})``
  labels client entries (a server records a site's *reported* spend with its verdict: ``verified``).
- ``to_json()`` / ``PrivacyLedger.from_json(text)`` (``LedgerFormatError`` names the bad field); ``copy()``.

Bounded work (``fedveil.dp.bounded``): ``WorkBound`` (limits, counters, memo; the caller's) and
``bounded_epsilon(prototype, events, delta, bound)``: the ledger's accountant where its estimated work
fits, RDP's bound elsewhere, for views of ledgers whose entries came from sites' reports.

Reports (``fedveil.dp.report``): ``build_report(ledger, bound=None)`` → ``PrivacyReport`` (bounded;
unverified client figures are labelled, not shown as facts); ``render_text``,
``render_markdown``, ``report_to_dict`` (JSON with a ``rounds`` list), ``render_plot`` → a matplotlib
``Figure`` (the caller saves it). A run-store reader hands ``build_report`` a ``PrivacyLedger``.

Local DP-SGD (``fedveil.dp.local``, imports torch/opacus): ``LocalDPSession(LocalDPConfig(...))``;
each round ``model, optimizer, loader = session.privatize(model, optimizer, loader)``, train, then
``state = session.finish_round(model)`` (plain state dict) and ``session.epsilon(delta)``.

Only the torch-free names are re-exported here, so ``import fedveil.dp`` stays light.
"""

from fedveil.dp.accounting import (
    ACCOUNTANTS,
    ADD_REMOVE,
    DEFAULT_ORDERS,
    REPLACE_ONE,
    DpEvent,
    PLDAccountant,
    PrivacyAccountant,
    PRVAccountant,
    RDPAccountant,
    RdpCurveEvent,
    SampledWithoutReplacementGaussianEvent,
    SubsampledGaussianEvent,
    UnsupportedEventError,
    accountant_from_state_dict,
    event_from_dict,
    make_accountant,
)
from fedveil.dp.calibration import NoiseSolution, compute_epsilon, solve_noise_multiplier
from fedveil.dp.ledger import (
    FEDERATION,
    BudgetExceededError,
    LedgerConfig,
    LedgerEntry,
    LedgerFormatError,
    PrivacyLedger,
    RoundSpend,
)
from fedveil.dp.sampling import user_level_event

__all__ = [
    "ACCOUNTANTS",
    "ADD_REMOVE",
    "DEFAULT_ORDERS",
    "FEDERATION",
    "REPLACE_ONE",
    "BudgetExceededError",
    "DpEvent",
    "LedgerConfig",
    "LedgerEntry",
    "LedgerFormatError",
    "NoiseSolution",
    "PLDAccountant",
    "PRVAccountant",
    "PrivacyAccountant",
    "PrivacyLedger",
    "RDPAccountant",
    "RdpCurveEvent",
    "RoundSpend",
    "SampledWithoutReplacementGaussianEvent",
    "SubsampledGaussianEvent",
    "UnsupportedEventError",
    "accountant_from_state_dict",
    "compute_epsilon",
    "event_from_dict",
    "make_accountant",
    "solve_noise_multiplier",
    "user_level_event",
]
