"""The SQLite run store: enrolment, runs, rounds, dropouts, checkpoints and the ledger survive a reopen."""

from __future__ import annotations

import sqlite3
from pathlib import Path

import numpy as np
import pytest

from fedveil.commands.common import USAGE_EXIT_CODE
from fedveil.dp.accounting import SubsampledGaussianEvent
from fedveil.dp.ledger import LedgerConfig, PrivacyLedger
from fedveil.protocol.auth import Authenticator, parse_token, secret_digest
from fedveil.protocol.errors import Unauthenticated
from fedveil.server.store import EnrollmentError, RunStore, StoreError, load_ledger


def test_enrolment_stores_only_a_digest_and_authenticates(tmp_path: Path) -> None:
    path = tmp_path / "run.db"
    with RunStore(path) as store:
        issued = store.enroll("hospital-a")
        other = store.enroll("hospital-b")
        auth = Authenticator(store.credential, client_exists=store.client_enrolled)
        assert auth.authenticate(issued.token) == "hospital-a"
        assert auth.authenticate(other.token) == "hospital-b"
        assert "redacted" in repr(issued) and issued.token not in repr(issued)
    # The secret never reaches the file (nor the WAL); its SHA-256 digest does.
    _, secret = parse_token(issued.token)
    raw = b"".join(p.read_bytes() for p in tmp_path.iterdir())
    assert secret not in raw and issued.token.encode() not in raw
    conn = sqlite3.connect(path)
    (digest,) = conn.execute("SELECT digest FROM tokens WHERE client_name='hospital-a'").fetchone()
    conn.close()
    assert bytes(digest) == secret_digest(secret)


def test_wrong_revoked_and_rotated_tokens_are_refused(tmp_path: Path) -> None:
    with RunStore(tmp_path / "run.db") as store:
        issued = store.enroll("site1")
        auth = Authenticator(store.credential, client_exists=store.client_enrolled)
        forged = issued.token[:-4] + ("AAAA" if not issued.token.endswith("AAAA") else "BBBB")
        with pytest.raises(Unauthenticated, match="unknown or wrong token"):
            auth.authenticate(forged)
        with pytest.raises(Unauthenticated, match="malformed token"):
            auth.authenticate("not-a-token")
        with pytest.raises(Unauthenticated, match="no credentials"):
            auth.authenticate(None)
        with pytest.raises(EnrollmentError, match="already enrolled"):
            store.enroll("site1")
        rotated = store.enroll("site1", rotate=True)
        assert auth.authenticate(rotated.token) == "site1"
        with pytest.raises(Unauthenticated, match="revoked"):
            auth.authenticate(issued.token)
        store.revoke("site1")
        with pytest.raises(Unauthenticated, match="revoked"):
            auth.authenticate(rotated.token)
        assert not store.client_enrolled("site1")
        with pytest.raises(EnrollmentError, match="must be 1-64 characters"):
            store.enroll("bad name!")
        # a certificate name must be an enrolled, unrevoked client
        store.enroll("site2")
        assert auth.authenticate(None, certificate_name="site2") == "site2"
        with pytest.raises(Unauthenticated, match="not enrolled"):
            auth.authenticate(None, certificate_name="site1")


@pytest.mark.slow
def test_run_history_round_trips_through_a_reopen(tmp_path: Path) -> None:
    path = tmp_path / "run.db"
    model0 = np.arange(5, dtype=np.float32)
    model1 = model0 + 0.5
    agg = np.full(5, 0.5, dtype=np.float32)
    ledger = PrivacyLedger(LedgerConfig(federation_delta=1e-5))
    ledger.reserve(1, federation=SubsampledGaussianEvent(0.5, 1.1), mechanism="dp-fedavg")
    with RunStore(path) as store:
        store.create_run("run-1", {"rounds": 3, "task": "t"})
        store.save_initial_checkpoint("run-1", model0, {"version": 0})
        store.start_round("run-1", 1, 1, {"a": 0, "b": 1, "c": 2}, threshold=2)
        store.record_stage("run-1", 1, 1, ["a", "b"], "training")
        store.record_dropouts("run-1", 1, 1, {"c": ("training", "missed the stage deadline")})
        store.abort_round("run-1", 1, 1, "only 1 clients completed", 1)
        store.start_round("run-1", 1, 2, {"a": 0, "b": 1}, threshold=2)
        store.complete_round("run-1", 1, 2, survivors=2, aggregate=agg, aggregate_digest="ab" * 32, model=model1,
                             state={"version": 1, "optimizer": {"name": "fedavg"}}, ledger_json=ledger.to_json(),
                             stats={"update_norm": 1.0})
        store.start_round("run-1", 2, 1, {"a": 0, "b": 1}, threshold=2)  # left running: a crash
        store.record_evaluation("run-1", 1, "a", 10, {"loss": 0.5, "accuracy": 0.75})
    with RunStore(path) as store:
        (run,) = store.runs()
        assert run.run_id == "run-1" and run.status == "running" and run.config == {"rounds": 3, "task": "t"}
        assert store.interrupt_unfinished_rounds("run-1") == 1
        rounds = store.rounds("run-1")
        assert [(r.round, r.attempt, r.status) for r in rounds] == [
            (1, 1, "aborted"), (1, 2, "completed"), (2, 1, "interrupted")]
        assert rounds[1].survivors == 2 and rounds[1].aggregate_sha256 == "ab" * 32 and rounds[1].threshold == 2
        assert store.completed_rounds("run-1") == 1
        ckpt = store.latest_checkpoint("run-1")
        assert ckpt is not None and ckpt.version == 1
        np.testing.assert_array_equal(ckpt.model, model1)
        assert ckpt.state["optimizer"] == {"name": "fedavg"}
        np.testing.assert_array_equal(store.aggregate("run-1", 1), agg)
        assert store.dropouts("run-1") == [(1, 1, "c", "training", "missed the stage deadline")]
        assert [p[1:] for p in store.participants("run-1", 1)] == [
            ("a", 0, "training"), ("b", 1, "training"), ("c", 2, None), ("a", 0, None), ("b", 1, None)]
        assert store.evaluations("run-1", 1) == [("a", 10, {"accuracy": 0.75, "loss": 0.5})]
        store.finish_run("run-1", "completed", {"completed_rounds": 1})
        assert store.run("run-1").status == "completed"  # type: ignore[union-attr]
    loaded = load_ledger(path)
    assert loaded.epsilon() == pytest.approx(ledger.epsilon())
    assert loaded.rounds == [1]


def test_completing_a_round_twice_changes_nothing(tmp_path: Path) -> None:
    with RunStore(tmp_path / "run.db") as store:
        store.create_run("r", {})
        store.start_round("r", 1, 1, {"a": 0, "b": 1}, threshold=2)
        kw = dict(survivors=2, aggregate=np.zeros(3, np.float32), aggregate_digest="0" * 64,
                  model=np.ones(3, np.float32), state={"version": 1}, ledger_json=None, stats={})
        store.complete_round("r", 1, 1, **kw)  # type: ignore[arg-type]
        with pytest.raises((StoreError, sqlite3.IntegrityError)):
            store.complete_round("r", 1, 1, **kw)  # type: ignore[arg-type]
        assert store.completed_rounds("r") == 1


def test_a_release_mark_survives_a_reopen_with_its_ledger_and_only_on_a_running_attempt(tmp_path: Path) -> None:
    ledger = PrivacyLedger(LedgerConfig(federation_delta=1e-5))
    ledger.reserve(1, federation=SubsampledGaussianEvent(0.5, 1.1), mechanism="dp-fedavg")
    with RunStore(tmp_path / "run.db") as store:
        store.create_run("r", {})
        store.start_round("r", 1, 1, {"a": 0, "b": 1}, threshold=2)
        store.abort_round("r", 1, 1, "too few", 1)
        with pytest.raises(StoreError, match="round 1 attempt 1 of run r is not running"):
            store.mark_release("r", 1, 1, "masked-input", None)
        store.start_round("r", 1, 2, {"a": 0, "b": 1}, threshold=2)
        assert store.released_unfinished_rounds("r") == []  # running, not yet released
        store.mark_release("r", 1, 2, "masked-input", ledger.to_json())
    with RunStore(tmp_path / "run.db") as store:  # what a killed server leaves
        assert store.released_unfinished_rounds("r") == [(1, 2, 2)]
        assert load_ledger(tmp_path / "run.db").rounds == [1]
        store.interrupt_unfinished_rounds("r")
        assert store.released_unfinished_rounds("r") == []


def test_bad_store_paths_are_refused(tmp_path: Path) -> None:
    not_db = tmp_path / "notes.txt"
    not_db.write_text("hello, this is not a database at all" * 10)
    with pytest.raises(StoreError, match="not a fedveil run store"):
        RunStore(not_db)
    with pytest.raises(StoreError, match="is a directory"):
        RunStore(tmp_path)
    with pytest.raises(StoreError, match="does not exist"):
        RunStore(tmp_path / "missing" / "run.db")
    with pytest.raises(StoreError, match="not a fedveil run store"):
        load_ledger(not_db)
    with RunStore(tmp_path / "empty.db"):
        pass
    with pytest.raises(StoreError, match="has no runs"):
        load_ledger(tmp_path / "empty.db")


def test_enroll_command_prints_the_token_last(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    from fedveil.cli import main

    store = tmp_path / "run.db"
    assert main(["enroll", "--store", str(store), "--name", "clinic-7"]) == 0
    token = capsys.readouterr().out.strip().splitlines()[-1]
    with RunStore(store) as s:
        assert Authenticator(s.credential).authenticate(token) == "clinic-7"
    assert main(["enroll", "--store", str(store), "--name", "clinic-7"]) == USAGE_EXIT_CODE
    err = capsys.readouterr().err.strip().splitlines()
    assert err == ["error: --name: client 'clinic-7' is already enrolled (use --rotate to issue a new token)"]
    assert main(["enroll", "--store", str(tmp_path / "nowhere" / "x.db"), "--name", "a"]) == USAGE_EXIT_CODE
    assert capsys.readouterr().err.startswith("error: --store:")
    assert main(["enroll", "--store", str(store), "--name", "clinic-7", "--revoke"]) == 0
    capsys.readouterr()
    with RunStore(store) as s, pytest.raises(Unauthenticated, match="revoked"):
        Authenticator(s.credential).authenticate(token)
    assert main(["enroll", "--store", str(store), "--name", "nobody", "--revoke"]) == USAGE_EXIT_CODE
    assert capsys.readouterr().err.strip() == "error: --name: client 'nobody' is not enrolled"
    # review of 2026-12-07: keys every loader refuses were enrolled, and an empty file became a store
    for key in ("01" + "00" * 31, "00" * 32):  # small order: anyone could sign under them
        assert main(["enroll", "--store", str(store), "--name", "k", "--identity-public-key", key]) == USAGE_EXIT_CODE
        assert capsys.readouterr().err.startswith("error: --identity-public-key: identity public key is a point")
    empty = tmp_path / "empty.json"
    empty.write_text("")
    assert main(["enroll", "--store", str(empty), "--name", "q"]) == USAGE_EXIT_CODE
    assert "is an empty file, not a fedveil run store" in capsys.readouterr().err and empty.read_text() == ""


def test_checkpoint_state_keeps_arrays_as_raw_bytes(tmp_path: Path) -> None:
    from fedveil.server.store import pack_state, unpack_state

    m = np.linspace(-1, 1, 1000)
    state = {"version": 3, "optimizer": {"name": "fedadam", "m": m, "v": m**2, "steps": 3, "beta1": 0.9},
             "adaptive_clipping": {"clip_norm": 0.5}, "ints": np.arange(4, dtype=np.int32)}
    text, blob = pack_state(state)
    assert blob is not None and len(blob) == 2 * 8000 + 16 and len(text) < 600
    back = unpack_state(text, blob)
    np.testing.assert_array_equal(back["optimizer"]["m"], m)
    np.testing.assert_array_equal(back["optimizer"]["v"], m**2)
    assert back["ints"].dtype == np.int32 and back["optimizer"]["steps"] == 3
    assert back["adaptive_clipping"] == {"clip_norm": 0.5}
    with pytest.raises(ValueError, match="outside"):
        unpack_state(text, blob[:100])
    with RunStore(tmp_path / "run.db") as store:
        store.create_run("r", {})
        store.save_initial_checkpoint("r", np.zeros(3, np.float32), state)
        ckpt = store.latest_checkpoint("r")
        assert ckpt is not None
        np.testing.assert_array_equal(ckpt.state["optimizer"]["m"], m)


def test_convictions_survive_a_reopen_per_run_and_keep_the_first_reason(tmp_path: Path) -> None:
    path = tmp_path / "run.db"
    with RunStore(path) as store:
        store.create_run("run-1", {})
        store.create_run("run-2", {})
        store.record_conviction("run-1", "evil", "round 1: its share box did not open")
        store.record_conviction("run-1", "evil", "round 2: again")
        store.record_conviction("run-1", "liar", "round 2: a false complaint")
    with RunStore(path) as store:
        assert store.convictions("run-1") == {"evil": "round 1: its share box did not open",
                                              "liar": "round 2: a false complaint"}
        assert store.convictions("run-2") == {}


def test_credential_bars_survive_a_reopen_per_run_and_a_later_bar_replaces_the_entry(tmp_path: Path) -> None:
    path = tmp_path / "run.db"
    with RunStore(path) as store:
        store.create_run("run-1", {})
        store.create_run("run-2", {})
        store.record_credential_bar("run-1", "evil", b"\x01" * 32, "declined by 3 of 4 in round 1")
        store.record_credential_bar("run-1", "other", b"\x02" * 32, "declined by 3 of 4 in round 1")
        # evil joined again with a new credential, and that one was refused too
        store.record_credential_bar("run-1", "evil", b"\x03" * 32, "declined by 3 of 4 in round 4")
    with RunStore(path) as store:
        assert store.credential_bars("run-1") == {"evil": (b"\x03" * 32, "declined by 3 of 4 in round 4"),
                                                  "other": (b"\x02" * 32, "declined by 3 of 4 in round 1")}
        assert store.credential_bars("run-2") == {}


@pytest.mark.parametrize("table", ["convictions", "credential_bars"])
def test_a_store_written_before_a_table_opens_and_gains_it(tmp_path: Path, table: str) -> None:
    path = tmp_path / "old.db"
    with RunStore(path) as store:
        store.create_run("run-1", {})
    conn = sqlite3.connect(str(path))
    conn.execute(f"DROP TABLE {table}")  # as the build before it wrote the store
    conn.commit()
    conn.close()
    with RunStore(path) as store:
        assert store.convictions("run-1") == {} and store.credential_bars("run-1") == {}
        assert store.runs()[0].run_id == "run-1"


def test_a_store_missing_a_column_is_refused_up_front_naming_table_and_column(tmp_path: Path) -> None:
    path = tmp_path / "old.db"
    with RunStore(path):
        pass
    conn = sqlite3.connect(str(path))
    conn.execute("ALTER TABLE checkpoints DROP COLUMN state_arrays")  # as an earlier build wrote it
    conn.commit()
    conn.close()
    with pytest.raises(StoreError, match=r"table 'checkpoints' lacks column\(s\) state_arrays"):
        RunStore(path)
    assert "state_arrays" not in {r[1] for r in sqlite3.connect(str(path)).execute("PRAGMA table_info(checkpoints)")}


def test_the_demo_refuses_an_old_store_in_out_before_training(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    from fedveil.cli import main

    with RunStore(tmp_path / "runs.sqlite"):
        pass
    conn = sqlite3.connect(str(tmp_path / "runs.sqlite"))
    conn.execute("ALTER TABLE checkpoints DROP COLUMN state_arrays")
    conn.commit()
    conn.close()
    assert main(["demo", "healthcare", "--in-process", "--rounds", "1", "--out", str(tmp_path)]) == USAGE_EXIT_CODE
    err = capsys.readouterr().err
    assert "--out" in err and "state_arrays" in err and "Traceback" not in err
    assert not (tmp_path / "report.json").exists()


def test_rotating_a_client_that_is_not_enrolled_is_refused(tmp_path: Path) -> None:
    with RunStore(tmp_path / "run.db") as store:
        with pytest.raises(EnrollmentError, match="'nobody' is not enrolled"):
            store.enroll("nobody", rotate=True)
        assert not store.client_enrolled("nobody")


def test_the_config_bit_limit_matches_the_distributed_mechanism() -> None:
    from fedveil.dp.distributed import MAX_BITS
    from fedveil.server.config import DISTRIBUTED_MAX_BITS

    assert DISTRIBUTED_MAX_BITS == MAX_BITS


def test_the_config_collusion_default_matches_the_secagg_rule() -> None:
    from fedveil.secagg.threshold import DEFAULT_MAX_CORRUPT_FRACTION as SECAGG_DEFAULT
    from fedveil.server.config import DEFAULT_MAX_CORRUPT_FRACTION

    assert DEFAULT_MAX_CORRUPT_FRACTION == SECAGG_DEFAULT
