"""A polling watcher: each file landing in `data/incoming/` becomes one `ratchet.batch.landed`
event.

No new dependency and no inotify: every `interval` seconds the folder is listed. A file is
emitted once it has been seen with the same size and modification time in two consecutive
scans (a file still being written is left for a later scan). Dotfiles and temporary names
(`.tmp`, `.part`, ...) are never emitted. What was emitted is remembered in
`.ratchet/watch.json` in the workspace, so a restarted watcher does not emit it again; a file
replaced by different content (another size or modification time) is emitted again.

The event names the workspace as its resource, so a deployment trigger can match one workspace:

    {"event": "ratchet.batch.landed",
     "resource": {"prefect.resource.id": "ratchet.workspace.<absolute path>", ...},
     "payload": {"workspace": "<absolute path>", "path": "<absolute file path>", ...}}
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from ratchet.runtime import read_json, write_json

EVENT = "ratchet.batch.landed"
STATE_FILE = Path(".ratchet/watch.json")
PARTIAL_SUFFIXES = (".tmp", ".part", ".partial", ".crdownload", ".swp", ".lock")

log = logging.getLogger("ratchet.watch")

# (workspace, file) -> None; raises when the event could not be sent (the file is retried).
Emitter = Callable[[Path, Path], None]


def resource_id(ws: Path) -> str:
    """The event resource of a workspace: what a trigger matches to react to this one only."""
    return f"ratchet.workspace.{Path(ws).resolve()}"


def landed_event(ws: Path, file: Path) -> dict[str, Any]:
    """The fields of the `ratchet.batch.landed` event for `file` in workspace `ws`."""
    ws = Path(ws).resolve()
    stat = file.stat()
    return {
        "event": EVENT,
        "resource": {
            "prefect.resource.id": resource_id(ws),
            "prefect.resource.name": ws.name,
        },
        "payload": {
            "workspace": str(ws),
            "path": str(file.resolve()),
            "name": file.name,
            "size": stat.st_size,
        },
    }


def emit_landed(ws: Path, file: Path) -> None:
    """Send the event to the Prefect API in PREFECT_API_URL, and raise if that fails.

    Sent through Prefect's events client in its own context rather than the fire-and-forget
    `prefect.events.emit_event` queue: a failed send raises here, so the watcher does not
    record the file as emitted and tries again on its next scan.
    """
    import asyncio

    from prefect.events import Event
    from prefect.events.clients import get_events_client
    from prefect.settings import PREFECT_API_URL

    if not PREFECT_API_URL.value():
        raise RuntimeError("PREFECT_API_URL is not set: no Prefect server to send events to")
    event = Event(**landed_event(ws, file))

    async def send() -> None:
        async with get_events_client(reconnection_attempts=2) as client:
            await client.emit(event)

    asyncio.run(send())


def _candidate(path: Path) -> bool:
    name = path.name
    return not name.startswith((".", "~")) and not name.endswith(PARTIAL_SUFFIXES)


class Watcher:
    """Scans one workspace's incoming folder; `scan()` once, or `run()` until stopped."""

    def __init__(self, ws: Path, emit: Emitter | None = None) -> None:
        self.ws = Path(ws).resolve()
        self.incoming = self.ws / "data" / "incoming"
        self.state_path = self.ws / STATE_FILE
        self.emit = emit or emit_landed
        self._seen: dict[str, list[int]] = {}  # name -> [size, mtime_ns] at the previous scan
        self.emitted: dict[str, dict[str, Any]] = self._load()

    def _load(self) -> dict[str, dict[str, Any]]:
        if not self.state_path.is_file():
            return {}
        try:
            state = read_json(self.state_path)
            return dict(state.get("emitted", {}))
        except (ValueError, OSError, AttributeError) as err:
            log.warning("ignoring unreadable watch state %s: %s", self.state_path, err)
            return {}

    def _save(self) -> None:
        write_json(self.state_path, {"emitted": self.emitted})

    def _listing(self) -> dict[str, tuple[Path, list[int]]]:
        if not self.incoming.is_dir():
            return {}
        found = {}
        for path in sorted(self.incoming.iterdir()):
            if not _candidate(path):
                continue
            try:
                if not path.is_file():
                    continue
                st = path.stat()
            except OSError:  # removed between listing and stat
                continue
            found[path.name] = (path, [st.st_size, st.st_mtime_ns])
        return found

    def scan(self) -> list[Path]:
        """One pass: emit every stable, not yet emitted file; returns the files emitted."""
        listing = self._listing()
        emitted: list[Path] = []
        changed = False
        for gone in set(self.emitted) - set(listing):  # removed: a new file of that name is new
            del self.emitted[gone]
            changed = True
        for name, (path, sig) in listing.items():
            previous, self._seen[name] = self._seen.get(name), sig
            done = self.emitted.get(name)
            if done is not None and done.get("sig") == sig:
                continue
            if previous != sig:  # new, or still growing: wait for a scan that sees it unchanged
                continue
            try:
                self.emit(self.ws, path)
            except Exception as err:  # noqa: BLE001 - keep watching; retried next scan
                log.warning("could not emit %s for %s (retrying next scan): %s", EVENT, path, err)
                continue
            self.emitted[name] = {"sig": sig, "emitted_at": time.strftime("%Y-%m-%dT%H:%M:%SZ",
                                                                        time.gmtime())}
            emitted.append(path)
            changed = True
            log.info("emitted %s for %s", EVENT, path)
        self._seen = {n: s for n, s in self._seen.items() if n in listing}
        if changed:
            self._save()
        return emitted

    def run(self, stop: threading.Event, interval: float = 5.0,
            ready: Callable[[], bool] | None = None) -> None:
        """Scan every `interval` seconds until `stop` is set; errors are logged, not raised.

        With `ready`, scanning starts only once it returns true (polled at the same interval):
        an event emitted before the trigger that reacts to it exists would be lost."""
        waiting = ready is not None
        if waiting:
            log.info("waiting for the %s trigger before watching %s", EVENT, self.incoming)
        while waiting and not stop.is_set():
            try:
                waiting = not ready()
            except Exception as err:  # noqa: BLE001 - the server may not answer yet
                log.debug("trigger not ready: %s", err)
            if waiting:
                stop.wait(interval)
        while not stop.is_set():
            try:
                self.scan()
            except Exception:  # noqa: BLE001 - a watcher thread must outlive a bad scan
                log.exception("scan of %s failed", self.incoming)
            stop.wait(interval)

    def start(self, interval: float = 5.0, ready: Callable[[], bool] | None = None
              ) -> tuple[threading.Thread, threading.Event]:
        """Run in a daemon thread; set the returned event to stop it."""
        stop = threading.Event()
        thread = threading.Thread(target=self.run, args=(stop, interval, ready),
                                  name="ratchet-watch", daemon=True)
        thread.start()
        return thread, stop
