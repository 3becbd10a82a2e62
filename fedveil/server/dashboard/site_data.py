"""Each site's own data directory: uploads validated before anything is written, then written atomically."""

from __future__ import annotations

import os
import re
import stat
import tempfile
import threading
from dataclasses import dataclass, field
from http import HTTPStatus
from pathlib import Path
from typing import Any

from fedveil.server.dashboard.settings import DashboardError
from fedveil.task import SchemaError, Task

DEFAULT_MAX_UPLOAD_BYTES = 2 * 1024 * 1024
SITE_FILE = "site.csv"
_SITE_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,63}$")


@dataclass
class SiteDataDirs:
    """Each site's own data directory, ``root/<site>/site.csv``.

    Stands for storage on the site's side: nothing here is sent to the coordinator; the
    site's client reads the file when it trains.
    """

    root: Path
    sites: tuple[str, ...]
    task: Task
    max_bytes: int = DEFAULT_MAX_UPLOAD_BYTES
    _lock: threading.Lock = field(default_factory=threading.Lock, repr=False)
    #: What :meth:`describe` found in each file, keyed by the file's (inode, mtime, size): a file is
    #: parsed again only when it changed, not on every ``GET /api/sites``.
    _described: dict[str, tuple[tuple[int, int, int], dict[str, Any]]] = field(default_factory=dict, repr=False)

    def __post_init__(self) -> None:
        for name in self.sites:
            if not _SITE_NAME.match(name):
                raise ValueError(f"site name {name!r} is not a safe directory name")

    def path(self, site: str) -> Path:
        if site not in self.sites:
            raise DashboardError(f"unknown site {site!r}", HTTPStatus.NOT_FOUND)
        return self.root / site / SITE_FILE

    def site_file(self, site: str) -> Path | None:
        p = self.path(site)
        return p if p.is_file() else None

    def describe(self) -> list[dict[str, Any]]:
        out = []
        for name in self.sites:
            info: dict[str, Any] = {"name": name, "has_upload": False, "rows": None}
            try:
                st = self.path(name).stat()
            except OSError:
                st = None
            if st is not None and stat.S_ISREG(st.st_mode):
                info["has_upload"] = True
                info.update(self._file_summary(name, (st.st_ino, st.st_mtime_ns, st.st_size)))
            out.append(info)
        return out

    def _file_summary(self, site: str, key: tuple[int, int, int]) -> dict[str, Any]:
        """``{"rows": n}`` or ``{"error": ...}`` for the site's file, parsed only if it changed since last asked."""
        cached = self._described.get(site)
        if cached is not None and cached[0] == key:
            return dict(cached[1])
        summary: dict[str, Any]
        try:
            _, labels = self.task.schema.parse_csv(self.path(site))
            summary = {"rows": len(labels)}
        except SchemaError as err:  # a file edited by hand since it was accepted
            summary = {"error": str(err)}
        except OSError:  # removed (or replaced) while being read: answer as if absent, cache nothing
            return {"has_upload": False}
        self._described[site] = (key, summary)
        return dict(summary)

    def accept(self, site: str, filename: str, body: bytes) -> dict[str, Any]:
        """Validate ``body``; only if it is a good site file, write it atomically. Returns a summary."""
        target = self.path(site)
        if len(body) > self.max_bytes:
            raise DashboardError(
                f"the file is too large ({len(body)} bytes; the limit is {self.max_bytes})",
                HTTPStatus.REQUEST_ENTITY_TOO_LARGE,
            )
        if not filename.lower().endswith(".csv"):
            raise DashboardError(f"{filename or 'the file'!s} is not a CSV file (expected a name ending in .csv)")
        try:
            features, labels = self.task.schema.parse_csv(body)
        except SchemaError as err:
            raise DashboardError(f"{filename}: {err}") from None
        with self._lock:
            target.parent.mkdir(parents=True, exist_ok=True)
            fd, tmp = tempfile.mkstemp(prefix=".upload-", suffix=".csv", dir=target.parent)
            try:
                with os.fdopen(fd, "wb") as fh:
                    fh.write(body)
                os.replace(tmp, target)
            except BaseException:
                Path(tmp).unlink(missing_ok=True)
                raise
        positives = float(labels.mean()) if len(labels) else 0.0
        return {
            "site": site,
            "filename": filename,
            "rows": len(labels),
            "features": int(features.shape[1]),
            "label_share": positives,
        }

    def remove(self, site: str) -> bool:
        p = self.path(site)
        with self._lock:
            if p.is_file():
                p.unlink()
                return True
        return False

