"""A site's own policy, its state and its privacy ledger (fedveil.clients.policy / site_state / admission)."""

from __future__ import annotations

import dataclasses
import json
import math
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from fedveil.cli import main
from fedveil.clients.mechanisms import guaranteed_distributed_event, own_noise_stddev
from fedveil.clients.policy import PolicyError, SitePolicy, build_policy
from fedveil.clients.policy_settings import POLICY_TABLE, load_policy_file, policy_file_text
from fedveil.clients.privacy import SitePrivacy
from fedveil.clients.site_state import Release, SiteState, SiteStateError
from fedveil.dp.accounting import RDPAccountant, SubsampledGaussianEvent
from fedveil.dp.distributed import derive_parameters
from fedveil.dp.ledger import FEDERATION
from fedveil.protocol import fedveil_pb2 as pb

KEY = bytes(range(32))


def test_a_site_that_configures_nothing_must_pin_an_authority_or_opt_in_to_trusting_the_server() -> None:
    with pytest.raises(PolicyError, match="authority_public_key"):
        SitePolicy()
    assert SitePolicy(trust_server=True).trust_server
    assert not SitePolicy(authority_public_key=KEY).trust_server


@pytest.mark.parametrize(("field", "value"), [
    ("min_cohort", 1), ("min_cohort", True), ("max_corrupt_fraction", 0.5), ("max_corrupt_fraction", math.nan),
    ("allowed_dp_modes", frozenset({"laplace"})), ("allowed_dp_modes", frozenset()),
    ("min_noise_multiplier", -1.0), ("min_noise_multiplier", math.inf), ("max_attempts_per_round", 0),
    ("evaluation", "public"), ("max_evaluations_per_round", -1), ("security_bits", 2),
    ("authority_public_key", b"short"),
])
def test_bad_settings_are_refused_naming_the_setting(field: str, value: object) -> None:
    with pytest.raises(PolicyError) as err:
        SitePolicy(**{"authority_public_key": KEY, field: value})  # type: ignore[arg-type]
    assert err.value.field == field


def test_a_noise_floor_without_trust_in_the_server_rules_out_central_dp() -> None:
    policy = SitePolicy(authority_public_key=KEY, min_noise_multiplier=1.0)
    assert "central" not in policy.allowed_dp_modes
    assert "central" in SitePolicy(trust_server=True, min_noise_multiplier=1.0).allowed_dp_modes


def test_toml_and_flags_build_one_policy_flags_winning(tmp_path: Path) -> None:
    path = tmp_path / "site.toml"
    path.write_text('[policy]\nmin_cohort = 7\nallowed_dp_modes = ["local", "distributed"]\nevaluation = "off"\n')
    policy = build_policy(load_policy_file(path), authority=("c", KEY), min_cohort=9, evaluation=None)
    assert policy.min_cohort == 9 and policy.evaluation == "off"
    assert policy.allowed_dp_modes == frozenset({"local", "distributed"}) and policy.consortium == "c"
    path.write_text('[policy]\nmin_cohrt = 7\n')
    with pytest.raises(PolicyError, match="min_cohrt"):
        build_policy(load_policy_file(path), authority=("c", KEY))
    path.write_text("[policy\n")
    with pytest.raises(PolicyError, match="not valid TOML"):
        load_policy_file(path)


@pytest.mark.parametrize(("text", "message"), [
    ("[policy]\nmin_cohort = \"seven\"\n", "policy.min_cohort: expected int, got str"),
    ("[policy]\nmax_corrupt_fraction = true\n", "policy.max_corrupt_fraction: expected float, got a boolean"),
    ("[policy]\nallowed_dp_modes = \"local\"\n", "policy.allowed_dp_modes: expected a list of str"),
    ("[policy]\nauthority_public_key = \"00\"\n", "policy.authority_public_key: unknown key"),
    ("[job]\nrounds = 2\n", "job: unknown section"),
])
def test_a_bad_policy_file_is_refused_naming_the_key(tmp_path: Path, text: str, message: str) -> None:
    path = tmp_path / "site.toml"
    path.write_text(text)
    with pytest.raises(PolicyError, match=message) as refused:
        load_policy_file(path)
    assert refused.value.field == "policy"


def test_a_policy_file_round_trips_and_may_omit_its_header(tmp_path: Path) -> None:
    policy = SitePolicy(authority_public_key=KEY, min_cohort=11, max_corrupt_fraction=0.4, evaluation="off",
                        allowed_dp_modes=frozenset({"local", "distributed"}), security_bits=64.0)
    path = tmp_path / "site.toml"
    path.write_text(policy_file_text(policy))
    assert load_policy_file(path) == POLICY_TABLE.config_fields(policy)
    assert build_policy(load_policy_file(path), authority=("c", KEY)) == dataclasses.replace(policy, consortium="c")
    path.write_text("min_cohort = 5\n")  # the keys of [policy] at the top level
    assert load_policy_file(path) == {"min_cohort": 5}


def test_the_client_command_names_the_flag_or_toml_key_at_fault(tmp_path: Path, capsys: pytest.CaptureFixture[str]
                                                                 ) -> None:
    data = tmp_path / "d.csv"
    data.write_text("x\n")
    base = ["client", "--server", "127.0.0.1:1", "--task", "fedveil.tasks.synthetic", "--data", str(data),
            "--insecure", "--trust-server"]
    assert main([*base, "--min-cohort", "1"]) == 2
    assert "error: --min-cohort:" in capsys.readouterr().err
    assert main([*base, "--max-lifetime-local-epsilon", "-1"]) == 2
    assert "error: --max-lifetime-local-epsilon:" in capsys.readouterr().err
    assert main([*base, "--max-user-epsilon", "nan"]) == 2
    assert "error: --max-user-epsilon:" in capsys.readouterr().err
    assert main([*base, "--allow-local-accountant", "gdp"]) == 2  # click's choice check names the flag
    assert "--allow-local-accountant" in capsys.readouterr().err
    bad = tmp_path / "p.toml"
    bad.write_text("[policy]\nmax_attempts_per_round = 0\n")
    assert main([*base, "--policy", str(bad)]) == 2
    assert f"error: policy.max_attempts_per_round in --policy {bad}:" in capsys.readouterr().err
    bad.write_text("[policy]\nmax_user_epsilon = -2\n")
    assert main([*base, "--policy", str(bad)]) == 2
    assert f"error: policy.max_user_epsilon in --policy {bad}:" in capsys.readouterr().err
    assert main(["client", "--server", "127.0.0.1:1", "--task", "fedveil.tasks.synthetic", "--data", str(data),
                 "--insecure"]) == 2
    assert "error: --authority:" in capsys.readouterr().err


@given(st.floats(0.0, 5.0), st.integers(1, 30), st.sampled_from([0.5, 1.0, 2.0]))
@settings(max_examples=60, deadline=None)
def test_a_sites_noise_share_meets_its_floor_with_only_the_honest_shares_it_can_rely_on(
    floor: float, honest: int, announced_z: float
) -> None:
    config = derive_parameters(10, 64, 1.0, bits=24, noise_multiplier=announced_z)
    own = own_noise_stddev(config, floor, honest)
    assert own >= config.local_stddev * (1 - 1e-12)  # never below what the round announced
    guaranteed = own**2 + (honest - 1) * config.local_stddev**2
    target = (floor * config.scale * config.clip_norm) ** 2
    assert guaranteed >= target * (1 - 1e-9)


def test_the_site_ledger_counts_only_the_noise_the_site_can_rely_on() -> None:
    announced = derive_parameters(10, 64, 1.0, bits=24, noise_multiplier=1.0)
    # the server claims 10 contributors; the site can rely on its own share and 2 other honest ones
    claim = announced.epsilon(1e-5)
    relied = guaranteed_distributed_event(announced, announced.local_stddev, 3)
    acc = RDPAccountant()
    acc.compose(relied)
    assert acc.get_epsilon(1e-5) > claim  # fewer honest shares, more ε than the server's figure
    topped = guaranteed_distributed_event(announced, own_noise_stddev(announced, 1.0, 3), 3)
    acc2 = RDPAccountant()
    acc2.compose(topped)
    assert acc2.get_epsilon(1e-5) < acc.get_epsilon(1e-5)  # the floor's top-up restores the noise


def test_site_state_refuses_retries_after_release_and_caps_attempts_across_restarts(tmp_path: Path) -> None:
    path = tmp_path / "state.json"
    state = SiteState.open(path)
    assert state.admission_refusal("run", 1, 2) is None
    state.joined("run", 1)
    state.joined("run", 1)
    assert "maximum" in (state.admission_refusal("run", 1, 2) or "")
    state.released("run", 1, bytes(32))
    reopened = SiteState.open(path)  # a restarted client remembers
    assert "already released" in (reopened.admission_refusal("run", 1, 5) or "")
    assert "already released" in (reopened.admission_refusal("run", 0, 5) or "")  # an earlier round too
    assert reopened.admission_refusal("run", 2, 5) is None
    assert reopened.admission_refusal("other-run", 1, 5) is None


def test_releases_without_noise_the_site_can_rely_on_make_its_user_level_epsilon_infinite(tmp_path: Path) -> None:
    state = SiteState.open(tmp_path / "s.json")
    assert state.user_epsilon() == 0.0 and SitePrivacy.of(state, None, False).epsilon == 0.0
    state.sent_masked_input(Release("run", 1, 1, "central", True), SubsampledGaussianEvent(1.0, 1.0), {})
    eps = state.user_epsilon()
    assert 0 < eps < math.inf
    state.sent_masked_input(Release("run", 2, 1, "none", False, "no DP"), None, {})
    assert state.user_epsilon() == math.inf
    report = SitePrivacy.of(SiteState.open(tmp_path / "s.json"), None, False).report()
    assert "∞" in report and "run run round 2 attempt 1 (none): no DP" in report


def test_budget_report_reads_a_site_state_file(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    path = tmp_path / "site.json"
    state = SiteState.open(path)
    state.sent_masked_input(Release("run", 1, 1, "central", True), SubsampledGaussianEvent(1.0, 2.0), {})
    assert main(["budget", "report", str(path)]) == 0
    out = capsys.readouterr().out
    assert "as recorded by the site" in out and "user level" in out
    for run in ("run-a", "run-b"):  # two jobs' DP-SGD steps: the file's figure composes both
        state.trained_with_local_dp(run, 1, SubsampledGaussianEvent(1 / 7, 1.2, 7))
    assert main(["budget", "report", str(path)]) == 0
    out = capsys.readouterr().out
    lifetime = SiteState.open(path).lifetime_local_epsilon()
    assert f"sample level (DP-SGD on one record), every job recorded: ε = {lifetime:.4g}" in out and lifetime > 3.5
    assert SiteState.open(path).local_dp_events("run-a") == [SubsampledGaussianEvent(1 / 7, 1.2, 7)]
    # a live job's report: its own accountant's ε, and the lifetime figure beside it
    one_job = pb.LocalPrivacySpend(epsilon=2.84, delta=1e-5, noise_multiplier=1.2, sample_rate=1 / 7, steps=7)
    live = SitePrivacy.of(SiteState.open(path), one_job, trust_server=False).report()
    assert "this job: ε = 2.84" in live and f"every job recorded: ε = {lifetime:.4g}" in live
    path.write_text(json.dumps({"format": "fedveil.site_state", "version": 99}))
    assert main(["budget", "report", str(path)]) == 2
    assert "error: LEDGER:" in capsys.readouterr().err


def test_no_format_of_a_site_report_shows_a_finite_epsilon_after_an_unprotected_release(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """Review of 2026-12-07: with one protected and one unprotected release, Markdown printed only the
    ledger's finite ε and JSON's federation_epsilon was that figure; the site's true user-level ε is ∞."""
    path = tmp_path / "site.json"
    state = SiteState.open(path)
    state.sent_masked_input(Release("run", 1, 1, "distributed", True), SubsampledGaussianEvent(1.0, 2.0), {})
    state.sent_masked_input(Release("run", 2, 1, "central", False, "the server adds the noise"), None, {})
    protected = state.ledger.epsilon(FEDERATION)
    assert main(["budget", "report", str(path), "--format", "json"]) == 0
    payload = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert payload["federation_epsilon"] is None and payload["federation_epsilon_infinite"] is True
    assert payload["federation_epsilon_protected_releases"] == pytest.approx(protected)
    for extra in (["--format", "markdown"], ["--plot", str(tmp_path / "eps.png")]):
        assert main(["budget", "report", str(path), *extra]) == 0
        out = capsys.readouterr().out
        assert "user level (the site's whole update), 2 release(s) recorded: ε = ∞" in out
        assert "unprotected: run run round 2 attempt 1 (central): the server adds the noise" in out


def test_budget_report_shows_what_a_policys_caps_over_every_job_still_allow(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    path = tmp_path / "site.json"
    state = SiteState.open(path)
    for r in (1, 2):  # two user-level releases and one job's DP-SGD steps
        state.sent_masked_input(Release("run", r, 1, "distributed", True), SubsampledGaussianEvent(1.0, 2.0), {})
    state.trained_with_local_dp("run-a", 1, SubsampledGaussianEvent(1 / 7, 1.2, 7))
    user, sample = state.user_epsilon(), state.lifetime_local_epsilon()
    policy = tmp_path / "policy.toml"
    policy.write_text("[policy]\nmax_user_epsilon = 8\nmax_lifetime_local_epsilon = 5\n")
    assert main(["budget", "report", str(path), "--policy", str(policy)]) == 0
    out = capsys.readouterr().out
    assert f"max_user_epsilon = 8: user-level ε = {user:.4g} at δ = 1e-05, {8 - user:.4g} left" in out
    assert f"max_lifetime_local_epsilon = 5: sample-level (DP-SGD, every job) ε = {sample:.4g}" in out
    assert f"{5 - sample:.4g} left" in out
    assert main(["budget", "report", str(path), "--policy", str(policy), "--format", "markdown"]) == 0
    out = capsys.readouterr().out  # the caps in Markdown too (review of 2026-12-07: --policy was ignored there)
    assert f"- max_user_epsilon = 8: user-level ε = {user:.4g}" in out and f"**caps of {policy}" in out
    assert main(["budget", "report", str(path), "--policy", str(policy), "--format", "json"]) == 0
    caps = json.loads(capsys.readouterr().out.strip().splitlines()[-1])["site_policy_caps"]
    assert caps["max_user_epsilon"]["left"] == pytest.approx(8 - user)
    assert caps["max_lifetime_local_epsilon"]["cap"] == 5
    # the site's own figures, as the text report's first lines
    state.sent_masked_input(Release("run", 3, 1, "none", False, "no DP"), None, {})
    assert main(["budget", "report", str(path), "--format", "json"]) == 0
    site = json.loads(capsys.readouterr().out.strip().splitlines()[-1])["site"]
    assert site["user_epsilon"] is None and site["user_epsilon_infinite"] is True and site["releases"] == 3
    assert site["unprotected_releases"] == ["run run round 3 attempt 1 (none): no DP"]
    assert site["sample_epsilon"] == pytest.approx(sample) and site["sample_epsilon_covers"] == "every job recorded"
    policy.write_text("max_user_epsilon = 0\nmax_lifetime_local_epsilon = 0\n")  # no caps: said so
    assert main(["budget", "report", str(path), "--policy", str(policy)]) == 0
    assert "sets no cap over every job" in capsys.readouterr().out
    # bad input names the option and the setting; a run store or ledger has no site policy
    policy.write_text("max_user_epsilon = -1\n")
    assert main(["budget", "report", str(path), "--policy", str(policy)]) == 2
    # named as the client names it (the two commands used to differ)
    assert f"error: policy.max_user_epsilon in --policy {policy}:" in capsys.readouterr().err
    assert main(["budget", "report", str(path), "--policy", str(tmp_path / "none.toml")]) == 2
    err = capsys.readouterr().err
    assert "error: --policy:" in err and "cannot read" in err
    ledger = tmp_path / "ledger.json"
    ledger.write_text(state.ledger.to_json())
    assert main(["budget", "report", str(ledger), "--policy", str(policy)]) == 2
    assert "error: --policy: only applies to a site's state file" in capsys.readouterr().err


def test_a_corrupt_state_file_is_an_error_naming_the_file(tmp_path: Path) -> None:
    path = tmp_path / "s.json"
    path.write_text("{not json")
    with pytest.raises(SiteStateError, match=r"s\.json"):
        SiteState.open(path)


def test_one_client_process_per_state_file(tmp_path: Path) -> None:
    """Two processes on one state file each kept their own copy: two jobs at ε 2.84 passed a lifetime cap
    of 3.2 and the file kept one of them (review of 2026-12-07). A writer holds the file for its process;
    a second process is refused naming the file, while readers (budget report) and this process may open it."""
    import subprocess
    import sys

    path = tmp_path / "site.json"
    holder = subprocess.Popen(
        [sys.executable, "-c", "import sys, time; from pathlib import Path; "
         "from fedveil.clients.site_state import SiteState; "
         f"SiteState.open(Path({str(path)!r}), exclusive=True); print('held', flush=True); time.sleep(60)"],
        stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout is not None and holder.stdout.readline().strip() == "held"
        with pytest.raises(SiteStateError, match="in use by another client process") as err:
            SiteState.open(path, exclusive=True)
        assert err.value.field == "state" and "site.json" in str(err.value)
        SiteState.open(path)  # a reader
    finally:
        holder.kill()
        holder.wait()
    first = SiteState.open(path, exclusive=True)  # free again once the other process is gone
    first.pin_job("run", 3)
    assert SiteState.open(path, exclusive=True).jobs["run"].total_rounds == 3  # the same process: no second lock


def test_a_site_evaluates_received_models_a_bounded_number_of_times_per_round(tmp_path: Path) -> None:
    state = SiteState.open(tmp_path / "s.json")
    assert state.evaluated("run", 3, 1) is True
    assert state.evaluated("run", 3, 1) is False  # a second attempt of round 3: no second evaluation
    assert state.evaluated("run", 4, 1) is True
    assert SiteState.open(tmp_path / "s.json").evaluated("run", 3, 1) is False  # remembered across restarts


@pytest.mark.parametrize(("graph", "degree", "f", "refused"), [
    ("harary", 30, 0.0, True), ("harary", 30, 0.1, True), ("harary", 30, 1 / 3, False),
    ("complete", 0, 0.0, False), ("harary", 49, 0.1, False),  # k = n − 1 is the complete graph
])
def test_a_site_assuming_few_colluders_stays_out_of_secagg_plus_rounds(graph: str, degree: int, f: float,
                                                                      refused: bool) -> None:
    """The independent attacker split the views of a victim's neighbours on Harary graphs at f = 0
    and f = 0.1 (threat model); a site assuming f < 1/3 joins only complete-graph rounds."""
    from fedveil.clients.admission import check_threshold
    from fedveil.clients.policy import PolicyViolation
    from fedveil.protocol import fedveil_pb2 as pb
    from fedveil.secagg.threshold import cohort_bound, min_threshold

    policy = SitePolicy(authority_public_key=KEY, max_corrupt_fraction=f)
    h, c = cohort_bound(50, degree if graph == "harary" else 0, f)
    start = pb.RoundStart(secagg=pb.SecAggParams(cohort_size=50, graph=graph, degree=degree,
                                                 threshold=min_threshold(h, c), max_corrupt_fraction=f))
    if refused:
        with pytest.raises(PolicyViolation, match=r"below 0\.3333: on a SecAgg\+ \(Harary\) graph") as err:
            check_threshold(policy, start)
        assert err.value.field == "max_corrupt_fraction"
    else:
        assert check_threshold(policy, start) == (h, c)


def test_a_state_file_takes_a_second_job_whose_rounds_start_again_at_one(tmp_path: Path) -> None:
    """A site's ledger spans every job it joins, and the ledger takes each party's rounds in order: a
    second job's round 1 after a first job's round 2 raised ValueError inside the round, for its
    DP-SGD steps and for its releases alike. Each run is now shifted past the ledger's last round."""
    state = SiteState.open(tmp_path / "s.json")
    step = SubsampledGaussianEvent(1 / 7, 1.2, 7)
    for run, rounds in (("job-1", (1, 2)), ("job-2", (1, 2))):
        for r in rounds:
            state.trained_with_local_dp(run, r, step)
            state.sent_masked_input(Release(run, r, 1, "distributed", True), SubsampledGaussianEvent(1.0, 2.0), {})
    reopened = SiteState.open(tmp_path / "s.json")
    assert [len(reopened.local_dp_events(run)) for run in ("job-1", "job-2")] == [2, 2]
    indexes = [(e.party, e.round_index, dict(e.details)["run_id"], dict(e.details)["round"])
               for e in reopened.ledger.entries]
    assert [i for i in indexes if i[0] == "this-site"] == [
        ("this-site", 1, "job-1", 1), ("this-site", 2, "job-1", 2), ("this-site", 3, "job-2", 1),
        ("this-site", 4, "job-2", 2)]
    four = RDPAccountant()
    four.compose(step.with_steps(28))
    assert reopened.lifetime_local_epsilon() == pytest.approx(four.get_epsilon(1e-5), rel=1e-9)
    assert reopened.lifetime_local_epsilon(step) > reopened.lifetime_local_epsilon()


def test_a_bad_state_file_is_a_one_line_error_naming_state(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """Review of 2026-12-07: a garbage, empty or directory --state was a SiteStateError traceback."""
    import base64

    from fedveil.protocol.auth import TOKEN_ID_BYTES, TOKEN_PREFIX, TOKEN_SECRET_BYTES
    from fedveil.tasks.synthetic import task

    x, y = task.synthetic_data(0, 3, 1).tensors
    data = tmp_path / "d.csv"
    data.write_text(task.schema.to_csv(x.numpy(), y.numpy()))
    token = f"{TOKEN_PREFIX}.{'ab' * TOKEN_ID_BYTES}." + base64.urlsafe_b64encode(bytes(TOKEN_SECRET_BYTES)).decode()
    garbage, empty, folder = tmp_path / "g.json", tmp_path / "e.json", tmp_path / "dir"
    garbage.write_text("garbage")
    empty.write_text("")
    folder.mkdir()
    for state in (garbage, empty, folder):
        assert main(["client", "--server", "127.0.0.1:1", "--task", "fedveil.tasks.synthetic", "--data", str(data),
                     "--insecure", "--trust-server", "--token", token, "--state", str(state)]) == 2
        assert capsys.readouterr().err.startswith("error: --state: site state")
    empty_token = tmp_path / "empty.tok"
    empty_token.write_text("\n")
    assert main(["client", "--server", "127.0.0.1:1", "--task", "fedveil.tasks.synthetic", "--data", str(data),
                 "--insecure", "--trust-server", "--token-file", str(empty_token)]) == 2
    assert capsys.readouterr().err.startswith("error: --token-file:")  # never a silent FEDVEIL_TOKEN or none


def test_tls_files_of_the_wrong_kind_are_refused_at_once(tmp_path: Path) -> None:
    """Review of 2026-12-07: a private key given as --ca-cert made the client retry a failing handshake for
    its whole give-up time; now the files are checked for what they must hold before any connection."""
    from fedveil.protocol.tls import TlsConfigError, generate_ca, read_pem

    ca = generate_ca()
    cert, key = tmp_path / "ca.pem", tmp_path / "ca.key"
    ca.write(cert, key)
    assert read_pem(cert, "ca_cert") == ca.cert_pem and read_pem(key, "client_key") == ca.key_pem
    with pytest.raises(TlsConfigError, match="holds no certificate") as err:
        read_pem(key, "ca_cert")
    assert err.value.field == "ca_cert" and "ca.key" in str(err.value)
    with pytest.raises(TlsConfigError, match="holds no private key"):
        read_pem(cert, "tls_key")
