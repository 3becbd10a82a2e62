"""The dashboard's JSON API and static pages over real HTTP (no browser)."""

from __future__ import annotations

import json
import math
import urllib.error
import urllib.request
from typing import Any

import numpy as np
import pytest
import torch

from fedveil.demo import healthcare
from fedveil.demo.data import FEATURE_NAMES, make_split
from fedveil.server.dashboard import RunSettings
from tests.dashboard_helpers import HOSPITALS, TOKEN, call, files_in, raw_exchange, site_csv, upload

torch.set_num_threads(1)
AUTH = f"Authorization: Bearer {TOKEN.value}\r\n"


def test_pages_and_assets_are_served(board: Any) -> None:
    server, _, _ = board
    for path, marker in [("", "Start a run"), ("site.html", "Upload a site"), ("predict.html", "{predict_action}"),
                         ("charts.js", "drawLineChart"), ("app.css", "--accent")]:
        status, text = call(server.url + path)
        assert status == 200 and marker in text, path
    assert call(server.url + "nope.html")[0] == 404
    assert call(server.url + "../pyproject.toml")[0] == 404
    status, st = call(server.url + "api/status")
    assert status == 200 and st["task"] == "healthcare-wdbc" and st["sites"] == list(HOSPITALS)
    assert st["can_start_runs"] is False
    # the pages carry generic words; the task's own come with the status
    assert st["terms"]["record"] == "patient" and st["terms"]["outcome"] == "risk of malignancy"


def test_the_servers_pages_hold_no_domain_wording() -> None:
    """The demo's clinical words come from its task (TaskTerms), never from the server's own pages."""
    from importlib import resources

    from fedveil.task import TaskTerms
    from fedveil.tasks.synthetic import task

    static = resources.files("fedveil.server").joinpath("static")
    for page in static.iterdir():
        text = page.read_text(encoding="utf-8").lower()
        for word in ("patient", "hospital", "malignan", "clinician", "diagnos"):
            assert word not in text, (page.name, word)
    assert task.terms == TaskTerms() and task.terms.record == "record"


def test_good_upload_is_kept_only_in_the_hospitals_directory(board: Any) -> None:
    server, _, dirs = board
    body = site_csv().encode()
    status, res = upload(server.url, "hospital-2", body)
    assert status == 200, res
    assert res["rows"] == 20 and res["features"] == len(FEATURE_NAMES)
    assert (dirs.root / "hospital-2" / "site.csv").read_bytes() == body
    assert files_in(dirs, "hospital-2") == ["site.csv"]
    assert files_in(dirs, "hospital-1") == []
    _, listing = call(server.url + "api/sites")
    by_name = {h["name"]: h for h in listing["sites"]}
    assert by_name["hospital-2"]["has_upload"] and by_name["hospital-2"]["rows"] == 20
    assert not by_name["hospital-1"]["has_upload"]
    assert call(server.url + "api/sites/hospital-2/upload", "DELETE")[1] == {"removed": True}
    assert files_in(dirs, "hospital-2") == []


@pytest.mark.parametrize(
    ("case", "expected"),
    [
        ("missing", "missing columns: worst_symmetry"),
        ("extra", "unexpected columns: favourite_colour"),
        ("wrong_type", "'abc' is not a number"),
        ("empty", "the file is empty"),
        ("header_only", "no data rows"),
        ("not_csv_name", "is not a CSV file"),
        ("binary", "not UTF-8 text"),
        ("too_large", "too large"),
        ("bad_label", "must be 0 or 1"),
        ("float32_overflow", "row 4, column 'mean_area': '1e39' is out of range"),
        ("negative", "row 4, column 'mean_area': '-3' is below the minimum 0"),
        ("implausible", "row 4, column 'mean_area': '3e38' is above the maximum 27400"),
        ("duplicate", "duplicate columns in the header: 'mean_area'"),
        ("trailing_comma", "unexpected columns: (a column with an empty name)"),
    ],
)
def test_bad_uploads_are_refused_with_a_message_and_leave_nothing(board: Any, case: str, expected: str) -> None:
    server, _, dirs = board
    good = site_csv().encode()
    assert upload(server.url, "hospital-1", good)[0] == 200  # an earlier accepted file must survive a bad upload
    lines = site_csv().splitlines()
    header = lines[0].split(",")
    filename = "site.csv"
    if case == "missing":
        keep = [i for i, h in enumerate(header) if h != "worst_symmetry"]
        body = "\n".join(",".join(line.split(",")[i] for i in keep) for line in lines).encode()
    elif case == "extra":
        body = "\n".join([lines[0] + ",favourite_colour"] + [line + ",3" for line in lines[1:]]).encode()
    elif case == "wrong_type":
        cells = lines[3].split(",")
        cells[4] = "abc"
        body = "\n".join([*lines[:3], ",".join(cells), *lines[4:]]).encode()
    elif case == "empty":
        body = b""
    elif case == "header_only":
        body = (lines[0] + "\n").encode()
    elif case == "not_csv_name":
        body, filename = good, "site.xlsx"
    elif case == "binary":
        body = b"\x89PNG\r\n\x1a\n" + bytes(range(256)) * 4
    elif case == "too_large":
        body = (lines[0] + "\n" + "\n".join(lines[1:] * 300)).encode()
        assert len(body) > dirs.max_bytes
    elif case in ("float32_overflow", "negative", "implausible"):
        cells = lines[3].split(",")
        cells[header.index("mean_area")] = {"float32_overflow": "1e39", "negative": "-3", "implausible": "3e38"}[case]
        body = "\n".join([*lines[:3], ",".join(cells), *lines[4:]]).encode()
    elif case == "duplicate":
        body = "\n".join([lines[0] + ",mean_area"] + [line + ",1" for line in lines[1:]]).encode()
    elif case == "trailing_comma":
        body = "\n".join([lines[0] + ","] + [line + "," for line in lines[1:]]).encode()
    else:  # bad_label
        cells = lines[2].split(",")
        cells[-1] = "2"
        body = "\n".join([*lines[:2], ",".join(cells), *lines[3:]]).encode()
    status, res = upload(server.url, "hospital-1", body, filename)
    assert status in (400, 413), res
    assert expected in res["error"], res["error"]
    assert (status == 413) == (case == "too_large")
    assert files_in(dirs, "hospital-1") == ["site.csv"]
    assert (dirs.root / "hospital-1" / "site.csv").read_bytes() == good


def test_upload_to_unknown_hospital_is_404(board: Any) -> None:
    server, _, dirs = board
    status, res = upload(server.url, "hospital-9", site_csv().encode())
    assert status == 404 and "unknown site" in res["error"]
    status, _ = upload(server.url, "..", site_csv().encode())
    assert status == 404
    assert not (dirs.root / "hospital-9").exists()


def test_prediction_uses_the_current_model_and_explains_it(board: Any) -> None:
    server, runs, _ = board
    split = make_split(5, 0)
    patient = dict(zip(FEATURE_NAMES, split.test.features[0].tolist(), strict=True))
    status, res = call(server.url + "api/predict", "POST", json.dumps({"features": patient}).encode())
    assert status == 503 and "no global model" in res["error"]
    model = healthcare.build_model()
    with torch.no_grad():
        model.linear.weight.copy_(torch.linspace(-2, 3, len(FEATURE_NAMES)).reshape(1, -1))
        model.linear.bias.fill_(-0.5)
    runs.set_model(model.state_dict())
    status, res = call(server.url + "api/predict", "POST", json.dumps({"features": patient}).encode())
    assert status == 200, res
    x = torch.from_numpy(split.test.features[:1])
    with torch.no_grad():
        expected = float(torch.sigmoid(model(x))[0])
    assert math.isclose(res["probability"], expected, rel_tol=1e-5)
    assert res["risk_level"] in ("low", "moderate", "high", "very high") and res["confidence"]
    top = res["top_features"]
    assert len(top) == 5
    mags = [abs(f["contribution"]) for f in top]
    assert mags == sorted(mags, reverse=True)
    assert all(f["direction"] == ("raises risk" if f["contribution"] > 0 else "lowers risk") for f in top)
    # exact decomposition: bias + all contributions = logit
    full = healthcare.assess(model, split.test.features[0])
    total = full.baseline_logit + sum(c.contribution for c in full.contributions)
    assert math.isclose(total, res["logit"], abs_tol=1e-4)
    bad = dict(patient, mean_radius="wide")
    status, res = call(server.url + "api/predict", "POST", json.dumps({"features": bad}).encode())
    assert status == 400 and "mean_radius" in res["error"]
    missing = {k: v for k, v in patient.items() if k != "worst_area"}
    status, res = call(server.url + "api/predict", "POST", json.dumps({"features": missing}).encode())
    assert status == 400 and "worst_area" in res["error"]
    status, res = call(server.url + "api/predict", "POST", b"{not json")
    assert status == 400 and "not valid JSON" in res["error"]


def test_runs_are_listed_with_their_rounds(board: Any) -> None:
    server, runs, _ = board
    rid = runs.begin_run({"rounds": 2, "dp": "local"}, HOSPITALS, epsilon_budget=3.0, delta=1e-5)
    runs.add_round(rid, {"round": 1, "accuracy": 0.9, "auc": 0.95, "loss": 0.3, "participants": ["hospital-1"],
                         "dropped": ["hospital-2"], "epsilon_sample": {"hospital-1": 1.2, "hospital-2": float("nan")},
                         "epsilon_sample_max": 1.2, "epsilon_user": None, "budget_remaining": {"hospital-1": 1.8}})
    _, listing = call(server.url + "api/runs")
    assert [r["id"] for r in listing["runs"]] == [rid]
    assert listing["runs"][0]["rounds_done"] == 1 and listing["runs"][0]["status"] == "running"
    status, run = call(server.url + f"api/runs/{rid}")
    assert status == 200 and run["rounds"][0]["dropped"] == ["hospital-2"]
    assert run["rounds"][0]["epsilon_sample"]["hospital-2"] is None  # NaN is not JSON
    assert call(server.url + "api/runs/nope")[0] == 404
    status, res = call(server.url + "api/runs", "POST", json.dumps({"rounds": 2}).encode())
    assert status == 409 and "cannot start runs" in res["error"]


@pytest.mark.parametrize(
    ("payload", "field"),
    [({"rounds": 0}, "rounds"), ({"rounds": "ten"}, "rounds"), ({"sites_per_round": 9}, "sites_per_round"),
     ({"sites_per_round": 1}, "sites_per_round"),
     ({"dp": "magic"}, "dp"), ({"epsilon_budget": -1}, "epsilon_budget"), ({"colour": 1}, "colour"),
     ({"rounds": 2.5}, "rounds")],
)
def test_run_settings_are_validated(payload: dict[str, Any], field: str) -> None:
    from fedveil.server.dashboard import DashboardError

    with pytest.raises(DashboardError, match=field):
        RunSettings.from_json(payload, max_sites=5)
    good = {"rounds": 3, "sites_per_round": 2, "dp": "none", "epsilon_budget": 1}
    ok = RunSettings.from_json(good, max_sites=5)
    assert (ok.rounds, ok.sites_per_round, ok.dp, ok.epsilon_budget) == (3, 2, "none", 1.0)
    assert np.isfinite(ok.epsilon_budget)


def test_cross_site_and_rebinding_requests_are_refused(board: Any) -> None:
    server, _, dirs = board
    body = site_csv().encode()
    req = urllib.request.Request(f"{server.url}api/sites/hospital-1/upload?filename=a.csv", data=body,
                                 method="POST", headers={"Content-Type": "text/csv",
                                                         "Authorization": f"Bearer {TOKEN.value}"})
    with pytest.raises(urllib.error.HTTPError) as err:
        urllib.request.urlopen(req, timeout=5)
    assert err.value.code == 403 and "X-Fedveil-Request" in json.loads(err.value.read())["error"]
    assert files_in(dirs, "hospital-1") == []
    req = urllib.request.Request(f"{server.url}api/status", headers={"Host": "evil.example:80",
                                                                     "Authorization": f"Bearer {TOKEN.value}"})
    with pytest.raises(urllib.error.HTTPError) as err:
        urllib.request.urlopen(req, timeout=5)
    assert err.value.code == 403


def test_generic_explanation_is_gradient_times_input() -> None:
    from fedveil.server.dashboard import gradient_times_input

    class Linear(torch.nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.lin = torch.nn.Linear(4, 1)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return self.lin(x).squeeze(-1)

    model = Linear()
    with torch.no_grad():
        model.lin.weight.copy_(torch.tensor([[1.0, -3.0, 0.5, 2.0]]))
        model.lin.bias.fill_(-1.0)
    x = np.array([2.0, 1.0, 4.0, -0.25], dtype=np.float32)
    res = gradient_times_input(model, x, ["a", "b", "c", "d"])
    # for a linear model gradient × input is exactly w_j x_j
    assert [(f["feature"], f["contribution"]) for f in res["top_features"]] == [
        ("b", -3.0), ("a", 2.0), ("c", 2.0), ("d", -0.5)]
    assert math.isclose(res["logit"], -1.0 + 2.0 - 3.0 + 2.0 - 0.5)
    assert res["top_features"][0]["direction"] == "lowers risk" and "approximations" in res["confidence"]


@pytest.mark.parametrize("refusal", ["no_header", "foreign_host", "unknown_hospital"])
def test_a_refused_request_cannot_smuggle_another_in_its_body(board: Any, refusal: str) -> None:
    """A refused request's unread body must not be parsed as the next request on the connection."""
    server, _, dirs = board
    good = site_csv().encode()
    assert upload(server.url, "hospital-1", good)[0] == 200
    port = server.port
    smuggled = (f"DELETE /api/sites/hospital-1/upload HTTP/1.1\r\nHost: 127.0.0.1:{port}\r\n{AUTH}"
                "X-Fedveil-Request: 1\r\nContent-Length: 0\r\n\r\n").encode()
    host = "evil.example" if refusal == "foreign_host" else f"127.0.0.1:{port}"
    header = "" if refusal == "no_header" else "X-Fedveil-Request: 1\r\n"
    target = "hospital-9" if refusal == "unknown_hospital" else "hospital-1"
    outer = (f"POST /api/sites/{target}/upload?filename=a.csv HTTP/1.1\r\nHost: {host}\r\n{AUTH}{header}"
             f"Content-Type: text/csv\r\nContent-Length: {len(smuggled)}\r\n\r\n").encode() + smuggled
    reply = raw_exchange(server.url, outer)
    assert reply.count(b"HTTP/1.1 ") == 1, reply  # one answer (the refusal), then the connection closes
    assert reply.startswith((b"HTTP/1.1 403", b"HTTP/1.1 404")) and b"connection: close" in reply.lower()
    assert (dirs.root / "hospital-1" / "site.csv").read_bytes() == good  # the smuggled DELETE never ran


def test_keep_alive_still_serves_several_plain_gets_on_one_connection(board: Any) -> None:
    server, _, _ = board
    one = f"GET /api/status HTTP/1.1\r\nHost: 127.0.0.1:{server.port}\r\n{AUTH}\r\n".encode()
    last = f"GET /api/schema HTTP/1.1\r\nHost: 127.0.0.1:{server.port}\r\n{AUTH}Connection: close\r\n\r\n".encode()
    reply = raw_exchange(server.url, one + one + last)
    assert reply.count(b"HTTP/1.1 200") == 3


def test_other_methods_chunked_bodies_and_head_get_json_answers(board: Any) -> None:
    server, _, _ = board
    for method in ("PUT", "PATCH", "OPTIONS"):
        status, res = call(server.url + "api/predict", method, b"{}")
        assert status == 405 and f"method {method} is not supported" in res["error"]
    req = urllib.request.Request(server.url + "api/status", method="HEAD",
                                 headers={"Authorization": f"Bearer {TOKEN.value}"})
    with urllib.request.urlopen(req, timeout=10) as resp:
        assert resp.status == 200 and resp.read() == b"" and "json" in resp.headers["Content-Type"]
    chunked = (f"POST /api/runs HTTP/1.1\r\nHost: 127.0.0.1:{server.port}\r\n{AUTH}X-Fedveil-Request: 1\r\n"
               "Transfer-Encoding: chunked\r\n\r\n2\r\n{}\r\n0\r\n\r\n").encode()
    reply = raw_exchange(server.url, chunked)
    assert reply.startswith(b"HTTP/1.1 411") and reply.count(b"HTTP/1.1 ") == 1 and b"chunked" in reply


@pytest.mark.parametrize(
    ("body", "field"),
    [
        ('{"rounds": Infinity}', "rounds"),
        ('{"rounds": 1e400}', "rounds"),
        ('{"epsilon_budget": 1' + "0" * 400 + "}", "epsilon_budget"),
        ('{"rounds": 1' + "0" * 400 + "}", "rounds"),
        ('{"epsilon_budget": true}', "epsilon_budget"),
    ],
)
def test_absurd_numbers_in_run_settings_name_the_field(body: str, field: str) -> None:
    from fedveil.server.dashboard import DashboardError

    with pytest.raises(DashboardError, match=f"^{field}: ") as info:
        RunSettings.from_json(json.loads(body), max_sites=5)
    assert len(str(info.value)) < 120  # a 400-digit value is not echoed back


def test_a_json_integer_beyond_pythons_digit_limit_is_a_400(board: Any) -> None:
    server, _, _ = board
    status, res = call(server.url + "api/predict", "POST", b'{"features": {"mean_area": 1' + b"0" * 5000 + b"}}")
    assert status == 400 and "not valid JSON" in res["error"]


@pytest.mark.parametrize(
    ("value", "words"),
    [(1e39, "out of range"), ("1e39", "out of range"), (-1.0, "below the minimum 0"), (True, "not a number"),
     (3e38, "above the maximum"),
     ("1_000", "not a number"), (10**400, "out of range")],
)
def test_predict_refuses_values_the_model_cannot_take(board: Any, value: Any, words: str) -> None:
    server, runs, _ = board
    runs.set_model(healthcare.build_model().state_dict())
    patient = dict(zip(FEATURE_NAMES, make_split(5, 0).test.features[0].tolist(), strict=True))
    body = json.dumps({"features": {**patient, "mean_area": value}}).encode()
    status, res = call(server.url + "api/predict", "POST", body)
    assert status == 400 and "mean_area" in res["error"] and words in res["error"], res


@pytest.mark.parametrize(("body", "field"), [
    (b'{"rounds": 0}', "rounds"), (b'{"dp": "loud"}', "dp"), (b'{"bogus": 1}', "bogus"),
    (b'{"epsilon_budget": "x"}', "epsilon_budget"),
    # a JSON boolean or string is not a number of rounds, sites or an ε budget (lax parsing took true as 1)
    (b'{"rounds": true}', "rounds"), (b'{"sites_per_round": true}', "sites_per_round"),
    (b'{"epsilon_budget": true}', "epsilon_budget"), (b'{"rounds": "3"}', "rounds"),
    (b'{"epsilon_budget": "3"}', "epsilon_budget")])
def test_a_bad_run_setting_over_http_is_a_400_naming_the_field(board: Any, body: bytes, field: str) -> None:
    server, _, _ = board
    status, res = call(server.url + "api/runs", "POST", body)
    assert status == 400 and res["error"].startswith(f"{field}: "), res
    assert set(res) == {"error"}
