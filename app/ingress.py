"""OpenAI-compatible ingress (FastAPI through Ray Serve) and the application builder for serve_config.yaml.

Per request: validate (schemas + SamplingParams), resolve the SLO class to absolute targets, call the replica
deployment through a streaming handle (the SLO router picks the replica from the ``tpot_slo_ms`` kwarg),
wait for the replica's "accepted" message before answering (so bad prompts become 400s, not broken streams),
then relay tokens as SSE chunks or one JSON body.

Errors are OpenAI-shaped ``{"error": {"message", "type", "param", "code"}}``: 400 for the client's mistakes
(FastAPI's validation handler is replaced so that schema errors are 400, not 422), 404 for an unknown model,
429 when the replica's admission queue is full or Serve pushes back, 503 when no replica answers in time or
replicas are unavailable. If the client goes away, the call to the replica is cancelled, and the replica
aborts the request, freeing its KV blocks.
"""

# No `from __future__ import annotations`: FastAPI must see real classes on the endpoints that Serve rewrites.
import asyncio
import codecs
import hmac
import json
import logging
import math
import os
import statistics
import threading
import time
from typing import Any, AsyncIterator

import ray
from fastapi import FastAPI, HTTPException, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response, StreamingResponse
from starlette.exceptions import HTTPException as StarletteHTTPException
from ray import serve
from ray.serve.exceptions import BackPressureError, DeploymentUnavailableError, ReplicaUnavailableError
from ray.serve.handle import DeploymentHandle

from app.autoscaling import ScalingBoardReader
from app.config import AppSettings, ResolvedSLO, SLOError, needs_baseline, resolve_slo
from app.engine.config import SamplingParams  # light: dataclasses only, no torch
from app.metrics import CONTENT_TYPE, ServeMetrics, latest_replica_stats
from app.replica import LLMReplica
from app.schemas import (ChatChoice, ChatChunkChoice, ChatCompletionChunk, ChatLogprobs, CompletionLogprobs, ChatCompletionRequest,
                         ChatCompletionResponse, ChatMessageOut, CompletionChoice, CompletionRequest,
                         CompletionResponse, DeltaMessage, ErrorBody, ErrorResponse, ModelCard, ModelList,
                         SLOReport, Usage, dump, new_id, param_from_message)

logger = logging.getLogger("ray.serve")

_ERROR_TYPES = {400: "invalid_request_error", 401: "invalid_request_error", 404: "invalid_request_error",
                405: "invalid_request_error", 413: "invalid_request_error", 429: "rate_limit_error",
                500: "server_error", 503: "service_unavailable"}
API_KEY_ENV = "ADASERVE_API_KEY"  # one key or a comma-separated list, in the environment of `serve run`


class APIError(Exception):
    def __init__(self, status: int, message: str, param: str | None = None, code: str | None = None,
                 retry_after_s: float | None = None):
        super().__init__(message)
        self.status, self.message, self.param, self.code = status, message, param, code
        self.retry_after_s = retry_after_s

    def body(self) -> dict[str, Any]:
        return ErrorResponse(error=ErrorBody(message=self.message, type=_ERROR_TYPES.get(self.status, "error"),
                                             param=self.param, code=self.code)).model_dump()

    def response(self) -> JSONResponse:
        headers = None if self.retry_after_s is None else {"Retry-After": str(max(1, math.ceil(self.retry_after_s)))}
        return JSONResponse(self.body(), status_code=self.status, headers=headers)

    @classmethod
    def from_message(cls, msg: dict[str, Any]) -> "APIError":
        """A replica's error message."""
        return cls(msg["status"], msg["message"], msg.get("param"), msg.get("code"), msg.get("retry_after_s"))


def error_from_handle_exception(exc: BaseException) -> APIError:
    """Map what a DeploymentHandle call raises to the client-facing status."""
    if isinstance(exc, BackPressureError):
        return APIError(429, "the server is overloaded (too many queued requests); retry later")
    if isinstance(exc, (asyncio.TimeoutError, TimeoutError)):
        return APIError(503, "no healthy replica answered in time")
    if isinstance(exc, (DeploymentUnavailableError, ReplicaUnavailableError, ray.exceptions.RayActorError,
                        ray.exceptions.ActorUnavailableError)):
        return APIError(503, "no healthy replica is available")
    if isinstance(exc, StopAsyncIteration):
        return APIError(503, "the replica closed the stream without answering")
    return APIError(500, "internal error while serving the request")


_REPLICA_GONE = (ReplicaUnavailableError, ray.exceptions.RayActorError, ray.exceptions.ActorUnavailableError)
_ENDPOINTS = {"/v1/chat/completions": "chat", "/v1/completions": "completion"}
fastapi_app = FastAPI(title="adaserve", description="OpenAI-compatible, SLO-aware LLM serving")


@fastapi_app.exception_handler(RequestValidationError)
async def _validation_error(request: Request, exc: RequestValidationError) -> JSONResponse:
    """OpenAI answers schema errors with 400 and a readable message naming the parameter."""
    err = exc.errors()[0] if exc.errors() else {"loc": (), "msg": "invalid request"}
    metrics = getattr(request.app.state, "metrics", None)
    if metrics is not None:
        metrics.requests.labels(_ENDPOINTS.get(request.url.path, "other"), "400").inc()
    if err.get("type") == "json_invalid":  # loc is the character offset here, not a field
        reason = (err.get("ctx") or {}).get("error", "")
        return APIError(400, f"could not parse the request body as JSON ({reason})" if reason else
                        "could not parse the request body as JSON").response()
    loc = [str(p) for p in err.get("loc", ()) if p != "body"]
    msg = str(err.get("msg", "invalid request")).removeprefix("Value error, ")
    param = loc[0] if loc else None
    where = ".".join(loc)
    return APIError(400, f"{where}: {msg}" if where else msg, param).response()


@fastapi_app.exception_handler(APIError)
async def _api_error(_: Request, exc: APIError) -> JSONResponse:
    return exc.response()


@fastapi_app.exception_handler(StarletteHTTPException)
async def _http_error(request: Request, exc: StarletteHTTPException) -> JSONResponse:
    """The framework's own errors (unknown route, wrong method, a body that is not JSON) in OpenAI's shape."""
    if exc.status_code == 404:
        message = f"Invalid URL ({request.method} {request.url.path})"
    elif exc.status_code == 405:
        message = f"method {request.method} is not allowed on {request.url.path}"
    elif exc.status_code == 400:
        message = "could not parse the request body as JSON"
    else:
        message = str(exc.detail)
    err = APIError(exc.status_code, message)
    response = err.response()
    for key, value in (exc.headers or {}).items():  # e.g. Allow on a 405
        response.headers[key] = value
    return response


def _api_keys() -> frozenset[str]:
    return frozenset(k.strip() for k in os.environ.get(API_KEY_ENV, "").split(",") if k.strip())


class GuardMiddleware:
    """Runs before FastAPI parses anything: the body-size limit (413) and the API key (401), as plain ASGI so that
    an oversized body is refused while it streams in, not after it was buffered. Reads its settings from
    ``app.state`` (set by the ingress at start): ``max_body_bytes``, ``api_keys``, ``metrics_require_api_key``."""

    def __init__(self, app: Any):
        self.app = app

    async def __call__(self, scope: dict, receive: Any, send: Any) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        state = scope["app"].state if "app" in scope else fastapi_app.state
        path = scope.get("path", "")
        headers = dict(scope.get("headers") or [])
        keys: frozenset[str] = getattr(state, "api_keys", frozenset())
        needs_key = path.startswith("/v1/") or (path == "/metrics" and getattr(state, "metrics_require_api_key", False))
        if keys and needs_key:
            err = _check_api_key(headers.get(b"authorization"), keys)
            if err is not None:
                await err.response()(scope, receive, send)
                return
        limit = int(getattr(state, "max_body_bytes", 0) or 0)
        if not limit:
            await self.app(scope, receive, send)
            return
        length = headers.get(b"content-length")
        if length is not None and length.isdigit() and int(length) > limit:
            await _too_large(limit).response()(scope, receive, send)
            return
        received = 0

        async def limited_receive() -> dict:
            nonlocal received
            message = await receive()
            if message["type"] == "http.request":
                received += len(message.get("body", b""))
                if received > limit:  # FastAPI re-raises an HTTPException from body reading to its handlers
                    raise HTTPException(413, detail=_too_large(limit).message)
            return message

        await self.app(scope, limited_receive, send)


def _too_large(limit: int) -> APIError:
    return APIError(413, f"the request body is larger than this server's limit of {limit} bytes")


def _check_api_key(header: bytes | None, keys: frozenset[str]) -> APIError | None:
    if not header:
        return APIError(401, "You didn't provide an API key. Send it in an Authorization header using Bearer auth "
                             "(Authorization: Bearer YOUR_KEY).", code="missing_api_key")
    scheme, _, token = header.decode("latin-1").partition(" ")
    token = token.strip()
    if scheme.lower() != "bearer" or not any(hmac.compare_digest(token.encode(), k.encode()) for k in keys):
        return APIError(401, "Incorrect API key provided.", code="invalid_api_key")
    return None


fastapi_app.add_middleware(GuardMiddleware)


def _sse(payload: dict[str, Any]) -> str:
    return f"data: {json.dumps(payload, separators=(',', ':'))}\n\n"


class _Relay:
    """Relays one accepted request's replica messages to the client, then records its metrics."""

    def __init__(self, ingress: "OpenAIIngress", endpoint: str, body: Any, slo: ResolvedSLO, request_id: str,
                 gen: Any, prompt_tokens: int):
        self.ingress, self.endpoint, self.body, self.slo = ingress, endpoint, body, slo
        self.request_id, self.gen, self.prompt_tokens = request_id, gen, prompt_tokens
        self.model = ingress.settings.served_model_name
        self.created = int(time.time())
        self.num_tokens = 0
        self._text_chars = 0  # completion logprobs' text_offset so far, decoding the tokens' bytes incrementally
        self._utf8 = codecs.getincrementaldecoder("utf-8")(errors="replace")
        self.finished = False
        self.closed = False

    def close(self) -> None:
        """Idempotent: stop counting this request as in flight; cancel the replica call unless it finished
        (the replica then aborts the request and frees its KV blocks)."""
        if self.closed:
            return
        self.closed = True
        self.ingress.metrics.in_flight.dec()
        if not self.finished:
            self.gen.cancel()
            self.ingress.metrics.aborted.inc()

    async def messages(self) -> AsyncIterator[dict[str, Any]]:
        """Replica messages until the final one; always cancels the replica call if we stop early."""
        metrics = self.ingress.metrics
        try:
            async for msg in self.gen:
                if msg["type"] == "error":
                    if msg.get("code") == "slo_unattainable":
                        metrics.observe_rejected(self.slo.slo_class, msg.get("reason"))
                    raise APIError.from_message(msg)
                self.num_tokens += len(msg["token_ids"])
                metrics.generation_tokens.inc(len(msg["token_ids"]))
                yield msg
                if msg["finished"]:
                    self.finished = True
                    metrics.observe_finished(self.slo.slo_class, msg.get("metrics"))
                    return
            raise APIError(503, "the replica ended the stream early")
        finally:
            self.close()

    def usage(self) -> Usage:
        return Usage(prompt_tokens=self.prompt_tokens, completion_tokens=self.num_tokens,
                     total_tokens=self.prompt_tokens + self.num_tokens)

    def slo_report(self, metrics: dict[str, Any] | None) -> SLOReport:
        m = metrics or {}
        attained = m.get("slo_attained")
        missed = None if attained is None else [k for k in ("ttft", "tpot") if m.get(f"{k}_attained") is False]
        return SLOReport(slo_class=self.slo.slo_class, tpot_slo_ms=self.slo.tpot_slo_ms,
                         ttft_slo_ms=m.get("ttft_slo_ms", self.slo.ttft_slo_ms),  # relative TTFTs resolve on the replica
                         ttft_ms=None if m.get("ttft_s") is None else m["ttft_s"] * 1e3,
                         tpot_ms=None if m.get("tpot_s") is None else m["tpot_s"] * 1e3,
                         attained=attained, missed=missed)

    def _logprobs(self, entries: list[dict[str, Any]]) -> ChatLogprobs | CompletionLogprobs | None:
        """The request's logprobs in its endpoint's shape (the replica sends chat entries), None if not asked."""
        if self.body.num_top_logprobs() is None:
            return None
        if self.endpoint == "chat":
            return ChatLogprobs(content=entries)
        offsets = []
        for e in entries:  # character offsets in the completion text, from the tokens' bytes
            offsets.append(self._text_chars)
            self._text_chars += len(self._utf8.decode(bytes(e["bytes"] or b"")))
        return CompletionLogprobs(tokens=[e["token"] for e in entries],
                                  token_logprobs=[e["logprob"] for e in entries],
                                  top_logprobs=[{t["token"]: t["logprob"] for t in e["top_logprobs"]} for e in entries],
                                  text_offset=offsets)

    async def whole(self) -> Response:
        parts: list[str] = []
        entries: list[dict[str, Any]] = []
        last: dict[str, Any] = {}
        try:
            async for msg in self.messages():
                parts.append(msg["text"])
                entries += msg.get("logprobs") or []
                last = msg
        except APIError as err:
            return self.ingress._fail(self.endpoint, err)
        except Exception as exc:  # noqa: BLE001
            return self.ingress._fail(self.endpoint, error_from_handle_exception(exc))
        text, reason = "".join(parts), last.get("finish_reason")
        slo = self.slo_report(last.get("metrics"))
        if self.endpoint == "chat":
            resp: Any = ChatCompletionResponse(id=self.request_id, created=self.created, model=self.model,
                                               choices=[ChatChoice(message=ChatMessageOut(content=text),
                                                                   finish_reason=reason,
                                                                   logprobs=self._logprobs(entries))],
                                               usage=self.usage(), slo=slo)
        else:
            resp = CompletionResponse(id=self.request_id, created=self.created, model=self.model,
                                      choices=[CompletionChoice(text=text, finish_reason=reason,
                                                                logprobs=self._logprobs(entries))],
                                      usage=self.usage(), slo=slo)
        self.ingress.metrics.requests.labels(self.endpoint, "200").inc()
        return JSONResponse(dump(resp))

    def _chunk(self, text: str | None, reason: str | None, slo: SLOReport | None, first: bool = False,
               logprobs: list[dict[str, Any]] | None = None) -> dict:
        lp = self._logprobs(logprobs) if logprobs is not None else None
        if self.endpoint == "chat":
            delta = DeltaMessage(role="assistant" if first else None, content=text)
            return dump(ChatCompletionChunk(id=self.request_id, created=self.created, model=self.model,
                                            choices=[ChatChunkChoice(delta=delta, finish_reason=reason, logprobs=lp)],
                                            slo=slo))
        return dump(CompletionResponse(id=self.request_id, created=self.created, model=self.model,
                                       choices=[CompletionChoice(text=text or "", finish_reason=reason, logprobs=lp)],
                                       slo=slo))

    async def sse(self) -> AsyncIterator[str]:
        status = "200"
        try:
            if self.endpoint == "chat":
                yield _sse(self._chunk("", None, None, first=True))
            async for msg in self.messages():
                final = msg["finished"]
                if msg["text"] or final or msg.get("logprobs"):
                    slo = self.slo_report(msg.get("metrics")) if final else None
                    yield _sse(self._chunk(msg["text"], msg["finish_reason"] if final else None, slo,
                                           logprobs=msg.get("logprobs")))
            if self.body.include_usage_in_stream:
                usage_chunk = self._chunk(None, None, None)
                usage_chunk["choices"], usage_chunk["usage"] = [], self.usage().model_dump()
                yield _sse(usage_chunk)
        except APIError as err:  # headers are gone: report in-band, as OpenAI does
            status = str(err.status)
            yield _sse(err.body())
        except Exception as exc:  # noqa: BLE001
            err = error_from_handle_exception(exc)
            status = str(err.status)
            yield _sse(err.body())
        finally:
            self.close()  # also when the client went away while we waited to send (CancelledError here)
            if status == "200" and not self.finished:
                status = "499"  # client closed the stream
            self.ingress.metrics.requests.labels(self.endpoint, status).inc()
        yield "data: [DONE]\n\n"


@serve.deployment(name="OpenAIIngress", max_ongoing_requests=256, ray_actor_options={"num_cpus": 0.1})
@serve.ingress(fastapi_app)
class OpenAIIngress:
    def __init__(self, replica: DeploymentHandle, settings: dict[str, Any] | AppSettings):
        self.settings = settings if isinstance(settings, AppSettings) else AppSettings.model_validate(settings)
        self.replica = replica
        self.stream_replica = replica.options(stream=True)
        self.metrics = ServeMetrics(latest_replica_stats)
        fastapi_app.state.metrics = self.metrics  # for the schema-error handler, which has no `self`
        self._scaling_board = ScalingBoardReader()  # the autoscaler's last decision, for /metrics
        fastapi_app.state.max_body_bytes = self.settings.limits.max_body_bytes  # for GuardMiddleware
        fastapi_app.state.api_keys = _api_keys()
        fastapi_app.state.metrics_require_api_key = self.settings.metrics_require_api_key
        if fastapi_app.state.api_keys:
            logger.info("API keys required on /v1/* (%d configured in %s)", len(fastapi_app.state.api_keys),
                        API_KEY_ENV)
        self._cached_baseline_s: float | None = None
        self._starting_probe: asyncio.Task | None = None
        threading.Thread(target=self._announce_ready, name="adaserve-ready", daemon=True).start()

    def _announce_ready(self) -> None:
        """Log one line once a replica has loaded the model and measured its unloaded TPOT: where to send requests.
        A thread, because it blocks on the replica (minutes on a cold start) and the constructor must return."""
        try:
            tpot_s = self.replica.get_unloaded_tpot_s.remote().result(timeout_s=3600)
        except Exception as exc:  # noqa: BLE001 - the replica's own logs say why it did not start
            logger.warning("no replica became ready: %s", exc)
            return
        url = "http://<host>:<port>"
        try:
            http = serve.context._get_global_client().http_config
            host = "127.0.0.1" if http.host in ("0.0.0.0", "::") else http.host
            url = f"http://{host}:{http.port}"
        except Exception:  # noqa: BLE001 - the line is still useful without the address
            pass
        key = " (API key required)" if fastapi_app.state.api_keys else ""
        logger.info("adaserve ready: %s/v1 serves %s, unloaded TPOT %.1f ms%s", url,
                    self.settings.served_model_name, tpot_s * 1e3, key)

    # ---- plain endpoints ------------------------------------------------------------------------------------
    @fastapi_app.get("/health")
    async def health(self) -> JSONResponse:
        """Answers at once: 200 only while a replica reports itself healthy; 503 ``starting`` until a replica has
        reported (the ingress is up long before a model is loaded), 503 ``no healthy replica`` after."""
        stats = latest_replica_stats()
        healthy = sum(bool(s.get("healthy", True)) for s in stats.values())
        body = {"replicas_reporting": len(stats), "replicas_healthy": healthy}
        if not stats:
            self._start_probe()  # replicas report through the router, which exists after the first call
            return JSONResponse({"status": "starting", **body}, status_code=503)
        if not healthy:
            return JSONResponse({"status": "no healthy replica", **body}, status_code=503)
        return JSONResponse({"status": "ok", **body})

    def _start_probe(self) -> None:
        if self._starting_probe is None or self._starting_probe.done():
            self._starting_probe = asyncio.ensure_future(self._unloaded_tpot_s())
            self._starting_probe.add_done_callback(lambda t: t.cancelled() or t.exception())  # no "never retrieved"

    @fastapi_app.get("/v1/models")
    async def models(self) -> dict[str, Any]:
        return ModelList(data=[ModelCard(id=self.settings.served_model_name)]).model_dump()

    @fastapi_app.get("/metrics")
    async def metrics_endpoint(self) -> Response:
        if not latest_replica_stats():  # nothing routed yet: make the router appear, then report (bounded wait)
            self._start_probe()
            await asyncio.wait({self._starting_probe}, timeout=5.0)
        self.metrics.scaling_decisions = await self._scaling_board.latest()
        return Response(self.metrics.render(), media_type=CONTENT_TYPE)

    # ---- generation -----------------------------------------------------------------------------------------
    @fastapi_app.post("/v1/chat/completions")
    async def chat_completions(self, body: ChatCompletionRequest) -> Response:
        try:
            messages = body.chat_messages()
        except ValueError as exc:
            return self._fail("chat", APIError(400, str(exc), "messages"))
        return await self._generate("chat", body, {"messages": messages})

    @fastapi_app.post("/v1/completions")
    async def completions(self, body: CompletionRequest) -> Response:
        return await self._generate("completion", body, {"prompt": body.prompt})

    async def _generate(self, endpoint: str, body: ChatCompletionRequest | CompletionRequest,
                        prompt: dict[str, Any]) -> Response:
        try:
            slo = await self._validate(body)
        except APIError as err:
            return self._fail(endpoint, err)
        request_id = new_id("chatcmpl" if endpoint == "chat" else "cmpl")
        payload = {"request_id": request_id, **prompt, "sampling": body.sampling_kwargs(),
                   "tpot_slo_ms": slo.tpot_slo_ms, "ttft_slo_ms": slo.ttft_slo_ms,
                   "ttft_slo_x_prefill": slo.ttft_slo_x_prefill, "ttft_allowance_ms": slo.ttft_allowance_ms,
                   "slo_class": slo.slo_class}  # the replica counts attainment per class for the autoscaler
        avoid: list[str] = []  # replicas that refused its TTFT SLO: the router tries the others first
        retries_left = 2  # a replica that died before accepting the request: nothing started, another may serve it
        while True:
            gen = self.stream_replica.generate.remote(payload, tpot_slo_ms=slo.tpot_slo_ms,
                                                      avoid_replicas=tuple(avoid))
            self.metrics.in_flight.inc()
            try:
                first = await asyncio.wait_for(gen.__anext__(), timeout=self.settings.replica_timeout_s)
            except asyncio.CancelledError:
                gen.cancel()
                self.metrics.in_flight.dec()
                raise
            except BaseException as exc:  # noqa: BLE001 - every failure becomes an OpenAI-style status
                gen.cancel()
                self.metrics.in_flight.dec()
                if not isinstance(exc, Exception):
                    raise
                if isinstance(exc, _REPLICA_GONE) and retries_left > 0:
                    retries_left -= 1
                    logger.warning("replica died before accepting %s (%s); trying another", request_id,
                                   type(exc).__name__)
                    continue
                err = error_from_handle_exception(exc)
                if err.status == 500:
                    logger.exception("replica call failed")
                return self._fail(endpoint, err)
            if first["type"] != "error":
                break
            self.metrics.in_flight.dec()
            refused_by = first.get("replica_id")
            if first.get("code") == "slo_unattainable" and refused_by and refused_by not in avoid and \
                    len(avoid) + 1 < self._num_replicas():
                avoid.append(refused_by)
                continue
            if first.get("code") == "slo_unattainable":
                self.metrics.observe_rejected(slo.slo_class, first.get("reason"))
            return self._fail(endpoint, APIError.from_message(first))
        relay = _Relay(self, endpoint, body, slo, request_id, gen, first["prompt_tokens"])
        if body.stream:
            return StreamingResponse(relay.sse(), media_type="text/event-stream",
                                     headers={"Cache-Control": "no-cache"})
        return await relay.whole()

    async def _validate(self, body: ChatCompletionRequest | CompletionRequest) -> ResolvedSLO:
        if body.model != self.settings.served_model_name:
            raise APIError(404, f"the model {body.model!r} does not exist; this server serves "
                                f"{self.settings.served_model_name!r}", "model", "model_not_found")
        unsupported = body.unsupported_field()
        if unsupported is not None:
            raise APIError(400, unsupported[1], unsupported[0], "unsupported_parameter")
        limits = self.settings.limits
        if isinstance(body, ChatCompletionRequest) and len(body.messages) > limits.max_messages:
            raise APIError(400, f"messages: at most {limits.max_messages} messages per request, got "
                                f"{len(body.messages)}", "messages")
        stops = body.stop or []
        if len(stops) > limits.max_stop_sequences:
            raise APIError(400, f"stop: at most {limits.max_stop_sequences} stop sequences, got {len(stops)}", "stop")
        if any(len(stop) > limits.max_stop_chars for stop in stops):
            raise APIError(400, f"stop: a stop sequence may have at most {limits.max_stop_chars} characters", "stop")
        try:
            SamplingParams(**body.sampling_kwargs())
        except ValueError as exc:
            raise APIError(400, str(exc), param_from_message(str(exc))) from None
        baseline = None
        if needs_baseline(self.settings, body.slo_class, body.tpot_slo_ms):
            baseline = await self._unloaded_tpot_s()
        try:
            return resolve_slo(self.settings, slo_class=body.slo_class, tpot_slo_ms=body.tpot_slo_ms,
                               ttft_slo_ms=body.ttft_slo_ms, unloaded_tpot_s=baseline)
        except SLOError as exc:
            raise APIError(400, str(exc), exc.param) from None

    async def _unloaded_tpot_s(self, timeout_s: float | None = None) -> float | None:
        """Median unloaded TPOT over the replicas (from routing stats; asks a replica once at start)."""
        values = [float(s["unloaded_tpot_s"]) for s in latest_replica_stats().values() if s.get("unloaded_tpot_s")]
        if values:
            self._cached_baseline_s = statistics.median(values)
        elif self._cached_baseline_s is None:
            try:
                self._cached_baseline_s = await asyncio.wait_for(
                    self.replica.get_unloaded_tpot_s.remote(), timeout=timeout_s or self.settings.replica_timeout_s)
            except Exception as exc:  # noqa: BLE001
                raise error_from_handle_exception(exc) from None
        return self._cached_baseline_s

    def _num_replicas(self) -> int:
        return max(len(latest_replica_stats()), 1)

    def _fail(self, endpoint: str, err: APIError) -> JSONResponse:
        self.metrics.requests.labels(endpoint, str(err.status)).inc()
        return err.response()


def build_app(args: dict[str, Any]) -> serve.Application:
    """Application builder named by serve_config.yaml (``import_path: app.ingress:build_app``)."""
    settings = AppSettings.model_validate(args or {})
    replica = LLMReplica.bind(settings.model_dump())
    return OpenAIIngress.bind(replica, settings.model_dump())
