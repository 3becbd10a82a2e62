"""The dashboard in headless Chromium (Debian's, never a downloaded browser), end to end.

Starts ``fedveil demo healthcare --dashboard PORT`` as a real process (3 hospitals, 2 rounds,
in-process secure aggregation to keep it quick), then drives the pages: logging in with the URL
the demo printed, the demo's run and its rounds, a good and a bad site upload, a run started from
the browser whose rounds appear, and a clinician's prediction. Screenshots go to ``test-artifacts/``.
"""

from __future__ import annotations

import json
import os
import secrets
import signal
import subprocess
import sys
import time
import urllib.request
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

CHROMIUM = Path("/usr/bin/chromium")
ARTIFACTS = Path(__file__).resolve().parents[1] / "test-artifacts"
CHROMIUM_ARGS = [
    "--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
    "--disable-background-networking", "--disable-component-update", "--disable-sync",
]

pytestmark = [
    pytest.mark.browser,
    pytest.mark.serial,  # a demo process, its run and chromium: on a shared core the run outlasted its wait
    pytest.mark.skipif(not CHROMIUM.exists(), reason="needs Debian's chromium at /usr/bin/chromium (make browser)"),
]


@dataclass(frozen=True)
class Demo:
    url: str
    """The dashboard's base URL (no token)."""
    login_url: str
    """The URL the demo printed, with the login token."""
    token: str
    out: Path


TOKEN = secrets.token_urlsafe(32)


def get_json(url: str) -> Any:
    req = urllib.request.Request(url, headers={"Authorization": f"Bearer {TOKEN}"})
    with urllib.request.urlopen(req, timeout=5) as resp:
        return json.loads(resp.read())


def wait_for(predicate: Any, timeout: float, what: str) -> Any:
    deadline = time.monotonic() + timeout
    last: Any = None
    while time.monotonic() < deadline:
        try:
            last = predicate()
            if last:
                return last
        except OSError:
            pass
        time.sleep(0.3)
    raise AssertionError(f"timed out waiting for {what} (last: {last!r})")


@pytest.fixture(scope="module")
def demo(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Demo]:
    from fedveil.simulation.processes import free_port

    out = tmp_path_factory.mktemp("demo")
    port = free_port()
    token_file = out / "dashboard.token"
    token_file.write_text(TOKEN + "\n")  # scripted use: the operator supplies the token
    log = open(out / "demo.log", "w")
    proc = subprocess.Popen(
        [sys.executable, "-m", "fedveil.cli", "demo", "healthcare", "--hospitals", "3", "--rounds", "2",
         "--dropout", "0", "--in-process", "--dashboard", str(port), "--dashboard-token-file", str(token_file),
         "--out", str(out / "run")],
        stdout=log, stderr=subprocess.STDOUT, env={**os.environ, "PYTHONUNBUFFERED": "1"},
    )
    url = f"http://127.0.0.1:{port}/"
    try:
        wait_for(lambda: proc.poll() is None and get_json(url + "api/status"), 120, "the dashboard to answer")
        printed = [line for line in (out / "demo.log").read_text().splitlines() if TOKEN in line]
        assert printed == [f"dashboard {url}?token={TOKEN}"], printed  # printed once, as the login URL
        yield Demo(url, f"{url}?token={TOKEN}", TOKEN, out / "run")
    finally:
        proc.send_signal(signal.SIGINT)
        try:
            proc.wait(timeout=20)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
        log.close()


@pytest.fixture(scope="module")
def trained(demo: Demo) -> Demo:
    """The demo once its own run has completed, so a global model exists and no run is in progress.

    Tests that need a model (or need to start a run) take this, so each passes alone as well as in file order.
    """
    wait_for(lambda: any(r["status"] == "completed" for r in get_json(demo.url + "api/runs")["runs"])
             and get_json(demo.url + "api/status")["has_model"], 180, "the demo run's global model")
    return demo


@pytest.fixture(scope="module")
def browser() -> Iterator[Any]:
    sync_api = pytest.importorskip("playwright.sync_api")
    with sync_api.sync_playwright() as pw:
        b = pw.chromium.launch(executable_path=str(CHROMIUM), args=CHROMIUM_ARGS, headless=True)
        try:
            yield b
        finally:
            b.close()


def new_page(browser: Any, demo: Demo | None = None) -> Any:
    """A page in a fresh browser context, logged in with the demo's login URL when ``demo`` is given."""
    page = browser.new_page(viewport={"width": 1280, "height": 1000})
    errors: list[str] = []
    page.on("pageerror", lambda e: errors.append(str(e)))
    page.errors = errors
    # nothing may be fetched from outside this server
    page.route("**/*", lambda route: route.continue_() if route.request.url.startswith("http://127.0.0.1")
               else route.abort())
    if demo is not None:
        page.goto(demo.login_url)
        assert page.url == demo.url  # redirected: the token is not left in the address bar
    return page


def shot(page: Any, name: str) -> None:
    ARTIFACTS.mkdir(exist_ok=True)
    page.screenshot(path=str(ARTIFACTS / f"dashboard-{name}.png"), full_page=True)


@pytest.mark.slow
def test_the_login_url_sets_an_httponly_cookie_and_pages_refuse_without_it(demo: Demo, browser: Any) -> None:
    page = new_page(browser)
    response = page.goto(demo.url + "predict.html")
    assert response is not None and response.status == 401
    assert "Open the URL that was printed when the dashboard started" in page.inner_text("body")
    page.goto(demo.url + f"?token={demo.token[:-1]}x")  # one character off
    assert "Log in to the fedveil dashboard" in page.inner_text("body") and page.context.cookies() == []
    page.goto(demo.login_url)
    assert page.url == demo.url
    (cookie,) = page.context.cookies()
    assert cookie["httpOnly"] and cookie["sameSite"] == "Strict"
    assert cookie["value"] and demo.token not in cookie["value"]  # a session value, never the token
    assert page.evaluate("document.cookie") == ""  # scripts on the page cannot read it
    page.wait_for_selector("#runs-table tbody tr")  # the pages' API calls ride on the cookie
    page.goto(demo.url + "predict.html")
    page.wait_for_selector("#example option", state="attached")
    assert page.errors == []


@pytest.mark.slow
def test_runs_page_shows_the_demo_run_and_its_rounds(trained: Demo, browser: Any) -> None:
    demo = trained
    page = new_page(browser, demo)
    page.wait_for_selector("#runs-table tbody tr")
    expect = pytest.importorskip("playwright.sync_api").expect
    expect(page.locator("#rounds-table tbody tr")).to_have_count(2)
    assert "completed" in page.inner_text("#runs-table tbody")
    assert page.is_visible("#chart-accuracy") and page.is_visible("#chart-epsilon")
    assert "Privacy budget remaining" in page.inner_text("#budget-box")
    # the charts really drew something (non-blank canvas)
    drawn = page.evaluate("""() => { const c = document.getElementById('chart-epsilon');
        const d = c.getContext('2d').getImageData(0, 0, c.width, c.height).data;
        let n = 0; for (let i = 3; i < d.length; i += 4) if (d[i] > 0) n++; return n; }""")
    assert drawn > 1000
    shot(page, "runs")
    assert page.errors == []


@pytest.mark.slow
def test_site_page_accepts_a_good_csv_and_rejects_a_bad_one(demo: Demo, browser: Any, tmp_path: Path) -> None:
    from fedveil.demo import healthcare
    from fedveil.demo.data import make_split

    url, out = demo.url, demo.out
    site = make_split(3, 0).hospitals[1]
    good = tmp_path / "good.csv"
    good.write_text(healthcare.SCHEMA.to_csv(site.features[:40], site.labels[:40]))
    lines = good.read_text().splitlines()
    bad = tmp_path / "bad.csv"
    bad.write_text("\n".join(",".join(line.split(",")[1:]) for line in lines))  # drops mean_radius
    page = new_page(browser, demo)
    page.goto(url + "site.html")
    page.wait_for_selector("#sites-table tbody tr")
    page.select_option("#site", "hospital-2")
    page.set_input_files("#file", str(good))
    page.click("#upload-button")
    page.wait_for_selector("#upload-message.ok")
    assert "Accepted good.csv: 40 patients" in page.inner_text("#upload-message")
    expect = pytest.importorskip("playwright.sync_api").expect
    expect(page.locator('tr[data-site="hospital-2"]')).to_contain_text("40")
    shot(page, "upload-accepted")
    site_dir = out / "hospitals" / "hospital-2"
    assert (site_dir / "site.csv").read_text() == good.read_text()
    page.set_input_files("#file", str(bad))
    page.click("#upload-button")
    page.wait_for_selector("#upload-message.error")
    message = page.inner_text("#upload-message")
    assert "Rejected" in message and "missing columns: mean_radius" in message
    shot(page, "upload-rejected")
    assert (site_dir / "site.csv").read_text() == good.read_text()  # the rejected file left nothing
    assert sorted(p.name for p in site_dir.iterdir()) == ["demo-share.csv", "site.csv"]
    remove = page.locator('tr[data-site="hospital-2"] button')
    page.once("dialog", lambda dialog: dialog.dismiss())  # "remove", then "cancel": the file stays
    remove.click()
    page.wait_for_timeout(300)
    assert (site_dir / "site.csv").exists()
    page.once("dialog", lambda dialog: dialog.accept())
    remove.click()
    expect(page.locator('tr[data-site="hospital-2"] .upload-state')).to_have_text("none (demo share)")
    assert not (site_dir / "site.csv").exists()
    assert page.errors == []


@pytest.mark.slow
def test_a_run_started_from_the_browser_shows_its_rounds_and_gives_its_model(
        trained: Demo, browser: Any, tmp_path: Path) -> None:
    demo = trained
    url = demo.url
    before = {r["id"] for r in get_json(url + "api/runs")["runs"]}
    page = new_page(browser, demo)
    page.wait_for_selector("#runs-table tbody tr")
    page.fill("#rounds", "2")
    page.fill("#per-round", "3")
    page.select_option("#dp", "local")
    page.fill("#budget", "2.5")
    page.click("#start-button")
    page.wait_for_selector("#start-message.ok, #start-message.error")
    assert "ok" in page.get_attribute("#start-message", "class"), page.inner_text("#start-message")
    new = wait_for(lambda: [r for r in get_json(url + "api/runs")["runs"] if r["id"] not in before], 30, "a new run")
    run_id = new[0]["id"]
    assert run_id in page.inner_text("#start-message")
    expect = pytest.importorskip("playwright.sync_api").expect
    expect(page.locator("#run-id")).to_have_text(run_id)
    expect(page.locator("#rounds-table tbody tr")).to_have_count(2, timeout=120_000)
    wait_for(lambda: get_json(url + f"api/runs/{run_id}")["status"] == "completed", 60, "the run to complete")
    expect(page.locator("#run-status")).to_contain_text("completed", timeout=10_000)
    run = get_json(url + f"api/runs/{run_id}")
    assert run["settings"]["epsilon_budget"] == 2.5 and len(run["rounds"]) == 2
    assert all(e is not None and e <= 2.5 + 1e-9 for e in run["rounds"][-1]["epsilon_sample"].values())
    assert "budget ε = 2.5" in page.inner_text("#run-settings") or "ε budget 2.5" in page.inner_text("#run-settings")
    assert not page.is_visible("#run-warning")  # local DP-SGD: no user-level noise warning
    shot(page, "browser-run")
    with page.expect_download() as download_info:  # the global model, with the metadata of fedveil export
        page.click("#model-link")
    saved = tmp_path / "model.safetensors"
    download_info.value.save_as(saved)
    assert download_info.value.suggested_filename == f"{run_id}-round2.safetensors"
    from safetensors import safe_open

    with safe_open(str(saved), "pt") as model_file:
        meta = model_file.metadata()
        assert meta["run_id"] == run_id and meta["round"] == "2" and len(list(model_file.keys())) > 0
    # a second start while one is running is refused with a message (here the run is over, so it starts)
    assert page.errors == []


@pytest.mark.slow
def test_clinician_gets_a_prediction_with_reasons(trained: Demo, browser: Any) -> None:
    demo = trained
    page = new_page(browser, demo)
    page.goto(demo.url + "predict.html")
    page.wait_for_selector("#example option", state="attached")
    # the page's generic words, replaced by the healthcare task's own (TaskTerms via /api/status)
    assert page.inner_text("#predict-button") == "Assess risk"
    assert page.inner_text("nav a.active") == "Clinician" and page.title() == "fedveil · clinician"
    assert "Example patient" in page.inner_text("main")
    page.select_option("#example", "1")
    page.click("#load-example")
    assert page.input_value("#f-worst_area") != ""
    page.click("#predict-button")
    page.wait_for_selector("#result:not([hidden])")
    text = page.inner_text("#result")
    assert "% risk of malignancy" in text
    assert page.inner_text("#risk-level") in ("low", "moderate", "high", "very high")
    assert "A screening aid, not a diagnosis." in page.inner_text("#risk-confidence")
    rows = page.query_selector_all("#contributions tbody tr")
    assert len(rows) == 5
    assert all(("raises risk" in r.inner_text()) or ("lowers risk" in r.inner_text()) for r in rows)
    shot(page, "clinician")
    page.fill("#f-mean_radius", "")
    page.click("#predict-button")  # the browser's own validation blocks an empty required field
    page.evaluate("document.getElementById('f-mean_radius').removeAttribute('required')")
    page.click("#predict-button")
    page.wait_for_selector("#predict-message.error")
    assert "mean_radius" in page.inner_text("#predict-message")
    assert page.errors == []
