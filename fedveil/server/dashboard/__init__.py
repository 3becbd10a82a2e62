"""The web dashboard: runs and rounds live, sites' data upload, the prediction view.

A FastAPI application served by uvicorn (:mod:`.server`), with plain HTML/JS/CSS pages shipped in
``fedveil/server/static`` (no Node build, nothing fetched from the internet). It binds to
127.0.0.1 unless told otherwise; the guards in front of every route (:mod:`.middleware`) check
the ``Host`` (against DNS rebinding), the login token (:mod:`fedveil.server.dashboard_auth`) and,
on POST/DELETE, the ``X-Fedveil-Request: 1`` header (against cross-site request forgery). The
request and answer shapes are declared (:mod:`.schemas`) and served at ``/openapi.json``.

Where the data comes from is behind two small interfaces (:mod:`.sources`), so the same pages
serve the demo (an in-memory record of the runs it drives) and ``fedveil server`` (the SQLite
run store): :class:`RunSource` and :class:`RunStarter`. Site uploads (:class:`SiteDataDirs`)
are streamed within the size limit and validated against the task's schema before anything is
written, to that site's own directory and nowhere else.
"""

from fedveil.server.dashboard.app import Dashboard
from fedveil.server.dashboard.explain import gradient_times_input
from fedveil.server.dashboard.server import DashboardServer, start_store_dashboard
from fedveil.server.dashboard.settings import DashboardError, RunSettings
from fedveil.server.dashboard.site_data import SiteDataDirs
from fedveil.server.dashboard.sources import MemoryRunSource, RunSource, RunStarter, StoreRunSource

__all__ = [
    "Dashboard",
    "DashboardError",
    "DashboardServer",
    "MemoryRunSource",
    "RunSettings",
    "RunSource",
    "RunStarter",
    "SiteDataDirs",
    "StoreRunSource",
    "gradient_times_input",
    "start_store_dashboard",
]
