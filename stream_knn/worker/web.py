"""HTTP pages on the worker's web port: the dashboard, status, metrics, health,
readiness, on-demand answers.

Every page is registered through :func:`register_pages`'s ``page`` helper, which refuses
what no page takes (a query string over :data:`MAX_QUERY_BYTES`, a request body over
:data:`MAX_BODY_BYTES`, an id in the path that no event could carry) and asks
:func:`authorized` before the page runs.

With ``worker.http_token`` set, every page but ``/health`` and ``/ready`` (and
``/metrics`` with ``worker.metrics_require_token = false``) wants ``Authorization: Bearer
<token>``. A browser opens the dashboard once as ``/?token=<token>``: the answer sets a
cookie derived from the token (HttpOnly, SameSite=Strict) and sends it back to ``/``
without the token in the address; the page's own requests then carry the cookie.
"""

from __future__ import annotations

import functools
import hashlib
import hmac
import time
from collections.abc import Awaitable, Callable, Sequence
from html import escape
from typing import TYPE_CHECKING, Any

from prometheus_client import CONTENT_TYPE_LATEST, generate_latest

from stream_knn.config import read_secret
from stream_knn.events.schema import id_problem
from stream_knn.worker.dashboard import render_page, render_panels
from stream_knn.worker.status import collect_status

if TYPE_CHECKING:
    from stream_knn.worker.app import WorkerApp

__all__ = [
    "COOKIE",
    "MAX_BODY_BYTES",
    "MAX_QUERY_BYTES",
    "PUBLIC_PAGES",
    "authorized",
    "cookie_value",
    "parse_k",
    "register_pages",
]

_Handler = Callable[..., Awaitable[Any]]

#: Pages that answer without the token: probes of orchestrators and load balancers.
PUBLIC_PAGES = frozenset({"/health", "/ready"})
#: The longest query string a page takes (``k`` and the dashboard's ``token`` need tens).
MAX_QUERY_BYTES = 1024
#: The largest request body (no page reads one).
MAX_BODY_BYTES = 1024
#: The dashboard's cookie.
COOKIE = "stream_knn_session"


def cookie_value(token: str) -> str:
    """The dashboard cookie of ``token``: an HMAC of it, so the cookie is not the token."""
    return hmac.new(token.encode(), b"stream-knn dashboard", hashlib.sha256).hexdigest()


def authorized(request: Any, token: str, *, query_token: bool = False) -> bool:
    """Whether ``request`` may see a page: no token is set, or it carries the token as
    ``Authorization: Bearer <token>`` (or, with ``query_token``, as ``?token=``), or the
    dashboard's cookie. Compared in constant time."""
    if not token:
        return True
    expected = token.encode()
    scheme, _, given = request.headers.get("Authorization", "").partition(" ")
    if scheme.lower() == "bearer" and hmac.compare_digest(given.strip().encode(), expected):
        return True
    if query_token and hmac.compare_digest(request.query.get("token", "").encode(), expected):
        return True
    cookie = request.cookies.get(COOKIE)
    return cookie is not None and hmac.compare_digest(cookie.encode(), cookie_value(token).encode())


def _refusal(request: Any, ids: Sequence[str], max_id_length: int) -> tuple[int, str] | None:
    """``(status, error)`` for a request no page should take, or None."""
    query = len(request.rel_url.raw_query_string)
    if query > MAX_QUERY_BYTES:
        return 414, f"the query string has {query} bytes; the limit is {MAX_QUERY_BYTES}"
    length = request.content_length
    if length is None and request.body_exists:
        return 411, "a request body needs a Content-Length (no page reads one)"
    if length is not None and length > MAX_BODY_BYTES:
        return 413, f"the request body has {length} bytes; the limit is {MAX_BODY_BYTES}"
    for name in ids:
        problem = id_problem(request.match_info.get(name, ""), name, max_id_length)
        if problem is not None:
            return 400, problem[1]
    return None


def parse_k(raw: str | None, max_k: int) -> int | None:
    """The ``k`` query parameter: an integer in 1..max_k, None when absent (the user's
    variant decides), else ValueError with a message."""
    if raw is None or raw == "":
        return None
    try:
        k = int(raw)
    except ValueError:
        raise ValueError(f"k must be an integer between 1 and {max_k}, got {raw!r:.40}") from None
    if not 1 <= k <= max_k:
        raise ValueError(f"k must be an integer between 1 and {max_k}, got {raw:.40}")
    return k


def register_pages(worker: WorkerApp) -> None:
    """Add the stream-knn pages to the worker's Faust web server."""
    app = worker.app
    cfg = worker.config
    # Read once: a token file's later changes need a restart.
    token = read_secret("worker.http_token", cfg.worker.http_token, cfg.worker.http_token_file)
    public = set(PUBLIC_PAGES)
    if not cfg.worker.metrics_require_token:
        public.add("/metrics")
    max_id_length = cfg.events.max_id_length

    def page(path: str, ids: Sequence[str] = ()) -> Callable[[_Handler], Any]:
        """``app.page(path)`` behind the request limits and :func:`authorized`; ``ids``
        names the path parameters that are ids."""

        def register(handler: _Handler) -> Any:
            @functools.wraps(handler)
            async def guarded(web: Any, request: Any, *args: Any, **kwargs: Any) -> Any:
                refused = _refusal(request, ids, max_id_length)
                if refused is not None:
                    return web.json({"error": refused[1]}, status=refused[0])
                if path not in public and not authorized(request, token, query_token=path == "/"):
                    return _unauthorized(web, path)
                return await handler(web, request, *args, **kwargs)

            return app.page(path)(guarded)

        return register

    @page("/")
    async def dashboard(web: Any, request: Any) -> Any:
        if token and request.query.get("token") is not None:
            # Signed in: the cookie from now on, and the token out of the address bar.
            response = web.html("", status=303, headers={"Location": "/"})
            response.set_cookie(COOKIE, cookie_value(token), httponly=True, samesite="Strict")
            return response
        html = render_page(collect_status(worker), worker.history, cfg.serving.max_k)
        return web.html(html)

    @page("/dashboard/panels")
    async def dashboard_panels(web: Any, request: Any) -> Any:
        return web.html(render_panels(collect_status(worker), worker.history))

    @page("/status")
    async def status(web: Any, request: Any) -> Any:
        return web.json(collect_status(worker))

    @page("/metrics")
    async def metrics(web: Any, request: Any) -> Any:
        worker.service.refresh_gauges()
        body = generate_latest(worker.registry)
        response = web.bytes(body, content_type=CONTENT_TYPE_LATEST.split(";")[0])
        return response

    @page("/health")
    async def health(web: Any, request: Any) -> Any:
        ok, body = worker.health()
        return web.json(body, status=200 if ok else 503)

    @page("/ready")
    async def ready(web: Any, request: Any) -> Any:
        ok, reason = worker.is_ready()
        return web.json({"ready": ok, "reason": reason}, status=200 if ok else 503)

    @page("/recommendations/{user_id}", ids=("user_id",))
    @app.table_route(table=worker.profiles, match_info="user_id")
    async def recommendations(web: Any, request: Any, user_id: str) -> Any:
        try:
            k = parse_k(request.query.get("k"), cfg.serving.max_k)
        except ValueError as exc:
            return web.json({"error": str(exc)}, status=400)
        body = worker.answer(user_id, None, k, int(time.time() * 1000), trigger="http")
        return web.json(body)

    @page("/similar/{item_id}", ids=("item_id",))
    async def similar(web: Any, request: Any, item_id: str) -> Any:
        try:
            k = parse_k(request.query.get("k"), cfg.serving.max_k)
        except ValueError as exc:
            return web.json({"error": str(exc)}, status=400)
        body = worker.answer(None, item_id, k, int(time.time() * 1000), trigger="http")
        if body.get("error"):
            return web.json({"error": f"unknown item {item_id!r}", "item_id": item_id}, status=404)
        return web.json(body)

    @page("/index")
    async def index(web: Any, request: Any) -> Any:
        managers = []
        for key, manager in worker.service.managers.items():
            managers.append(
                {
                    "backend": key[0],
                    "metric": key[1],
                    "n_trees": key[2],
                    "search_k": key[3],
                    "version": manager.version,
                    "items": manager.item_count,
                    "pending_items": manager.pending_items,
                    "age_seconds": manager.age_seconds if manager.version is not None else None,
                    "last_build_seconds": manager.last_build_seconds,
                    "sampled_recall": manager.sampled_recall(),
                    "build_errors": manager.build_errors,
                }
            )
        return web.json(
            {"indexes": managers, "replicated_items": len(worker.replica.known_items())}
        )


def _unauthorized(web: Any, path: str) -> Any:
    """401 with the way in: the bearer token, or for the dashboard ``/?token=``."""
    headers = {"WWW-Authenticate": 'Bearer realm="stream-knn"'}
    if path == "/":
        body = (
            "<!doctype html><title>stream-knn</title><p>This worker asks for its HTTP token "
            "(<code>worker.http_token</code>). Open <code>"
            + escape("/?token=<token>")
            + "</code> once; a cookie keeps you signed in.</p>"
        )
        return web.html(body, status=401, headers=headers)
    return web.json(
        {"error": "unauthorized: send Authorization: Bearer <worker.http_token>"},
        status=401,
        headers=headers,
    )
