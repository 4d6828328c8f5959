"""A local HTTP server standing in for Stripe's API (Checkout Sessions only), and webhook signing as Stripe does.

It keeps the form-encoded requests it got, so tests see exactly what quotagate sent to Stripe."""

from __future__ import annotations

import hashlib
import hmac
import json
import time
import uuid
from dataclasses import dataclass, field
from typing import Any

from aiohttp import web

from quotagate.procs import free_port

WEBHOOK_SECRET = "whsec_test_secret"
SECRET_KEY = "sk_test_standin"


def sign(payload: bytes, secret: str = WEBHOOK_SECRET, timestamp: int | None = None) -> str:
    """The Stripe-Signature header: t=<unix time>,v1=HMAC-SHA256(secret, "<t>.<body>")."""
    t = int(time.time()) if timestamp is None else timestamp
    mac = hmac.new(secret.encode(), f"{t}.".encode() + payload, hashlib.sha256).hexdigest()
    return f"t={t},v1={mac}"


def event(kind: str, obj: dict[str, Any], event_id: str = "") -> bytes:
    body = {
        "id": event_id or f"evt_{kind.replace('.', '_')}_{obj.get('id', '')}",
        "object": "event",
        "api_version": "2025-01-27.acacia",
        "created": int(time.time()),
        "type": kind,
        "livemode": False,
        "data": {"object": obj},
    }
    return json.dumps(body).encode()


@dataclass
class StripeStandIn:
    port: int = field(default_factory=free_port)
    requests: list[dict[str, Any]] = field(default_factory=list)
    sessions: dict[str, dict[str, Any]] = field(default_factory=dict)
    runner: web.AppRunner | None = None

    @property
    def base_url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def settings(self, **extra: Any) -> dict[str, Any]:
        """quotagate's `stripe` config section for this stand-in (test keys), with `extra` keys added."""
        return {
            "enabled": True,
            "secret_key": SECRET_KEY,
            "webhook_secret": WEBHOOK_SECRET,
            "api_base": self.base_url,
            **extra,
        }

    async def start(self) -> StripeStandIn:
        app = web.Application()
        app.router.add_post("/v1/checkout/sessions", self._create)
        app.router.add_get("/v1/checkout/sessions/{id}", self._retrieve)
        self.runner = web.AppRunner(app, access_log=None)
        await self.runner.setup()
        await web.TCPSite(self.runner, "127.0.0.1", self.port).start()
        return self

    async def stop(self) -> None:
        if self.runner is not None:
            await self.runner.cleanup()

    async def _create(self, request: web.Request) -> web.Response:
        form = dict((await request.post()).items())
        self.requests.append({"form": form, "authorization": request.headers.get("authorization", "")})
        # Unique across the test session (ports are reused, the database is not), as Stripe's ids are.
        session_id = f"cs_test_{uuid.uuid4().hex}"
        metadata = {k[len("metadata[") : -1]: str(v) for k, v in form.items() if k.startswith("metadata[")}
        self.sessions[session_id] = {
            "id": session_id,
            "object": "checkout.session",
            "url": f"https://checkout.stripe.test/c/pay/{session_id}",
            "status": "open",
            "payment_status": "unpaid",
            "mode": form.get("mode"),
            "payment_intent": None,
            "amount_total": int(str(form["line_items[0][price_data][unit_amount]"])),
            "currency": form["line_items[0][price_data][currency]"],
            "client_reference_id": form.get("client_reference_id"),
            "customer_email": form.get("customer_email"),
            "metadata": metadata,
        }
        return web.json_response(self.sessions[session_id])

    async def _retrieve(self, request: web.Request) -> web.Response:
        found = self.sessions.get(request.match_info["id"])
        if found is None:
            error = {"type": "invalid_request_error", "code": "resource_missing", "message": "No such session"}
            return web.json_response({"error": error}, status=404)
        return web.json_response(found)

    def pay(self, session_id: str) -> dict[str, Any]:
        """The buyer paid: the session is complete and has a PaymentIntent."""
        session = self.sessions[session_id]
        session.update(status="complete", payment_status="paid", payment_intent=f"pi_{session_id}")
        return dict(session)
