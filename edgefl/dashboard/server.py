"""The dashboard's web server: the page, its JSON, and live updates as server-sent events.

Starlette under uvicorn. The page is one HTML document with its script, style and the current
view inlined (one request draws it; no network beyond this server, no build step). `/api/view`
returns the view as JSON and `/events` streams it whenever it changes. With a token every request
needs it (`Authorization: Bearer T` or `?token=T`, which the page passes on to its event stream);
bound beyond the loopback interface, a token is required.
"""

from __future__ import annotations

import asyncio
import base64
import hashlib
import hmac
import html
import ipaddress
import json
import threading
import time
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass
from importlib import resources
from typing import Any
from urllib.parse import parse_qs, quote

import uvicorn
from starlette.applications import Starlette
from starlette.concurrency import run_in_threadpool
from starlette.requests import Request
from starlette.responses import (
    HTMLResponse,
    JSONResponse,
    PlainTextResponse,
    Response,
    StreamingResponse,
)
from starlette.routing import Route
from starlette.types import ASGIApp, Receive, Scope, Send

from edgefl.dashboard.record_reader import RecordPoller
from edgefl.dashboard.view import build_view
from edgefl.dashboard.watcher import FleetWatcher
from edgefl.roles.summary import RoundSummary

# A view is rebuilt at most this often while messages pour in, and at least this often while
# none do (a device turns stale by time passing alone).
MIN_REBUILD_S = 0.25
MAX_REBUILD_S = 1.0
RECORD_POLL_S = 1.0
EVENT_POLL_S = 0.25
KEEPALIVE_S = 15.0


def is_loopback(host: str) -> bool:
    """Whether `host` (an address or "localhost") is only reachable from this machine."""
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def check_bind(host: str, token: str | None) -> None:
    """Refuse to serve beyond the loopback interface without a token.

    Raises:
        ValueError: `host` is not a loopback address and no token is given.
    """
    if not is_loopback(host) and not token:
        raise ValueError(
            f"the dashboard shows the whole fleet: binding {host} (not loopback) needs --token"
        )


@dataclass(frozen=True)
class RenderedView:
    """One build of the view: its JSON, and the JSON without the clock (to tell changes)."""

    text: str
    content: str


class ViewSource:
    """Builds the view from a watcher and an optional record, shared by every client."""

    def __init__(
        self,
        watcher: FleetWatcher,
        record: RecordPoller | None = None,
        clock: Callable[[], float] = time.time,
    ) -> None:
        self.watcher = watcher
        self.record = record
        self._clock = clock
        self._lock = threading.Lock()
        self._built: RenderedView | None = None
        self._built_at = 0.0
        self._built_version = -1
        self._summaries: list[RoundSummary] = []
        self._polled_at = 0.0
        # Event streams end when this says so: the server is shutting down.
        self.stopping: Callable[[], bool] = lambda: False

    def view(self) -> dict[str, Any]:
        """Return the view as of now (see `edgefl.dashboard.view.build_view`)."""
        now = self._clock()
        if self.record is not None and now - self._polled_at >= RECORD_POLL_S:
            self._summaries = self.record.summaries()
            self._polled_at = now
        with self.watcher.lock:
            state = self.watcher.state.copy()
        record = self.record
        return build_view(
            state, self._summaries, now, self.watcher.connected,
            record.path.as_posix() if record is not None else None,
            record.error if record is not None else "",
        )  # fmt: skip

    def current(self) -> RenderedView:
        """Return the latest build, rebuilding when the fleet changed (at most every
        `MIN_REBUILD_S`) or `MAX_REBUILD_S` passed."""
        with self._lock:
            now = time.monotonic()
            age = now - self._built_at
            changed = self.watcher.state.version != self._built_version
            if self._built is None or age >= MAX_REBUILD_S or (changed and age >= MIN_REBUILD_S):
                self._built_version = self.watcher.state.version
                view = self.view()
                text = json.dumps(view, separators=(",", ":"), allow_nan=False)
                view.pop("now")
                self._built = RenderedView(text, json.dumps(view, separators=(",", ":")))
                self._built_at = now
            return self._built


def _asset(name: str) -> str:
    return resources.files("edgefl.dashboard").joinpath("assets", name).read_text("utf-8")


def _csp_hash(text: str) -> str:
    return "'sha256-" + base64.b64encode(hashlib.sha256(text.encode()).digest()).decode() + "'"


class Page:
    """The HTML page with its script and style inlined, and the Content-Security-Policy that
    allows exactly those two (by hash) and connections to this server only."""

    def __init__(self) -> None:
        self.script = _asset("dashboard.js")
        self.style = _asset("dashboard.css")
        self.template = _asset("index.html")
        self.policy = (
            f"default-src 'none'; script-src {_csp_hash(self.script)}; "
            f"style-src {_csp_hash(self.style)}; connect-src 'self'; img-src 'self' data:; "
            "base-uri 'none'; form-action 'none'; frame-ancestors 'none'"
        )

    def render(self, fleet: str, view_json: str) -> str:
        """Return the page for a fleet with the view it starts from."""
        # "</" inside a script element would end it: JSON allows "<\/" for it.
        data = view_json.replace("</", "<\\/")
        return (
            self.template.replace("{{fleet}}", html.escape(fleet))
            .replace("{{style}}", self.style)
            .replace("{{script}}", self.script)
            .replace("{{view}}", data)
        )


class TokenGate:
    """ASGI middleware: every HTTP request must carry the token (header or query)."""

    def __init__(self, app: ASGIApp, token: str) -> None:
        self.app = app
        self.token = token.encode()

    def _allowed(self, scope: Scope) -> bool:
        for name, value in scope.get("headers", []):
            if name == b"authorization" and value.startswith(b"Bearer "):
                return hmac.compare_digest(value[7:], self.token)
        query = parse_qs(scope.get("query_string", b"").decode("latin-1"))
        given = query.get("token", [""])[0].encode()
        return hmac.compare_digest(given, self.token)

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "http" and not self._allowed(scope):
            response = PlainTextResponse(
                "this dashboard needs its token: open it as /?token=TOKEN", status_code=401
            )
            await response(scope, receive, send)
            return
        await self.app(scope, receive, send)


def build_app(source: ViewSource, token: str | None = None) -> ASGIApp:
    """Return the ASGI application serving `source`'s view (read-only: only GET routes)."""
    page = Page()
    headers = {
        "Content-Security-Policy": page.policy,
        "X-Content-Type-Options": "nosniff",
        "Referrer-Policy": "no-referrer",
        "Cache-Control": "no-store",
    }

    # A rebuild takes tens of ms with a thousand devices: on a worker thread, the event loop
    # keeps serving other requests meanwhile.
    async def index(_request: Request) -> Response:
        rendered = await run_in_threadpool(source.current)
        return HTMLResponse(page.render(source.watcher.state.fleet, rendered.text), headers=headers)

    async def api_view(_request: Request) -> Response:
        rendered = await run_in_threadpool(source.current)
        return Response(rendered.text, media_type="application/json", headers=headers)

    async def events(request: Request) -> Response:
        async def stream() -> AsyncIterator[str]:
            sent = ""
            quiet_since = time.monotonic()
            while not source.stopping() and not await request.is_disconnected():
                rendered = await run_in_threadpool(source.current)
                if rendered.content != sent:
                    sent = rendered.content
                    quiet_since = time.monotonic()
                    yield f"event: view\ndata: {rendered.text}\n\n"
                elif time.monotonic() - quiet_since > KEEPALIVE_S:
                    quiet_since = time.monotonic()
                    yield ": keepalive\n\n"  # keeps proxies from closing a quiet stream
                await asyncio.sleep(EVENT_POLL_S)

        return StreamingResponse(
            stream(), media_type="text/event-stream",
            headers={**headers, "X-Accel-Buffering": "no"},
        )  # fmt: skip

    async def health(_request: Request) -> Response:
        return JSONResponse({"connected": source.watcher.connected})

    app: ASGIApp = Starlette(
        routes=[
            Route("/", index, methods=["GET"]),
            Route("/api/view", api_view, methods=["GET"]),
            Route("/events", events, methods=["GET"]),
            Route("/healthz", health, methods=["GET"]),
        ]
    )
    return TokenGate(app, token) if token else app


class DashboardServer:
    """uvicorn serving the dashboard on a thread (`start`, `wait`, `stop`)."""

    def __init__(self, app: ASGIApp, host: str = "127.0.0.1", port: int = 8050) -> None:
        config = uvicorn.Config(
            app, host=host, port=port, log_level="warning", access_log=False, lifespan="off",
            timeout_graceful_shutdown=1,
        )  # fmt: skip
        self.host = host
        self.server = uvicorn.Server(config)
        self._thread: threading.Thread | None = None

    @property
    def port(self) -> int:
        """The port it listens on (the one the OS chose for port 0), once started."""
        for server in getattr(self.server, "servers", []):  # set once uvicorn listens
            for sock in server.sockets:
                return int(sock.getsockname()[1])
        return int(self.server.config.port)

    def url(self, token: str | None = None) -> str:
        """Return the page's URL (with the token, for a browser)."""
        host = f"[{self.host}]" if ":" in self.host else self.host
        return f"http://{host}:{self.port}/" + (f"?token={quote(token)}" if token else "")

    def start(self, timeout: float = 10.0) -> None:
        """Serve on a daemon thread; return once it listens.

        Raises:
            OSError: it did not start listening (the port is taken) within `timeout` seconds.
        """
        self._thread = threading.Thread(target=self.server.run, name="edgefl-dashboard",
                                        daemon=True)  # fmt: skip
        self._thread.start()
        deadline = time.monotonic() + timeout
        while not self.server.started:
            if not self._thread.is_alive() or time.monotonic() > deadline:
                raise OSError(f"the dashboard could not listen on {self.host}:"
                              f"{self.server.config.port}")  # fmt: skip
            time.sleep(0.01)

    def wait(self) -> None:
        """Block until the serving thread ends (after `stop`)."""
        while self._thread is not None and self._thread.is_alive():
            self._thread.join(0.5)  # a timeout, so Ctrl-C reaches the waiting thread

    def stop(self) -> None:
        """Stop serving (open event streams are closed)."""
        self.server.should_exit = True
        if self._thread is not None:
            self._thread.join(timeout=5.0)
