"""The decision port's TLS: what gRPC over TLS asks of a server (RFC 9113 9.2: TLS 1.2 or later, ALPN `h2`, no
renegotiation), and with a client CA mutual TLS, where a peer without a certificate that CA signed is refused
during the handshake, before it can send a frame."""

from __future__ import annotations

import asyncio
import logging
import ssl
from collections.abc import Callable

from quotagate.unary.limits import DecisionTls

log = logging.getLogger("quotagate.unary")


def server_context(tls: DecisionTls) -> ssl.SSLContext:
    """An SSLContext for UnaryServer.start(); raises OSError (ssl.SSLError included) for unreadable or
    mismatched files."""
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    context.minimum_version = ssl.TLSVersion.TLSv1_2
    context.options |= ssl.OP_NO_RENEGOTIATION | ssl.OP_NO_COMPRESSION
    context.load_cert_chain(tls.cert, tls.key)
    # gRPC clients (Envoy, grpc-core) refuse a TLS server that does not pick h2.
    context.set_alpn_protocols(["h2"])
    if tls.client_ca is not None:
        context.load_verify_locations(cafile=tls.client_ca)
        context.verify_mode = ssl.CERT_REQUIRED
    return context


class TlsAccept(asyncio.Protocol):
    """One connection to a TLS port: its handshake (loop.start_tls), then `connection`'s.

    asyncio's create_server(ssl=...) tells the protocol nothing of a handshake that fails, so a server counting
    its connections could never count such a one out. Here a failed handshake is start_tls's exception, and
    `finished(self, failure)` is called once either way: None just before `connection` takes over, else why
    not ("" when cancelled). This object stays in the decrypted stream's path until then: SSLProtocol may
    deliver the first bytes (the HTTP/2 preface often comes with the client's Finished) or the end before
    start_tls returns."""

    def __init__(
        self,
        connection: asyncio.Protocol,
        context: ssl.SSLContext,
        timeout: float,
        finished: Callable[[TlsAccept, str | None], None],
    ) -> None:
        self.connection = connection
        self._context, self._timeout, self._finished = context, timeout, finished
        self._raw: asyncio.Transport | None = None
        self._task: asyncio.Task[None] | None = None
        self._reported = False
        self._wrapping = False  # start_tls has the transport: connection_lost here is the decrypted stream's
        self._handed_over = False
        self._early: list[Callable[[], object]] = []  # what came for `connection` before it took over

    # The plain TCP connection (before start_tls takes it over).
    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        assert isinstance(transport, asyncio.Transport)
        self._raw = transport
        transport.pause_reading()  # the ClientHello is for start_tls
        self._task = asyncio.get_running_loop().create_task(self._handshake(transport))
        self._task.add_done_callback(self._done)

    def cancel(self) -> None:
        """Ends a handshake still under way (the server stops)."""
        if self._task is not None:
            self._task.cancel()

    async def _handshake(self, raw: asyncio.Transport) -> None:
        loop = asyncio.get_running_loop()
        self._wrapping = True
        try:
            tls = await loop.start_tls(raw, self, self._context, server_side=True, ssl_handshake_timeout=self._timeout)
        except Exception as exc:  # not TLS, no certificate or one from another CA, too slow, gone: start_tls closed it
            self._report(f"TLS handshake with {raw.get_extra_info('peername')} failed: {exc!r}")
            return
        if tls is None or tls.is_closing():
            self._report(f"{raw.get_extra_info('peername')} left right after the TLS handshake")
            return
        self._report(None)
        tls.set_protocol(self.connection)
        self._handed_over = True
        self.connection.connection_made(tls)
        for replay in self._early:
            replay()
        self._early.clear()

    def _done(self, task: asyncio.Task[None]) -> None:
        if not self._handed_over and self._raw is not None:
            self._raw.abort()  # e.g. cancelled before start_tls had the transport
        self._report("")
        if not task.cancelled() and task.exception() is not None:
            log.error("decision port: handing a TLS connection over failed", exc_info=task.exception())

    def _report(self, failure: str | None) -> None:
        if not self._reported:
            self._reported = True
            self._finished(self, failure)

    # The decrypted stream, from SSLProtocol: relayed to `connection` once it has taken over.
    def _relay(self, call: Callable[[], object]) -> None:
        if self._handed_over:
            call()
        else:  # the handshake is done, start_tls has not returned yet
            self._early.append(call)

    def data_received(self, data: bytes) -> None:
        self._relay(lambda: self.connection.data_received(data))

    def eof_received(self) -> bool | None:
        self._relay(self.connection.eof_received)
        return None

    def connection_lost(self, exc: Exception | None) -> None:
        if self._wrapping:
            self._relay(lambda: self.connection.connection_lost(exc))
        elif self._task is not None:
            self._task.cancel()  # the peer left before start_tls had the transport
