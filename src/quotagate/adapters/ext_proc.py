"""envoy.service.ext_proc.v3.ExternalProcessor: learns what each completion cost from the response itself.

One gRPC stream per HTTP request, from one of two Envoy filters (envoyconf). Most responses are only watched:
that filter runs in observability mode, so Envoy sends the response on to the client without waiting for
quotagate, and the charge lands a few milliseconds after the answer. Check sends the rest to the filter whose
answers Envoy waits for: a stream that must be asked for its usage (that stream's request is seen too), an
answer that must carry a notice, and an answer near a threshold, which waits for its charge.

The request id, user and model come from Check's metadata. The response body is read per content type (SSE
and JSON; nothing else is charged); at the body's end the reservation Check placed under the same request id is
settled, and the completion's tokens are added to the user's token rate-limit windows.

Settling starts with one Redis script that swaps the completion's hold for its cost, so the client's next request
sees the charge, when Check found the user far from every threshold and the cost is within the hold; the ledger
write follows in the background. Otherwise the ledger is written first, and a held answer waits for it.

When Check says a warned user's notice is due, the first successful completion to claim it carries it: one
more content chunk before `data: [DONE]` in a stream, or more text in the JSON message. The completion is
settled first, so the notice tells what is left after it, and the charge never includes the notice.
"""

from __future__ import annotations

import asyncio
import json
import logging
from collections.abc import AsyncIterator, Awaitable, Callable, Coroutine
from dataclasses import dataclass, field, replace
from typing import Any

import grpc
from envoy.extensions.filters.http.ext_proc.v3 import processing_mode_pb2
from envoy.service.ext_proc.v3 import external_processor_pb2 as pb
from envoy.service.ext_proc.v3 import external_processor_pb2_grpc

from quotagate.adapters.credentials import CallerToken
from quotagate.adapters.wire import read_checked
from quotagate.core.errors import QuotagateError
from quotagate.core.model import Balance
from quotagate.core.notices import NoticeFacts, notice_text
from quotagate.core.usage_capture import (
    SseUsageReader,
    Usage,
    append_to_json_content,
    ask_for_stream_usage,
    estimate_tokens,
    usage_from_json,
)
from quotagate.core.weights import weighted_cost
from quotagate.service import QuotaService, UsageReport
from quotagate.store.notices import MemoryNoticeBook, NoticeBook

log = logging.getLogger("quotagate.ext_proc")

_Mode = processing_mode_pb2.ProcessingMode
AUTHZ_NAMESPACE = "envoy.filters.http.ext_authz"  # where Envoy puts the metadata Check returned
MAX_BUFFERED_JSON = 8 << 20  # a JSON answer larger than this is charged from its estimate
BUFFERED_JSON_LIMIT = 512 << 10  # well under Envoy's default 1 MiB buffer limit
SETTLE_WAIT_SECONDS = 1.0  # under the filter's message_timeout (2 s)
COUNT_WAIT_SECONDS = 0.5  # the token rate-limit windows: a second line, never worth holding an answer long
CLAIM_WAIT_SECONDS = 0.5  # settle + claim stay under it too; a notice not claimed in time waits for the next
NOTICE_THRESHOLDS = ("warn", "critical")
# After the last answer: how long to wait for Envoy to reset the stream before ending it with a status (see
# Process). Under the 1 s Envoy waits for a status when its graceful close is on.
RESET_WAIT_SECONDS = 0.5


# Adds (user id, tokens) to the user's token rate-limit windows.
TokenCounter = Callable[[str, int], Awaitable[None]]


def header_map(headers: Any) -> dict[str, str]:
    """Envoy's HeaderMap as a dict; values come in `raw_value` (bytes) or in `value`."""
    return {h.key: h.raw_value.decode("utf-8", "replace") if h.raw_value else h.value for h in headers.headers}


@dataclass
class Exchange:
    """What one HTTP request has shown so far."""

    request_id: str = ""
    user_id: str = ""
    model: str = ""
    api: str = ""  # the API Check found (core.estimate.ApiKind); "" when nothing is metered (listing models)
    prompt_chars: int = 0
    learnt: bool = False  # Check's metadata was read (from the first message)
    watching: bool = False  # Envoy's filter in observability mode: it takes no answers and does not wait
    ask_usage: bool = False  # Check found a stream that did not ask for its usage
    plan: str = ""
    estimate: int = 0  # the hold Check placed
    settle_later: bool = False  # Check found the charge may land after the answer
    asked_usage: bool = False  # quotagate added stream_options.include_usage
    status: int = 0
    reader: SseUsageReader | None = None
    json_body: bytearray = field(default_factory=bytearray)
    usage: Usage | None = None
    settled: bool = False
    balance: Balance | None = None  # after the settlement, when quotagate settled it
    report: UsageReport | None = None  # what the completion used, once the answer has ended
    balance_wanted: bool = False  # a notice will tell the balance after the settlement, in-flight holds too
    notice: str = ""  # the threshold whose notice Check found due ("warn", "critical"), else ""
    # Set when the body reached the place for the notice: the bytes to pass before and after it.
    notice_here: bool = False
    before_notice: bytes = b""
    after_notice: bytes = b""

    @property
    def known(self) -> bool:
        # Envoy's own replies (a denial from Check, say) come without our request: nothing to charge.
        return bool(self.request_id and self.user_id)


class ExternalProcessorService(external_processor_pb2_grpc.ExternalProcessorServicer):  # type: ignore[misc]
    def __init__(
        self, service: QuotaService, notices: NoticeBook | None = None, count_tokens: TokenCounter | None = None
    ) -> None:
        self._service = service
        self._count = count_tokens
        self._chars_per_token = service.settings.estimate.chars_per_token
        self._background: set[asyncio.Task[None]] = set()
        self._notices: NoticeBook = notices if notices is not None else MemoryNoticeBook()
        self._notices_on = service.settings.notices.in_conversation
        self._callers = CallerToken(service.settings.envoy_token, "ext_proc", "QUOTAGATE_ENVOY_TOKEN", service.metrics)

    async def Process(
        self, request_iterator: AsyncIterator[pb.ProcessingRequest], context: grpc.aio.ServicerContext
    ) -> None:
        await self._callers.require(context)  # Envoy's token, before any message is read
        # Reads and writes through the context (not a generator grpc drives) so that the last write can be
        # shielded from the reset that follows it: see _answer_last.
        exchange = Exchange()
        try:
            # context.read(), not the iterator: see wire.read_checked.
            while (message := await read_checked(context)) is not None:
                response, done = self._handle(exchange, message)
                if exchange.watching:
                    if done:
                        await self._watched_to_the_end(exchange)
                        return  # ends the stream (Envoy keeps a watched stream open until then)
                    continue
                if exchange.notice_here:
                    await self._add_notice(exchange, response)
                if not done:
                    await context.write(response)
                    continue
                # The tokens go into the rate-limit windows alongside, so the next request is limited on them.
                counting = self._spawn(self._count_tokens(exchange)) if self._count is not None else None
                if not await self._charged_ahead(exchange):
                    # Near a threshold, or costlier than its hold: settle before the last answer, so the client's
                    # next request already sees the ledger's figures (a slow ledger is waited for only briefly;
                    # the rest runs on).
                    settling = self._spawn(self._settle(exchange))
                    await asyncio.wait({settling}, timeout=SETTLE_WAIT_SECONDS)
                if counting is not None:
                    await asyncio.wait({counting}, timeout=COUNT_WAIT_SECONDS)
                await self._answer_last(context, response)
                break
            else:
                return  # the client half-closed before the body's end: it waits for the status
        finally:
            # At the body's end, or when the client went away (or Envoy gave up) before it: charge what was
            # seen. A task of its own, because Envoy cancels this stream once it has the last answer.
            self._spawn(self._settle(exchange))
        # Envoy half-closes and resets the stream as soon as it has the last answer. A status sent now would race
        # that reset, and grpc.aio never frees a batch that fails on a reset call (grpc#43360): a third to a half
        # of the streams left their status batch behind, and the heap fragmented around those leftovers (the
        # soak's RSS growth). So wait for the reset, which cancels this handler with no batch of ours in flight.
        # A client that waits for the status instead gets it after this pause, and returning ends the stream.
        await asyncio.sleep(RESET_WAIT_SECONDS)

    async def _watched_to_the_end(self, ex: Exchange) -> None:
        """The end of a watched response (observability mode): the client has it already, so nothing waits
        here but the swap of the hold for the cost, which makes the client's next request see the charge as
        soon as possible; the token windows and the ledger follow in the background (the finally in Process)."""
        if self._count is not None:
            self._spawn(self._count_tokens(ex))
        await self._charged_ahead(ex)

    async def _answer_last(self, context: grpc.aio.ServicerContext, response: pb.ProcessingResponse) -> None:
        """Writes the last answer, shielded: Envoy's reset can arrive before grpc reports the write done, and a
        write cancelled then would leave its batch unfreed (grpc#43360, ~6% of streams)."""
        await asyncio.shield(self._spawn(context.write(response)))

    async def drain(self) -> None:
        """Waits for the settlements still running (at shutdown, after the server stopped taking calls)."""
        if self._background:
            await asyncio.gather(*self._background, return_exceptions=True)

    def _spawn(self, coroutine: Coroutine[Any, Any, None]) -> asyncio.Task[None]:
        task = asyncio.get_running_loop().create_task(coroutine)
        self._background.add(task)
        task.add_done_callback(self._background.discard)
        return task

    def _learn(self, ex: Exchange, message: pb.ProcessingRequest) -> None:
        """Takes what Check found (request id, user, model, ...) from the metadata Envoy forwards with the
        stream's first message: the request headers, or, where ext_proc does not see the request, the response
        headers. Envoy's own replies to a request Check refused carry none: nothing to charge there."""
        ex.learnt = True
        ex.watching = message.observability_mode
        check = message.metadata_context.filter_metadata.get(AUTHZ_NAMESPACE)
        if check is None:
            return
        fields = check.fields
        ex.request_id = fields["request_id"].string_value if "request_id" in fields else ""
        ex.user_id = fields["user_id"].string_value if "user_id" in fields else ""
        ex.model = fields["model"].string_value if "model" in fields else ""
        ex.api = fields["api"].string_value if "api" in fields else ""
        ex.prompt_chars = int(fields["prompt_chars"].number_value) if "prompt_chars" in fields else 0
        ex.plan = fields["plan"].string_value if "plan" in fields else ""
        ex.estimate = int(fields["estimate"].number_value) if "estimate" in fields else 0
        ex.settle_later = "settle_later" in fields and fields["settle_later"].bool_value
        ex.ask_usage = "ask_usage" in fields and fields["ask_usage"].bool_value
        notice = fields["notice"].string_value if "notice" in fields else ""
        # A watched response cannot be added to (Check sends those with a notice due to the other route).
        ex.notice = notice if self._notices_on and notice in NOTICE_THRESHOLDS and not ex.watching else ""

    def _handle(self, ex: Exchange, message: pb.ProcessingRequest) -> tuple[pb.ProcessingResponse, bool]:
        if not ex.learnt:
            self._learn(ex, message)
            if ex.known:
                # Envoy went on with the request after Check: its hold is charged if it ever expires unsettled
                # (one that never gets here is released then). Not waited for: Envoy need not wait for it.
                self._spawn(self._service.mark_forwarded(ex.request_id))
        kind = message.WhichOneof("request")
        if kind == "request_headers":
            answer = pb.ProcessingResponse(request_headers=pb.HeadersResponse())
            if ex.known and ex.ask_usage:
                # Only then is the request body worth a round trip: to ask the stream for its usage. The body
                # grows, and Envoy checks a content-length it still has against the changed body before it
                # applies the new one: take it out here, the body's answer sets it again.
                answer.mode_override.request_body_mode = _Mode.BUFFERED
                answer.request_headers.response.header_mutation.remove_headers.append("content-length")
            return answer, False
        if kind == "request_body":
            return pb.ProcessingResponse(request_body=self._request_body(ex, message.request_body.body)), False
        if kind == "response_headers":
            answer, done = self._response_headers(ex, header_map(message.response_headers.headers))
            # A watched response without a body is over here (a held one gets its body mode NONE then).
            return answer, done or (ex.watching and message.response_headers.end_of_stream)
        if kind == "response_body":
            body = message.response_body
            return self._response_body(ex, body.body, body.end_of_stream)
        # Trailers are not asked for; answer anything else without a change.
        return _empty_answer(kind), False

    def _request_body(self, ex: Exchange, body: bytes) -> pb.BodyResponse:
        # Asked for only when Check said the stream must be asked for its usage; model and prompt size came
        # with Check's metadata already.
        changed = ask_for_stream_usage(body) if ex.known else None
        if changed is None:
            return pb.BodyResponse()
        ex.asked_usage = True
        return pb.BodyResponse(
            response=pb.CommonResponse(
                body_mutation=pb.BodyMutation(body=changed),
                header_mutation=pb.HeaderMutation(
                    set_headers=[_raw_header("content-length", str(len(changed)))],
                ),
            )
        )

    def _response_headers(self, ex: Exchange, headers: dict[str, str]) -> tuple[pb.ProcessingResponse, bool]:
        ex.status = int(headers.get(":status", "0") or 0)
        content_type = headers.get("content-type", "").split(";")[0].strip().lower()
        answer = pb.ProcessingResponse(response_headers=pb.HeadersResponse())
        if not ex.known or ex.status >= 400:
            mode = _Mode.NONE  # nothing to read: errors are not charged
        elif content_type == "text/event-stream":
            mode = _Mode.STREAMED
            ex.reader = SseUsageReader(hide_usage=ex.asked_usage, hold_done=bool(ex.notice))
            if ex.reader.rewrites:
                # The body is rewritten (the usage the client did not ask for is taken out, a notice added).
                answer.response_headers.response.header_mutation.remove_headers.append("content-length")
        elif content_type == "application/json":
            # BUFFERED hands over the whole body at once; a large or unsized body (big embeddings, say) is
            # streamed instead, since Envoy's buffer limit would turn it into an error for the client.
            length = headers.get("content-length", "")
            small = length.isdigit() and int(length) <= BUFFERED_JSON_LIMIT
            mode = _Mode.BUFFERED if small else _Mode.STREAMED
            if not small:
                ex.notice = ""  # a streamed JSON body cannot be added to; the next completion carries it
        else:
            mode = _Mode.NONE
        answer.mode_override.response_body_mode = mode
        return answer, mode == _Mode.NONE

    def _response_body(self, ex: Exchange, chunk: bytes, end: bool) -> tuple[pb.ProcessingResponse, bool]:
        if ex.reader is not None:
            passed = ex.reader.feed(chunk)
            if end:
                passed += ex.reader.finish()
            if ex.reader.done_seen or end:
                ex.usage = ex.reader.usage
            held = ex.reader.release()
            if ex.notice and (ex.reader.done_seen or end):
                # The stream's last content went by: the notice goes here, before [DONE] (_add_notice).
                ex.notice_here, ex.before_notice, ex.after_notice = True, passed, held
            passed += held
            body = pb.BodyResponse()
            if ex.reader.rewrites and passed != chunk:
                body.response.body_mutation.body = passed
            return pb.ProcessingResponse(response_body=body), end
        if len(ex.json_body) + len(chunk) <= MAX_BUFFERED_JSON:
            ex.json_body += chunk
        if end:
            ex.usage = usage_from_json(bytes(ex.json_body))
            if ex.notice:
                ex.notice_here = True
        return pb.ProcessingResponse(response_body=pb.BodyResponse()), end

    async def _add_notice(self, ex: Exchange, response: pb.ProcessingResponse) -> None:
        """Puts the due notice into this body response, if this completion wins its claim."""
        ex.notice_here = False
        threshold, ex.notice = ex.notice, ""  # one try per completion
        text = await self._claimed_notice(ex, threshold)
        if not text:
            return
        body = response.response_body.response
        if ex.reader is not None:
            body.body_mutation.body = ex.before_notice + ex.reader.chunk_event(text) + ex.after_notice
            return
        changed = append_to_json_content(bytes(ex.json_body), text)
        if changed is None:
            return
        body.body_mutation.body = changed
        # BUFFERED: the headers still wait for this answer, so the length can be set to match.
        body.header_mutation.set_headers.append(_raw_header("content-length", str(len(changed))))

    async def _claimed_notice(self, ex: Exchange, threshold: str) -> str:
        if not ex.known or not ex.api or ex.status >= 300:
            return ""
        # A tool call (or anything but a plain answer) is not added to: the next completion carries the notice.
        if ex.reader is not None and (ex.reader.ended_with_tools or not ex.reader.completion_id):
            return ""  # (no completion chunk was understood: compressed or not OpenAI's format)
        if ex.reader is None and append_to_json_content(bytes(ex.json_body), "") is None:
            return ""
        # Settle now (the body is complete), so the notice tells what is left after this completion.
        ex.balance_wanted = True
        settling = self._spawn(self._settle(ex))
        await asyncio.wait({settling}, timeout=SETTLE_WAIT_SECONDS)
        balance = ex.balance
        if balance is None:
            return ""
        now = self._service.clock.now()
        try:
            won = await asyncio.wait_for(
                self._notices.claim(ex.user_id, balance.cycle, threshold, ex.request_id, now), CLAIM_WAIT_SECONDS
            )
        except (QuotagateError, TimeoutError) as exc:
            log.warning("notice not claimed: %s", exc, extra={"request_id": ex.request_id, "user_id": ex.user_id})
            return ""
        except Exception:  # the answer goes on without the notice, whatever went wrong with it
            log.exception("notice not claimed", extra={"request_id": ex.request_id, "user_id": ex.user_id})
            return ""
        if not won:
            return ""
        links = self._service.links
        settings = self._service.settings
        facts = NoticeFacts(
            threshold=threshold,
            used_fraction=balance.used_fraction,
            remaining=balance.remaining,
            resets_at=balance.resets_at,
            purchase_url=links.purchase_url(ex.user_id, now),
            balance_url=links.balance_url(ex.user_id, now),
        )
        return notice_text(facts, settings.language, settings.timezone)

    async def _charged_ahead(self, ex: Exchange) -> bool:
        """Whether the last answer may go before the ledger write (which then runs on in the background).

        Only when Check found the user far from every threshold and the completion cost no more than its hold;
        then the cost replaces the hold in Redis first (one script), so the client's next request already sees
        the charge. Near a threshold the client waits for the ledger (a few milliseconds), so that what the
        ledger decides there (grants drawn, e-mails, notices) is settled before anything else happens."""
        if not ex.settle_later or not ex.known or not ex.api or ex.status >= 400:
            return False
        report = self._report(ex)
        cost = weighted_cost(report.prompt_tokens, report.completion_tokens, self._service.weight(ex.plan, ex.model))
        if cost > ex.estimate:
            return False
        return await self._service.charge_ahead(ex.request_id, cost)

    async def _count_tokens(self, ex: Exchange) -> None:
        """Adds the tokens the completion used to the user's token rate-limit windows. Done here rather than by
        a second rate-limit call from Envoy when the stream is done: that call cost as much as a Check."""
        if self._count is None or not ex.known or not ex.api or ex.status >= 400:
            return
        report = self._report(ex)
        tokens = report.prompt_tokens + report.completion_tokens
        if tokens <= 0:
            return
        try:
            await self._count(ex.user_id, tokens)
        except Exception as exc:  # a rate limit is a second line: the answer goes on
            log.warning("tokens not counted for rate limits: %s", exc, extra={"request_id": ex.request_id})

    async def _settle(self, ex: Exchange) -> None:
        if not ex.known or not ex.api or ex.settled:
            return  # only metered requests (Check named their API) were reserved and are charged
        if not ex.status:
            # No answer was seen (the client or Envoy gave up while the upstream worked): nothing tells what it
            # cost, so the hold stays and is charged its estimate when it expires, never a guess from the prompt.
            return
        ex.settled = True
        report = self._report(ex)
        try:
            # The balance is read only for a notice (which must tell what is left now).
            _, ex.balance = await self._service.report_usage(report, in_flight=ex.balance_wanted)
        except QuotagateError as exc:
            # The reservation stays and is charged at its estimate when it expires: never silently free.
            log.warning("usage not settled: %s", exc, extra={"request_id": ex.request_id, "user_id": ex.user_id})
        except Exception:
            log.exception("usage not settled", extra={"request_id": ex.request_id, "user_id": ex.user_id})

    def _report(self, ex: Exchange) -> UsageReport:
        """What the completion used, read once: every caller (the swap before the last answer, the token
        windows, the settlement) runs when no more of the answer will come."""
        if ex.report is None:
            ex.report = self._read_report(ex)
        return ex.report

    def _read_report(self, ex: Exchange) -> UsageReport:
        base = UsageReport(ex.request_id, ex.user_id, ex.model, 0, 0, source="ext_proc")
        if ex.status >= 400:
            return replace(base, succeeded=False)
        if ex.usage is not None:
            return replace(base, prompt_tokens=ex.usage.prompt_tokens, completion_tokens=ex.usage.completion_tokens)
        # No usage from the upstream, or the answer was cut short: estimate from what was seen, at least 1.
        streamed = ex.reader.content_chars if ex.reader is not None else _json_content_chars(bytes(ex.json_body))
        prompt = estimate_tokens(ex.prompt_chars, self._chars_per_token)
        completion = max(estimate_tokens(streamed, self._chars_per_token), 0 if prompt else 1)
        if streamed == 0:
            # Not a word of the answer understood (a shape quotagate does not read): at least the estimate floor.
            completion = max(completion, self._service.settings.estimate.minimum - prompt)
        return replace(base, prompt_tokens=prompt, completion_tokens=completion, estimated=True)


def _raw_header(name: str, value: str) -> Any:
    from envoy.config.core.v3 import base_pb2

    # ext_proc takes header values in raw_value; `value` ends up empty (ENVOY-NOTES).
    return base_pb2.HeaderValueOption(header=base_pb2.HeaderValue(key=name, raw_value=value.encode()))


def _empty_answer(kind: str | None) -> pb.ProcessingResponse:
    if kind == "request_trailers":
        return pb.ProcessingResponse(request_trailers=pb.TrailersResponse())
    return pb.ProcessingResponse(response_trailers=pb.TrailersResponse())


def _json_content_chars(body: bytes) -> int:
    try:
        data = json.loads(body)
    except (UnicodeDecodeError, ValueError, RecursionError):
        return 0
    chars = 0
    if isinstance(data, dict) and isinstance(data.get("choices"), list):
        for choice in data["choices"]:
            message = choice.get("message") if isinstance(choice, dict) else None
            if isinstance(message, dict) and isinstance(message.get("content"), str):
                chars += len(message["content"])
    return chars
