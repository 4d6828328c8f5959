"""A lean HTTP/2 gRPC server for what Envoy calls: Check, ShouldRateLimit, ext_proc (see server.py)."""

from quotagate.unary.calls import Abort, Context, Method, StreamContext
from quotagate.unary.frames import Status
from quotagate.unary.server import UnaryServer, registered_handlers

__all__ = ["Abort", "Context", "Method", "Status", "StreamContext", "UnaryServer", "registered_handlers"]
