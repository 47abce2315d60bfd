"""HTTP pages on the worker's web port: the dashboard, status, metrics, health,
readiness, on-demand answers.

Every page is registered through :func:`register_pages`'s ``page`` helper, which asks
:func:`authorized` first: the one place where an HTTP token check goes.
"""

from __future__ import annotations

import functools
import time
from collections.abc import Awaitable, Callable
from typing import TYPE_CHECKING, Any

from prometheus_client import CONTENT_TYPE_LATEST, generate_latest

from stream_knn.worker.dashboard import render_page, render_panels
from stream_knn.worker.status import collect_status

if TYPE_CHECKING:
    from stream_knn.worker.app import WorkerApp

__all__ = ["authorized", "parse_k", "register_pages"]

_Handler = Callable[..., Awaitable[Any]]


def authorized(request: Any) -> bool:
    """Whether ``request`` may see a page. Every page asks here; there is no HTTP token
    setting yet, so every request may."""
    return True


def parse_k(raw: str | None, max_k: int) -> int | None:
    """The ``k`` query parameter: an integer in 1..max_k, None when absent (the user's
    variant decides), else ValueError with a message."""
    if raw is None or raw == "":
        return None
    try:
        k = int(raw)
    except ValueError:
        raise ValueError(f"k must be an integer between 1 and {max_k}, got {raw!r}") from None
    if not 1 <= k <= max_k:
        raise ValueError(f"k must be an integer between 1 and {max_k}, got {k}")
    return k


def register_pages(worker: WorkerApp) -> None:
    """Add the stream-knn pages to the worker's Faust web server."""
    app = worker.app
    cfg = worker.config

    def page(path: str) -> Callable[[_Handler], Any]:
        """``app.page(path)`` behind :func:`authorized`."""

        def register(handler: _Handler) -> Any:
            @functools.wraps(handler)
            async def guarded(web: Any, request: Any, *args: Any, **kwargs: Any) -> Any:
                if not authorized(request):
                    return web.json({"error": "unauthorized"}, status=401)
                return await handler(web, request, *args, **kwargs)

            return app.page(path)(guarded)

        return register

    @page("/")
    async def dashboard(web: Any, request: Any) -> Any:
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

    @page("/recommendations/{user_id}")
    @app.table_route(table=worker.profiles, match_info="user_id")
    async def recommendations(web: Any, request: Any, user_id: str) -> Any:
        try:
            k = parse_k(request.query.get("k"), cfg.serving.max_k)
        except ValueError as exc:
            return web.json({"error": str(exc)}, status=400)
        body = worker.answer(user_id, None, k, int(time.time() * 1000), trigger="http")
        return web.json(body)

    @page("/similar/{item_id}")
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
