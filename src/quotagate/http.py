"""The HTTP port: /healthz (process alive), /readyz (PostgreSQL and Redis reachable), /metrics, and the
user-facing routes added by the composition root."""

from __future__ import annotations

import asyncio
import json
from collections.abc import Awaitable, Callable, Sequence

from aiohttp import web
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest

from quotagate.metrics import Metrics

Probe = Callable[[], Awaitable[None]]
# Adds more routes (the user-facing pages, webhooks) to the app.
RouteSet = Callable[[web.Application], None]


def build_http_app(metrics: Metrics, probes: dict[str, Probe], extra: Sequence[RouteSet] = ()) -> web.Application:
    async def healthz(_: web.Request) -> web.Response:
        return web.json_response({"status": "ok"})

    async def readyz(_: web.Request) -> web.Response:
        results: dict[str, str] = {}
        for name, probe in probes.items():
            try:
                await asyncio.wait_for(probe(), timeout=2)
                results[name] = "ok"
            except Exception as exc:  # any failure means not ready; the reason is reported
                results[name] = f"error: {type(exc).__name__}: {exc}"[:300]
        ready = all(v == "ok" for v in results.values())
        return web.Response(
            status=200 if ready else 503,
            text=json.dumps({"ready": ready, "checks": results}),
            content_type="application/json",
        )

    async def metrics_view(_: web.Request) -> web.Response:
        body = generate_latest(metrics.registry)
        return web.Response(body=body, headers={"content-type": CONTENT_TYPE_LATEST})

    app = web.Application()
    app.router.add_get("/healthz", healthz)
    app.router.add_get("/readyz", readyz)
    app.router.add_get("/metrics", metrics_view)
    for add_routes in extra:
        add_routes(app)
    return app
