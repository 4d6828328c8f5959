"""A lean HTTP/2 server for unary gRPC calls, for Envoy's Check and ShouldRateLimit (see server.py)."""

from quotagate.unary.connection import Abort, Context, Method
from quotagate.unary.frames import Status
from quotagate.unary.server import UnaryServer, registered_handlers

__all__ = ["Abort", "Context", "Method", "Status", "UnaryServer", "registered_handlers"]
