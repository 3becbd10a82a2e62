"""Enrolled sites: tokens (digests only), identity keys, revocation, and what sites report of their own privacy."""

from __future__ import annotations

import json
import time
from collections.abc import Mapping
from typing import Any

from fedveil.protocol.auth import Credential, IssuedToken, issue_token
from fedveil.secagg.keys import ed25519_public_key_problem
from fedveil.server.store.schema import (
    _UPSERT_CLIENT_PRIVACY,
    _UPSERT_EVALUATION,
    _UPSERT_LEDGER,
    NAME_PATTERN,
    EnrollmentError,
    StoreBase,
)


class SitesMixin(StoreBase):
    """Enrolled sites: tokens (digests only), identity keys, revocation, and what sites report of their own privacy."""

    # -- enrolment -----------------------------------------------------------------------------
    def enroll(self, name: str, *, rotate: bool = False, identity_public_key: bytes | None = None) -> IssuedToken:
        """Enrol ``name`` and issue its token. With ``rotate`` an enrolled client gets a new token
        and its old tokens are revoked."""
        if not NAME_PATTERN.match(name):
            raise EnrollmentError(
                f"client name {name!r} must be 1-64 characters of letters, digits, '.', '_' or '-', "
                "starting with a letter or digit"
            )
        if identity_public_key is not None and len(identity_public_key) != 32:
            raise EnrollmentError(f"identity public key must be 32 bytes (got {len(identity_public_key)})")
        problem = ed25519_public_key_problem(identity_public_key) if identity_public_key is not None else None
        if problem is not None:  # as the authority and every loader refuse it
            raise EnrollmentError(f"identity public key {problem}", field="identity_public_key")
        issued = issue_token()
        now = time.time()
        with self._tx() as c:
            row = c.execute("SELECT revoked FROM clients WHERE name=?", (name,)).fetchone()
            if row is not None and not rotate:
                raise EnrollmentError(f"client {name!r} is already enrolled (use --rotate to issue a new token)")
            if row is None and rotate:  # a typo must not create a new identity and leave the old token valid
                raise EnrollmentError(f"client {name!r} is not enrolled, so it has no token to rotate")
            if row is None:
                c.execute(
                    "INSERT INTO clients (name, created_at, revoked, identity_public_key) VALUES (?, ?, 0, ?)",
                    (name, now, identity_public_key),
                )
            else:
                c.execute("UPDATE tokens SET revoked=1 WHERE client_name=?", (name,))
                c.execute("UPDATE clients SET revoked=0 WHERE name=?", (name,))
                if identity_public_key is not None:
                    c.execute("UPDATE clients SET identity_public_key=? WHERE name=?", (identity_public_key, name))
            c.execute(
                "INSERT INTO tokens (token_id, client_name, digest, created_at, revoked) VALUES (?, ?, ?, ?, 0)",
                (issued.token_id, name, issued.digest, now),
            )
        return issued

    def revoke(self, name: str) -> None:
        with self._tx() as c:
            if c.execute("SELECT 1 FROM clients WHERE name=?", (name,)).fetchone() is None:
                raise EnrollmentError(f"client {name!r} is not enrolled")
            c.execute("UPDATE clients SET revoked=1 WHERE name=?", (name,))
            c.execute("UPDATE tokens SET revoked=1 WHERE client_name=?", (name,))

    def credential(self, token_id: str) -> Credential | None:
        rows = self._query(
            "SELECT t.token_id, t.client_name, t.digest, t.revoked, c.revoked FROM tokens t "
            "JOIN clients c ON c.name = t.client_name WHERE t.token_id=?",
            (token_id,),
        )
        if not rows:
            return None
        tid, name, digest, t_revoked, c_revoked = rows[0]
        return Credential(token_id=tid, client_name=name, digest=bytes(digest), revoked=bool(t_revoked or c_revoked))

    def client_enrolled(self, name: str) -> bool:
        rows = self._query("SELECT revoked FROM clients WHERE name=?", (name,))
        return bool(rows) and not rows[0][0]

    def enrolled_count(self) -> int:
        return int(self._query("SELECT COUNT(*) FROM clients WHERE revoked=0")[0][0])

    def enrolled_clients(self) -> list[str]:
        return [r[0] for r in self._query("SELECT name FROM clients WHERE revoked=0 ORDER BY name")]

    def identity_key(self, name: str) -> bytes | None:
        rows = self._query("SELECT identity_public_key FROM clients WHERE name=?", (name,))
        return bytes(rows[0][0]) if rows and rows[0][0] is not None else None

    def record_client_privacy(
        self, run_id: str, round_number: int, client_name: str, report: Mapping[str, Any]
    ) -> None:
        with self._tx() as c:
            c.execute(_UPSERT_CLIENT_PRIVACY, (run_id, round_number, client_name,
                                               json.dumps(dict(report), sort_keys=True), time.time()))

    def record_client_report(
        self, run_id: str, *, model_version: int, round_number: int, client_name: str, num_examples: int,
        metrics: Mapping[str, float] | None, privacy: Mapping[str, Any] | None, ledger_json: str | None,
    ) -> None:
        """One site's ``ReportMetrics`` in ONE transaction: its metrics (if any), its reported privacy
        spend (if any) and the ledger with that spend recorded (if it was). All or nothing, so a report
        that failed to store can be retried without being counted twice."""
        now = time.time()
        with self._tx() as c:
            if metrics:
                c.execute(_UPSERT_EVALUATION, (run_id, model_version, client_name, num_examples,
                                               json.dumps(dict(metrics), sort_keys=True), now))
            if privacy is not None:
                c.execute(_UPSERT_CLIENT_PRIVACY, (run_id, round_number, client_name,
                                                   json.dumps(dict(privacy), sort_keys=True, allow_nan=False), now))
            if ledger_json is not None:
                c.execute(_UPSERT_LEDGER, (run_id, ledger_json, now))

    def client_privacy(self, run_id: str) -> list[tuple[int, str, dict[str, Any]]]:
        return [
            (int(r), str(n), json.loads(j))
            for r, n, j in self._query(
                "SELECT round, client_name, report_json FROM client_privacy WHERE run_id=? ORDER BY round, client_name",
                (run_id,),
            )
        ]
