"""Headless Chromium driven over the DevTools protocol, for tests that look at a page as a
person would: navigate, wait for a condition in the page, click, take a screenshot.

Debian's ``chromium`` (``scripts/install-chromium.sh``) and aiohttp's websocket client
(already installed with Faust); no browser download, no driver.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import itertools
import os
import signal
import subprocess
import time
import urllib.request
from pathlib import Path
from typing import Any

import aiohttp
import orjson

__all__ = ["Chromium", "PageError"]

_START_SECONDS = 60.0


class PageError(AssertionError):
    """The page threw, or a condition did not hold in time."""


class Chromium:
    """One headless Chromium process with one page (a tab), used synchronously.

    Parameters
    ----------
    binary
        The ``chromium`` executable.
    profile
        An empty directory for the browser's profile (and its log).
    width, height
        The window, in CSS pixels: a laptop screen by default.
    """

    def __init__(self, binary: str, profile: Path, width: int = 1440, height: int = 900) -> None:
        self.profile = profile
        self.loop = asyncio.new_event_loop()
        self._ids = itertools.count(1)
        profile.mkdir(parents=True, exist_ok=True)
        self._log = open(profile / "chromium.log", "wb")  # noqa: SIM115 - closed in close()
        self.proc = subprocess.Popen(
            [
                binary,
                "--headless=new",
                "--no-sandbox",  # tests run as root in CI
                "--disable-gpu",
                "--disable-dev-shm-usage",
                "--no-first-run",
                "--hide-scrollbars",
                "--remote-debugging-port=0",
                f"--user-data-dir={profile}",
                f"--window-size={width},{height}",
                "about:blank",
            ],
            stdout=self._log,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
        self.width, self.height = width, height
        try:
            self._session: aiohttp.ClientSession | None = None
            self._ws: aiohttp.ClientWebSocketResponse | None = None
            self.loop.run_until_complete(self._connect())
        except BaseException:
            self.close()
            raise

    # -- plumbing ------------------------------------------------------------------------

    def _port(self) -> int:
        marker = self.profile / "DevToolsActivePort"
        deadline = time.monotonic() + _START_SECONDS
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise PageError(f"chromium exited with {self.proc.returncode}: {self.log_tail()}")
            with contextlib.suppress(FileNotFoundError, ValueError, IndexError):
                return int(marker.read_text().splitlines()[0])
            time.sleep(0.1)
        raise PageError(f"chromium did not open its DevTools port: {self.log_tail()}")

    async def _connect(self) -> None:
        port = self._port()
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/json/list", timeout=10) as resp:
            targets = orjson.loads(resp.read())
        page = next(t for t in targets if t["type"] == "page")
        self._session = aiohttp.ClientSession()
        self._ws = await self._session.ws_connect(
            page["webSocketDebuggerUrl"], max_msg_size=256 * 1024 * 1024
        )
        await self._call("Page.enable", {})
        await self._call("Runtime.enable", {})
        await self._call(
            "Emulation.setDeviceMetricsOverride",
            {"width": self.width, "height": self.height, "deviceScaleFactor": 1, "mobile": False},
        )

    async def _call(self, method: str, params: dict[str, Any]) -> dict[str, Any]:
        assert self._ws is not None
        ident = next(self._ids)
        await self._ws.send_str(
            orjson.dumps({"id": ident, "method": method, "params": params}).decode()
        )
        while True:
            message = await self._ws.receive(timeout=60)
            if message.type not in (aiohttp.WSMsgType.TEXT, aiohttp.WSMsgType.BINARY):
                raise PageError(f"DevTools connection closed: {message!r}")
            data = orjson.loads(message.data)
            if data.get("id") == ident:
                if "error" in data:
                    raise PageError(f"{method}: {data['error']}")
                result: dict[str, Any] = data.get("result", {})
                return result

    def call(self, method: str, **params: Any) -> dict[str, Any]:
        """One DevTools command and its result."""
        return self.loop.run_until_complete(self._call(method, params))

    def log_tail(self) -> str:
        with contextlib.suppress(OSError):
            return (self.profile / "chromium.log").read_text(errors="replace")[-2000:]
        return ""

    # -- what a test does ----------------------------------------------------------------

    def open(self, url: str) -> None:
        """Navigate to ``url`` and wait until its document has loaded."""
        result = self.call("Page.navigate", url=url)
        if result.get("errorText"):
            raise PageError(f"{url}: {result['errorText']}")
        self.wait_for("document.readyState === 'complete'", timeout=60)

    def evaluate(self, expression: str) -> Any:
        """The JSON value of a JavaScript expression in the page (awaited if a promise)."""
        result = self.call(
            "Runtime.evaluate", expression=expression, returnByValue=True, awaitPromise=True
        )
        if "exceptionDetails" in result:
            raise PageError(f"{expression!r} threw: {result['exceptionDetails']}")
        return result["result"].get("value")

    def wait_for(self, expression: str, timeout: float = 120.0, interval: float = 0.25) -> Any:
        """Evaluate ``expression`` until it is truthy; its value, or :class:`PageError`
        naming the condition after ``timeout`` seconds."""
        deadline = time.monotonic() + timeout
        value: Any = None
        while time.monotonic() < deadline:
            value = self.evaluate(expression)
            if value:
                return value
            time.sleep(interval)
        raise PageError(f"not true after {timeout:.0f} s: {expression} (last value {value!r})")

    def screenshot(self, path: Path) -> Path:
        """A PNG of the whole page (beyond the window), saved at ``path``."""
        metrics = self.call("Page.getLayoutMetrics")
        size = metrics.get("cssContentSize") or metrics["contentSize"]
        clip = {
            "x": 0,
            "y": 0,
            "width": max(self.width, int(size["width"])),
            "height": int(size["height"]),
            "scale": 1,
        }
        shot = self.call(
            "Page.captureScreenshot", format="png", captureBeyondViewport=True, clip=clip
        )
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(base64.b64decode(shot["data"]))
        return path

    def close(self) -> None:
        async def _close() -> None:
            if self._ws is not None:
                await self._ws.close()
            if self._session is not None:
                await self._session.close()

        with contextlib.suppress(aiohttp.ClientError, OSError, RuntimeError):
            self.loop.run_until_complete(_close())
        self.loop.close()
        if self.proc.poll() is None:
            os.killpg(self.proc.pid, signal.SIGTERM)
            try:
                self.proc.wait(15)
            except subprocess.TimeoutExpired:
                os.killpg(self.proc.pid, signal.SIGKILL)
                self.proc.wait(10)
        self._log.close()
