"""Claim files: a cell is computed by one process at a time, however many share a results folder.

Before computing a cell a process creates ``<record>.claim`` with ``O_CREAT | O_EXCL`` (atomic on local and
network file systems) holding its host, pid and start time. The claim is removed when the cell's record is
written or the process exits. A claim whose owner is gone is taken over: on the same host when its pid no
longer runs (or runs a different process), on any host when its heartbeat (the file's mtime, touched every
``HEARTBEAT`` seconds while the owner lives) is older than ``STALE_AFTER``.
"""

from __future__ import annotations

import atexit
import json
import os
import socket
import threading
import time
from pathlib import Path

HEARTBEAT = 30.0
STALE_AFTER = 300.0
SUFFIX = ".claim"
_HOST = socket.gethostname()


def _proc_start(pid: int) -> str | None:
    """The start time of ``pid`` (Linux), so a recycled pid is not taken for the claim's owner."""
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[19]
    except (OSError, IndexError):
        return None


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


class Claims:
    """The claims this process holds; a daemon thread keeps their heartbeats fresh."""

    def __init__(self) -> None:
        self.held: set[Path] = set()
        self._lock = threading.Lock()
        self._me = {"host": _HOST, "pid": os.getpid(), "start": _proc_start(os.getpid())}
        self._thread: threading.Thread | None = None
        atexit.register(self.release_all)

    def path(self, record: Path) -> Path:
        return record.with_name(record.name + SUFFIX)

    def owner(self, record: Path) -> dict | None:
        """Who holds ``record``'s claim (None: nobody, or an owner that is gone)."""
        claim = self.path(record)
        try:
            info = json.loads(claim.read_text())
            age = time.time() - claim.stat().st_mtime
        except FileNotFoundError:
            return None
        except (OSError, ValueError):
            info, age = {}, 0.0  # being written right now: treat as live until it goes stale
            try:
                age = time.time() - claim.stat().st_mtime
            except OSError:
                return None
        if not isinstance(info, dict):
            info = {}
        if age > STALE_AFTER:
            return None
        if info.get("host") == _HOST and isinstance(info.get("pid"), int):
            pid = info["pid"]
            if not _alive(pid) or (info.get("start") and _proc_start(pid) not in (None, info["start"])):
                return None
        return info

    def acquire(self, record: Path) -> bool:
        """Claim ``record``'s cell; False when a live process holds it."""
        claim = self.path(record)
        claim.parent.mkdir(parents=True, exist_ok=True)
        for _ in range(3):  # bounded: create, or take over a dead owner's claim and try again
            try:
                fd = os.open(claim, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
            except FileExistsError:
                if self.owner(record) is not None:
                    return False
                self._take_over(claim)
                continue
            with os.fdopen(fd, "w") as f:
                json.dump({**self._me, "claimed": time.time()}, f)
            with self._lock:
                self.held.add(claim)
            self._start_heartbeat()
            return True
        return False

    def _take_over(self, claim: Path) -> None:
        """Remove a dead owner's claim: rename first, so two processes cannot both remove a fresh one."""
        aside = claim.with_name(f"{claim.name}.{os.getpid()}.stale")
        try:
            os.rename(claim, aside)
            aside.unlink(missing_ok=True)
        except OSError:
            pass

    def release(self, record: Path) -> None:
        claim = self.path(record)
        with self._lock:
            if claim in self.held:
                self.held.discard(claim)
                claim.unlink(missing_ok=True)

    def release_all(self) -> None:
        with self._lock:
            for claim in self.held:
                claim.unlink(missing_ok=True)
            self.held.clear()

    def _start_heartbeat(self) -> None:
        if self._thread is not None and self._thread.is_alive():
            return
        self._thread = threading.Thread(target=self._beat, name="slimbench-claims", daemon=True)
        self._thread.start()

    def _beat(self) -> None:
        while True:
            time.sleep(HEARTBEAT)
            with self._lock:
                for claim in list(self.held):
                    try:
                        os.utime(claim)
                    except OSError:
                        self.held.discard(claim)
