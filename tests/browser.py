"""A headless Chromium for the browser checks, driven over the DevTools protocol on a pipe
(the standard library only: no driver, no port).

The browser is offline for names: every host name fails to resolve, so a page that needs a
CDN shows it (loopback addresses and files still load). Every request the page makes is kept
in `requests`, to assert that none left the machine.
"""

from __future__ import annotations

import base64
import contextlib
import json
import os
import shutil
import subprocess
import tempfile
import time
from pathlib import Path
from typing import Any

CANDIDATES = ("chromium", "chromium-browser", "google-chrome", "chrome")
INSTALL_HINT = ("no Chromium on this machine: `apt-get install chromium` (Debian's package) to "
                "run the browser checks")


def chromium() -> str | None:
    """The Chromium to drive, or None: $RATCHET_CHROMIUM, else the first on PATH."""
    return os.environ.get("RATCHET_CHROMIUM") or next(
        (found for name in CANDIDATES if (found := shutil.which(name))), None)


class Browser:
    """One headless Chromium and one page in it."""

    def __init__(self, executable: str, *, width: int = 1400, height: int = 1600) -> None:
        self.profile = tempfile.mkdtemp(prefix="ratchet-chromium-")
        to_browser, self._commands = os.pipe()
        self._replies, from_browser = os.pipe()

        def pipes_at_3_and_4() -> None:  # in the child: the protocol's fixed descriptors
            a, b = os.dup(to_browser), os.dup(from_browser)
            os.dup2(a, 3)
            os.dup2(b, 4)

        self.proc = subprocess.Popen(
            [executable, "--headless=new", "--no-sandbox", "--disable-gpu",
             "--remote-debugging-pipe", f"--user-data-dir={self.profile}", "--no-first-run",
             "--no-default-browser-check", "--disable-extensions", "--hide-scrollbars",
             "--host-resolver-rules=MAP * ~NOTFOUND, EXCLUDE 127.0.0.1",
             f"--window-size={width},{height}",
             "about:blank"],
            preexec_fn=pipes_at_3_and_4, pass_fds=(3, 4), stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL)
        os.close(to_browser)
        os.close(from_browser)
        self._out = os.fdopen(self._commands, "wb", buffering=0)
        self._in = os.fdopen(self._replies, "rb", buffering=0)
        self._buf, self._id, self._session = b"", 0, None
        self.requests: list[str] = []
        target = self.send("Target.createTarget", {"url": "about:blank"}, page=False)
        self._session = self.send("Target.attachToTarget",
                                  {"targetId": target["targetId"], "flatten": True},
                                  page=False)["sessionId"]
        for domain in ("Page", "Runtime", "Network"):
            self.send(f"{domain}.enable")

    def __enter__(self) -> Browser:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def _message(self) -> dict[str, Any]:
        while b"\0" not in self._buf:
            chunk = self._in.read(1 << 16)
            if not chunk:
                raise RuntimeError("Chromium closed its pipe (it crashed or was killed)")
            self._buf += chunk
        raw, self._buf = self._buf.split(b"\0", 1)
        return json.loads(raw)

    def send(self, method: str, params: dict[str, Any] | None = None, *,
             page: bool = True) -> dict[str, Any]:
        self._id += 1
        message: dict[str, Any] = {"id": self._id, "method": method, "params": params or {}}
        if page and self._session:
            message["sessionId"] = self._session
        self._out.write(json.dumps(message).encode() + b"\0")
        while True:
            reply = self._message()
            if reply.get("method") == "Network.requestWillBeSent":
                self.requests.append(reply["params"]["request"]["url"])
            if reply.get("id") == self._id:
                if "error" in reply:
                    raise RuntimeError(f"{method}: {reply['error']}")
                return reply.get("result", {})

    def eval(self, expression: str) -> Any:
        result = self.send("Runtime.evaluate", {"expression": expression, "returnByValue": True,
                                                "awaitPromise": True})
        if "exceptionDetails" in result:
            raise RuntimeError(f"{expression}: {result['exceptionDetails'].get('text')}")
        return result.get("result", {}).get("value")

    def open(self, url: str, *, until: str, timeout: float = 60.0) -> None:
        """Load `url` and wait until the JavaScript expression `until` is true."""
        self.requests.clear()
        self.send("Page.navigate", {"url": url})
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            try:
                if self.eval(f"!!({until})"):
                    return
            except RuntimeError:
                pass  # the page is between documents
            time.sleep(0.2)
        raise AssertionError(f"{url}: `{until}` still false after {timeout:.0f} s")

    def screenshot(self, path: Path) -> Path:
        data = self.send("Page.captureScreenshot", {"format": "png",
                                                   "captureBeyondViewport": True})["data"]
        path.write_bytes(base64.b64decode(data))
        return path

    def close(self) -> None:
        with contextlib.suppress(RuntimeError, OSError):
            self.send("Browser.close", page=False)
        try:
            self.proc.wait(10)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()
        shutil.rmtree(self.profile, ignore_errors=True)
