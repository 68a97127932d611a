"""Open a page in headless Chromium and report what a reader would see: console errors, requests, DOM counts, a PNG.

Talks the DevTools protocol over a websocket (`websocket-client`) to a Chromium started with a fresh profile and
every background service off, so a self-contained page must load with no request other than `file:` and `data:`.
Used by the dashboard tests and the SmolLM2 comparison script to check pages before anyone opens them.
"""
from __future__ import annotations

import base64
import json
import shutil
import subprocess
import tempfile
import time
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

FLAGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
         "--disable-background-networking", "--disable-component-update", "--disable-sync",
         "--disable-dev-shm-usage", "--remote-allow-origins=*", "--remote-debugging-port=0",
         "--window-size=1280,900"]


def chromium_path() -> str | None:
    """The Chromium executable (Debian's `chromium`, or chromium-browser / google-chrome), or None."""
    for name in ("chromium", "chromium-browser", "google-chrome", "google-chrome-stable"):
        found = shutil.which(name)
        if found:
            return found
    return None


@dataclass
class PageReport:
    """What loading a page produced: console errors/warnings, uncaught exceptions, requested URLs, query results."""

    errors: list[str] = field(default_factory=list)
    warnings: list[str] = field(default_factory=list)
    requests: list[str] = field(default_factory=list)
    values: dict[str, Any] = field(default_factory=dict)
    screenshot: Path | None = None

    @property
    def external_requests(self) -> list[str]:
        """Requests that would need the network (anything but file: and data: URLs)."""
        return [u for u in self.requests if not u.startswith(("file:", "data:"))]


class _DevTools:
    """A minimal DevTools-protocol session on one page target."""

    def __init__(self, url: str, timeout: float):
        import websocket

        self.ws = websocket.create_connection(url, timeout=timeout, suppress_origin=True)
        self.next_id, self.events = 0, []

    def call(self, method: str, **params: Any) -> dict:
        self.next_id += 1
        self.ws.send(json.dumps({"id": self.next_id, "method": method, "params": params}))
        while True:
            msg = json.loads(self.ws.recv())
            if msg.get("id") == self.next_id:
                if "error" in msg:
                    raise RuntimeError(f"DevTools {method}: {msg['error']}")
                return msg.get("result", {})
            self.events.append(msg)

    def wait_for(self, method: str, timeout: float) -> None:
        end = time.monotonic() + timeout
        while not any(e.get("method") == method for e in self.events):
            if time.monotonic() > end:
                raise TimeoutError(f"no {method} within {timeout} s")
            self.events.append(json.loads(self.ws.recv()))

    def close(self) -> None:
        self.ws.close()


def _devtools_port(proc: subprocess.Popen, timeout: float) -> int:
    end = time.monotonic() + timeout
    for line in iter(proc.stderr.readline, ""):
        if "DevTools listening on ws://" in line:
            return int(line.split("ws://", 1)[1].split("/", 1)[0].rsplit(":", 1)[1])
        if time.monotonic() > end:
            break
    raise RuntimeError(f"Chromium did not open a DevTools port (exit code {proc.poll()}).")


def check_page(path: str | Path, expressions: dict[str, str] | None = None, screenshot: str | Path | None = None,
               timeout: float = 60.0, settle: float = 0.3) -> PageReport:
    """Load `path` in headless Chromium; evaluate each JS expression (by name) after load; optionally save a full-page
    PNG screenshot (the viewport only, for pages too tall to capture). Raises FileNotFoundError without a Chromium."""
    exe = chromium_path()
    if exe is None:
        raise FileNotFoundError("no Chromium found; install Debian's `chromium` package (apt-get install chromium).")
    profile = tempfile.mkdtemp(prefix="dh-chromium-")
    proc = subprocess.Popen([exe, *FLAGS, f"--user-data-dir={profile}", "about:blank"], stdout=subprocess.DEVNULL,
                            stderr=subprocess.PIPE, text=True)
    report = PageReport()
    try:
        port = _devtools_port(proc, timeout)
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/json/list", timeout=timeout) as r:
            targets = [t for t in json.load(r) if t.get("type") == "page"]
        tools = _DevTools(targets[0]["webSocketDebuggerUrl"], timeout)
        try:
            for domain in ("Runtime", "Log", "Page", "Network"):
                tools.call(f"{domain}.enable")
            tools.call("Page.navigate", url=Path(path).resolve().as_uri())
            tools.wait_for("Page.loadEventFired", timeout)
            time.sleep(settle)
            for name, expr in (expressions or {}).items():
                result = tools.call("Runtime.evaluate", expression=expr, returnByValue=True)
                if "exceptionDetails" in result:
                    report.errors.append(f"evaluating {name}: {result['exceptionDetails'].get('text')}")
                report.values[name] = result.get("result", {}).get("value")
            if screenshot is not None:
                try:
                    shot = tools.call("Page.captureScreenshot", format="png", captureBeyondViewport=True)
                except RuntimeError:  # "Page is too large" for a full-page capture: take the viewport
                    shot = tools.call("Page.captureScreenshot", format="png")
                Path(screenshot).write_bytes(base64.b64decode(shot["data"]))
                report.screenshot = Path(screenshot)
            _read_events(tools.events, report)
        finally:
            tools.close()
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            proc.kill()
        shutil.rmtree(profile, ignore_errors=True)
    return report


def _read_events(events: list[dict], report: PageReport) -> None:
    for e in events:
        method, params = e.get("method"), e.get("params", {})
        if method == "Runtime.consoleAPICalled":
            text = " ".join(str(a.get("value", a.get("description", ""))) for a in params.get("args", []))
            (report.errors if params.get("type") in ("error", "assert") else report.warnings
             if params.get("type") == "warning" else []).append(text)
        elif method == "Runtime.exceptionThrown":
            report.errors.append(params.get("exceptionDetails", {}).get("text", "uncaught exception"))
        elif method == "Log.entryAdded":
            entry = params.get("entry", {})
            if entry.get("level") == "error":
                report.errors.append(f"{entry.get('source')}: {entry.get('text')} {entry.get('url', '')}".strip())
            elif entry.get("level") == "warning":
                report.warnings.append(entry.get("text", ""))
        elif method == "Network.requestWillBeSent":
            url = params.get("request", {}).get("url", "")
            report.requests.append(url[:60] if url.startswith("data:") else url)
