"""A served dashboard stops on SIGINT and SIGTERM, even in a process that inherited SIGINT as ignored
(what a shell does to a command started in the background, and how the browser tests start the demo)."""

from __future__ import annotations

import signal
import subprocess
import sys

import pytest

SERVE = """
import signal
signal.signal(signal.SIGINT, signal.SIG_IGN)  # inherited as ignored, as by a background job
from fedveil.demo import healthcare
from fedveil.server.dashboard import Dashboard, DashboardServer, MemoryRunSource
server = DashboardServer(Dashboard(task=healthcare.task, runs=MemoryRunSource()), port=0).start()
try:
    server.serve_until_signalled(lambda: print("serving", flush=True))
finally:
    server.stop()
print("stopped; SIGINT ignored again:", signal.getsignal(signal.SIGINT) is signal.SIG_IGN, flush=True)
"""


@pytest.mark.parametrize("sig", [signal.SIGINT, signal.SIGTERM], ids=["SIGINT", "SIGTERM"])
def test_a_served_dashboard_stops_on_the_signal_and_restores_the_old_handler(sig: signal.Signals) -> None:
    proc = subprocess.Popen([sys.executable, "-c", SERVE], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        assert proc.stdout is not None
        assert proc.stdout.readline().strip() == "serving", proc.stderr.read() if proc.stderr else ""
        proc.send_signal(sig)
        out, err = proc.communicate(timeout=20)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    assert proc.returncode == 0, err[-2000:]
    assert out.strip() == "stopped; SIGINT ignored again: True"
