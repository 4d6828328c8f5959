"""A trivial grpc.aio Check and ext_proc server (always OK, no state): the gRPC floor quotagate is compared with.

    python bench/trivial_authz.py --port P
    python bench/trivial_authz.py --port P --unary     # the same on quotagate's unary server instead

bench_check.py --baseline starts it as its own process, like quotagate, and sends it the same load. It uses the
same server options as quotagate.server and answers with a fixed OkHttpResponse of the same shape (a few
headers and dynamic metadata), but reads no body and touches no store. Its ExternalProcessor answers every
message unchanged, asking for a JSON body BUFFERED as quotagate does, and ends the stream at the body's end:
bench_chain.py --breakdown puts an Envoy with Check and ext_proc in front of it, for the latency those two
filters add with a server that does nothing.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import signal
from collections.abc import AsyncIterator

import grpc
from envoy.config.core.v3 import base_pb2
from envoy.extensions.filters.http.ext_proc.v3 import processing_mode_pb2
from envoy.service.auth.v3 import external_auth_pb2, external_auth_pb2_grpc
from envoy.service.ext_proc.v3 import external_processor_pb2 as ext_proc_pb2
from envoy.service.ext_proc.v3 import external_processor_pb2_grpc
from google.protobuf import struct_pb2
from google.rpc import code_pb2, status_pb2

from quotagate.unary import UnaryServer


def _header(name: str, value: str) -> base_pb2.HeaderValueOption:
    return base_pb2.HeaderValueOption(
        header=base_pb2.HeaderValue(key=name, value=value),
        append_action=base_pb2.HeaderValueOption.OVERWRITE_IF_EXISTS_OR_ADD,
    )


def _response() -> external_auth_pb2.CheckResponse:
    metadata = struct_pb2.Struct()
    metadata.update({"user_id": "someone", "client": "bench", "state": "normal", "estimate": 70, "reserved": True})
    return external_auth_pb2.CheckResponse(
        status=status_pb2.Status(code=code_pb2.OK),
        ok_response=external_auth_pb2.OkHttpResponse(
            headers=[_header("x-quota-user", "someone")],
            response_headers_to_add=[_header("x-quota-state", "normal"), _header("x-quota-remaining", "1000")],
        ),
        dynamic_metadata=metadata,
    )


class TrivialAuthorization(external_auth_pb2_grpc.AuthorizationServicer):  # type: ignore[misc]
    def __init__(self) -> None:
        self._ok = _response()

    async def Check(
        self, request: external_auth_pb2.CheckRequest, context: grpc.aio.ServicerContext
    ) -> external_auth_pb2.CheckResponse:
        return self._ok


class TrivialProcessor(external_processor_pb2_grpc.ExternalProcessorServicer):  # type: ignore[misc]
    async def Process(
        self, requests: AsyncIterator[ext_proc_pb2.ProcessingRequest], context: grpc.aio.ServicerContext
    ) -> None:
        # Reader/writer style, as quotagate's own, so the same code runs on grpc.aio and on the unary server.
        while (message := await context.read()) is not grpc.aio.EOF:
            if message.observability_mode:
                if message.WhichOneof("request") == "response_body" and message.response_body.end_of_stream:
                    return  # a watched stream gets no answers; ended at the body's end, as quotagate does
                continue
            kind = message.WhichOneof("request")
            if kind == "response_headers":
                answer = ext_proc_pb2.ProcessingResponse(response_headers=ext_proc_pb2.HeadersResponse())
                answer.mode_override.response_body_mode = processing_mode_pb2.ProcessingMode.BUFFERED
                await context.write(answer)
            elif kind == "response_body":
                await context.write(ext_proc_pb2.ProcessingResponse(response_body=ext_proc_pb2.BodyResponse()))
                if message.response_body.end_of_stream:
                    return
            elif kind == "request_headers":
                await context.write(ext_proc_pb2.ProcessingResponse(request_headers=ext_proc_pb2.HeadersResponse()))
            elif kind == "request_body":
                await context.write(ext_proc_pb2.ProcessingResponse(request_body=ext_proc_pb2.BodyResponse()))
            else:
                return


async def serve_unary(port: int) -> None:
    """The same Check and ext_proc on quotagate.unary.UnaryServer: the floor of quotagate's decision port."""
    server = UnaryServer()
    server.add_servicer(external_auth_pb2_grpc.add_AuthorizationServicer_to_server, TrivialAuthorization())
    server.add_servicer(external_processor_pb2_grpc.add_ExternalProcessorServicer_to_server, TrivialProcessor())
    await server.start("127.0.0.1", port)
    await _until_signalled()
    await server.stop(grace=1)


async def _until_signalled() -> None:
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, stop.set)
    await stop.wait()


async def serve(port: int) -> None:
    server = grpc.aio.server(options=[("grpc.so_reuseport", 1), ("grpc.max_receive_message_length", 8 << 20)])
    external_auth_pb2_grpc.add_AuthorizationServicer_to_server(TrivialAuthorization(), server)
    external_processor_pb2_grpc.add_ExternalProcessorServicer_to_server(TrivialProcessor(), server)
    if server.add_insecure_port(f"127.0.0.1:{port}") == 0:
        raise OSError(f"cannot listen on 127.0.0.1:{port}")
    await server.start()
    await _until_signalled()
    await server.stop(grace=1)


def main() -> None:
    parser = argparse.ArgumentParser(description="A trivial always-OK ext_authz Check server.")
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--unary", action="store_true", help="serve Check on quotagate's unary server, not grpc.aio")
    args = parser.parse_args()
    with contextlib.suppress(KeyboardInterrupt):
        asyncio.run(serve_unary(args.port) if args.unary else serve(args.port))


if __name__ == "__main__":
    main()
