"""Limitador's HTTP API (plus reserve/commit) as a thin FastAPI adapter over the engine.

Handlers are `async def` and call the engine on the event loop: the memory storage decides in
microseconds under its own lock, and a threadpool hop would cost more than the decision.

Every status code a handler can produce is declared in the OpenAPI document with its body model,
so the document can be trusted by clients and checked by schemathesis (tests/test_openapi.py).
"""

from __future__ import annotations

import hmac
import json
import os
import re
from collections.abc import Awaitable, Callable, Mapping
from json.encoder import encode_basestring
from typing import Annotated, Any, Literal

from fastapi import APIRouter, Depends, FastAPI, HTTPException, Query, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response
from fastapi.security import HTTPAuthorizationCredentials, HTTPBearer
from pydantic import AfterValidator, BaseModel, BeforeValidator, ConfigDict, Field
from starlette.convertors import Convertor, register_url_convertor
from starlette.exceptions import HTTPException as StarletteHTTPException

from ratelimit.counters import Counter, CounterStatus, Decision, StorageError
from ratelimit.engine import (
    MAX_DELTA,
    MAX_ENTRIES,
    MAX_KEY_LENGTH,
    MAX_NAMESPACE_LENGTH,
    MAX_RESERVATION_TTL,
    MAX_VALUE_LENGTH,
    InvalidCursor,
    InvalidRequest,
)
from ratelimit.limits import Limit
from ratelimit.pacing import Pace
from ratelimit.server.state import Service
from ratelimit.storage.base import CounterFilter

# The largest legitimate body: 64 entries of 256 + 4096 characters, each possibly a 6-byte JSON
# escape, is under 2 MiB. Anything bigger is refused before it is read into memory.
MAX_BODY_BYTES = 4 * 1024 * 1024

DRAFT_03 = "DraftVersion03"
_JSON_NULL = b"null"
_TOO_LARGE_MESSAGE = f"request body is larger than {MAX_BODY_BYTES} bytes"


class _NamespaceConvertor(Convertor[str]):
    """A path parameter holding any text, "/" included (Kuadrant namespaces are "<ns>/<route>").
    Starlette's own `path` convertor is `.*`, which stops at a newline and would answer 404."""

    regex = r"[\s\S]*"

    def convert(self, value: str) -> str:
        return value

    def to_string(self, value: str) -> str:
        return value


register_url_convertor("namespace", _NamespaceConvertor())


# -- request bodies --------------------------------------------------------------------------------


def _utf8(text: str) -> str:
    """JSON allows lone surrogates ("\\ud800"); they could never be written back out as UTF-8, so a
    namespace or value holding one would break /counters and /metrics for everyone."""
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        raise ValueError("must be valid Unicode text (no lone surrogates)") from None
    return text


def _whole_number(value: object) -> object:
    """JSON Schema counts 100.0 as an integer, and some clients send one; 1.5 and "100" stay refused."""
    if isinstance(value, float) and value.is_integer():
        return int(value)
    return value


Text = Annotated[str, AfterValidator(_utf8)]
Namespace = Annotated[Text, Field(max_length=MAX_NAMESPACE_LENGTH)]
DescriptorKey = Annotated[Text, Field(min_length=1, max_length=MAX_KEY_LENGTH)]
DescriptorValue = Annotated[Text, Field(max_length=MAX_VALUE_LENGTH)]
Values = Annotated[
    dict[DescriptorKey, DescriptorValue],
    Field(max_length=MAX_ENTRIES, description="Descriptor entries, bound as CEL `descriptors[0]`."),
]
Hits = Annotated[int, Field(ge=0, le=MAX_DELTA), BeforeValidator(_whole_number)]


class _Request(BaseModel):
    # Strict: "5" is not a delta, true is not 1 and 1 is not a descriptor value (as in Limitador).
    model_config = ConfigDict(strict=True)

    namespace: Namespace
    values: Values

    def descriptors(self) -> list[Mapping[str, str]]:
        """The HTTP API's `values` are the single descriptor the limits see as `descriptors[0]`."""
        return [self.values]


_EXAMPLE: dict[str, Any] = {"namespace": "maas-demo/qwen3-14b", "values": {"tier": "free", "user": "alice"}}


class CheckAndReportInfo(_Request):
    """Limitador's request body for /check, /report and /check_and_report."""

    model_config = ConfigDict(
        json_schema_extra={"examples": [{**_EXAMPLE, "delta": 100, "response_headers": DRAFT_03}]}
    )

    delta: Hits
    response_headers: Literal["DraftVersion03"] | None = None


class ReserveRequest(_Request):
    model_config = ConfigDict(json_schema_extra={"examples": [{**_EXAMPLE, "amount": 400, "ttl_seconds": 30}]})

    amount: Hits
    ttl_seconds: float = Field(gt=0, le=MAX_RESERVATION_TTL, allow_inf_nan=False)


class CommitRequest(_Request):
    model_config = ConfigDict(json_schema_extra={"examples": [{**_EXAMPLE, "reservation_id": "5f0c7a", "actual": 350}]})

    reservation_id: Annotated[Text, Field(min_length=1, max_length=MAX_KEY_LENGTH)]
    actual: Hits


# -- response bodies -------------------------------------------------------------------------------


class ErrorBody(BaseModel):
    error: str
    field: str | None = None


class LimitedBody(BaseModel):
    error: str
    limit_name: str | None = Field(description="Name of the first limit that refused the request.")


class LimitBody(BaseModel):
    id: str | None
    namespace: str
    max_value: int
    seconds: int
    name: str | None
    conditions: list[str]
    variables: list[str]


class CounterBody(BaseModel):
    limit: LimitBody
    set_variables: dict[str, str]
    remaining: int = Field(ge=0, description="Budget left, clamped at 0 (never a wrapped number).")
    expires_in_seconds: int = Field(ge=0)
    overshoot: int = Field(ge=0, description="How far unconditional reports pushed the counter past max_value.")
    reserved: int = Field(ge=0, description="Amount held by outstanding reservations.")


class StatusBody(BaseModel):
    started_at: str
    config_applied_at: str | None
    config_version: int
    config_err_since: int
    config_error: str | None = Field(description="Why the last reload failed; null once a reload succeeds.")
    limits_source: str


class ReadyBody(BaseModel):
    ready: bool
    reason: str | None = Field(None, description="Why decisions cannot be answered now; null when ready.")


class ReservationBody(BaseModel):
    reservation_id: str


class CommitBody(BaseModel):
    reservation_held: bool = Field(description="False when the reservation had expired or was unknown.")


def _json(description: str, model: type[BaseModel] | None = None, **extra: Any) -> dict[str, Any]:
    """One OpenAPI response entry; `model=None` documents the body Limitador sends: JSON `null`."""
    if model is None:
        return {"description": description, "content": {"application/json": {"schema": {"type": "null"}}}, **extra}
    return {"description": description, "model": model, **extra}


Responses = dict[int | str, dict[str, Any]]
"""FastAPI's `responses=`: status code -> OpenAPI response entry."""

_STRING = {"type": "string"}
_RATE_LIMIT_HEADERS = {
    name: {"description": description, "schema": _STRING}
    for name, description in (
        ("X-RateLimit-Limit", "Draft-03: the tightest limit, then every window (`5;w=60`)."),
        ("X-RateLimit-Remaining", "Draft-03: budget left in the tightest counter."),
        ("X-RateLimit-Reset", "Draft-03: seconds until the tightest counter's window resets."),
    )
}
_INVALID: Responses = {400: _json("Refused by the engine's input checks, or a body that is not UTF-8 text", ErrorBody)}
_UNAVAILABLE: Responses = {503: _json("The counter storage could not answer (unreachable or full)", ErrorBody)}
_TOO_LARGE: Responses = {413: _json(_TOO_LARGE_MESSAGE, ErrorBody)}
_LIMITED: Responses = {429: _json("Over the limit", LimitedBody)}
_UNAUTHORIZED: Responses = {
    401: _json(
        "Missing or wrong bearer token",
        ErrorBody,
        headers={"WWW-Authenticate": {"description": "`Bearer`", "schema": _STRING}},
    )
}


# -- counter listing -------------------------------------------------------------------------------

MAX_COUNTERS_PER_CALL = 10_000
"""What one /counters call returns at most, paged or not; the rest is reached with the cursor."""
PAGE_CHUNK = 25
"""Counters asked of the storage at a time while one call collects its answer: reading and
formatting a counter costs ~10 microseconds, so a chunk keeps the event loop for a quarter of a
millisecond (a decision waits that long at most at each of its turns of the loop)."""
NEXT_CURSOR_HEADER = "X-Next-Cursor"
WORKER_HEADER = "X-Ratelimit-Pid"
_STATUS_RESPONSES: dict[int | str, dict[str, Any]] = {200: {"description": "The service's configuration status", "headers": {
    WORKER_HEADER: {"description": "The process that answered (which worker, with `--workers`).", "schema": _STRING}
}}}
_COUNTERS_PARAMETERS = frozenset({"limit", "cursor", "variable"})

_LIMIT_DOC = f"Most counters to return (1 to {MAX_COUNTERS_PER_CALL}, also the default)."
_CURSOR_DOC = f"Where to go on: the `{NEXT_CURSOR_HEADER}` header of the previous answer."
_VARIABLE_DOC = (
    "`name:value` (split at the first colon): only counters whose variable `name` has this value. "
    "`name` is a descriptor key (`auth.identity.userid` for `descriptors[0]['auth.identity.userid']`) "
    "or the variable's CEL text. Repeat for several; all must hold."
)
VariableFilter = Annotated[
    str, Field(pattern=r"^[^:]+:[\s\S]*$", max_length=MAX_KEY_LENGTH + MAX_VALUE_LENGTH + 1), AfterValidator(_utf8)
]
_NEXT_CURSOR_HEADER = {
    NEXT_CURSOR_HEADER: {
        "description": "Present when more counters follow: pass it as `cursor` for the next page.",
        "schema": _STRING,
    }
}
_DESCRIPTOR_KEY = re.compile(r"""^descriptors\[\d+\](?:\[(['"])(.*)\1\]|\.([A-Za-z_][A-Za-z0-9_]*))$""", re.DOTALL)


_ENCODE_JSON = json.JSONEncoder(ensure_ascii=False, separators=(",", ":")).encode


_LimitJson = tuple[Limit, str, list[str]]
"""A limit (held, so that its id is not reused while it is a key), how its counters' JSON starts
(its own JSON included), and its variables' keys."""


def _counters_json(statuses: list[CounterStatus], limits: dict[int, _LimitJson]) -> str:
    """Limitador's /counters objects for these counters, comma-separated: `limit`, `set_variables`,
    `remaining` (clamped to [0, max_value]), `expires_in_seconds` (rounded up), and our `overshoot`
    and `reserved`. Written out directly, each limit's part once per call (in `limits`, by object:
    a reload between two chunks brings new objects): through a dict per counter and the JSON
    encoder a counter took ~4 microseconds, most of a listing's time; this way ~1.5."""
    parts = []
    for status in statuses:
        counter = status.counter
        limit = counter.limit
        known = limits.get(id(limit))
        if known is None:
            known = limits[id(limit)] = (limit, '{"limit":' + _ENCODE_JSON(limit.to_dict()) + ',"set_variables":{',
                                         [encode_basestring(name) + ":" for name in limit.variables])
        _, head, keys = known
        variables = ",".join([key + encode_basestring(value) for key, value in zip(keys, counter.values, strict=True)])
        parts.append(f'{head}{variables}}},"remaining":{status.remaining},'
                     f'"expires_in_seconds":{int(status.expires_in + 0.999)},'
                     f'"overshoot":{status.overshoot},"reserved":{status.reserved}}}')
    return ",".join(parts)


def _variable_names(source: str) -> set[str]:
    """The names a filter may call a limit variable by: its CEL text, and the descriptor key it reads."""
    text = "".join(source.split()) if source.startswith("descriptors") else source
    found = _DESCRIPTOR_KEY.match(text)
    if found is None:
        return {source}
    return {source, found.group(2) if found.group(2) is not None else found.group(3)}


def _variable_filter(filters: list[str]) -> CounterFilter | None:
    if not filters:
        return None
    wanted: list[tuple[str, str]] = []
    for item in filters:
        name, colon, value = item.partition(":")
        if not colon or not name:
            raise InvalidRequest("variable", f"expected name:value, got {item[:100]!r}")
        wanted.append((name, value))
    names_of: dict[str, set[str]] = {}

    def match(counter: Counter) -> bool:
        resolved: dict[str, str] = {}
        for source, value in zip(counter.limit.variables, counter.values):
            names = names_of.get(source)
            if names is None:
                names = names_of[source] = _variable_names(source)
            for name in names:
                resolved[name] = value
        return all(resolved.get(name) == value for name, value in wanted)

    return match


# -- errors ----------------------------------------------------------------------------------------


def _error(status_code: int, message: str, field: str | None = None, **kwargs: Any) -> Response:
    return JSONResponse({"error": message, "field": field}, status_code=status_code, **kwargs)


def _http_field(engine_field: str) -> str:
    """The engine names descriptors as the gRPC API sees them; the HTTP body calls descriptors[0] `values`."""
    return re.sub(r"^descriptors(\[0\])?", "values", engine_field)


def _install_error_handlers(app: FastAPI) -> None:
    async def invalid_request(_: Request, exc: Exception) -> Response:
        assert isinstance(exc, InvalidRequest)
        return _error(400, exc.message, _http_field(exc.field))

    async def storage_error(_: Request, exc: Exception) -> Response:
        return _error(503, f"counter storage unavailable: {exc}")

    async def http_error(_: Request, exc: Exception) -> Response:
        # The codes our operations document use ErrorBody: 401 and 413 raised here, and FastAPI's
        # 400 for a body that is not even text (invalid UTF-8). Routing errors (404, 405) keep
        # FastAPI's `{"detail": ...}`: no operation answers them.
        assert isinstance(exc, StarletteHTTPException)
        if exc.status_code in (400, 401, 413):
            return _error(exc.status_code, str(exc.detail), headers=exc.headers)
        return JSONResponse({"detail": exc.detail}, status_code=exc.status_code, headers=exc.headers)

    async def validation_error(_: Request, exc: Exception) -> Response:
        # FastAPI's 422 shape, without echoing `input` (a rejected 10k-entry map would come back whole).
        assert isinstance(exc, RequestValidationError)
        detail = [{"loc": list(e["loc"]), "msg": e["msg"], "type": e["type"]} for e in exc.errors()]
        return JSONResponse({"detail": detail}, status_code=422)

    app.add_exception_handler(InvalidRequest, invalid_request)
    app.add_exception_handler(StorageError, storage_error)
    # Starlette's class, not FastAPI's subclass: FastAPI raises Starlette's for unparsable bodies.
    app.add_exception_handler(StarletteHTTPException, http_error)
    app.add_exception_handler(RequestValidationError, validation_error)


class _BodyLimit:
    """ASGI middleware refusing bodies over MAX_BODY_BYTES, declared or streamed (chunked)."""

    def __init__(self, app: Callable[..., Awaitable[None]]) -> None:
        self.app = app

    async def __call__(self, scope: dict[str, Any], receive: Callable[[], Awaitable[dict]], send: Any) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        declared = dict(scope["headers"]).get(b"content-length", b"")
        if declared.isdigit() and int(declared) > MAX_BODY_BYTES:
            await _error(413, _TOO_LARGE_MESSAGE)(scope, receive, send)
            return
        received = 0

        async def bounded_receive() -> dict:
            nonlocal received
            message = await receive()
            received += len(message.get("body", b""))
            if received > MAX_BODY_BYTES:
                # An HTTPException: FastAPI turns any other error raised while reading a body into 400.
                raise HTTPException(413, _TOO_LARGE_MESSAGE)
            return message

        await self.app(scope, bounded_receive, send)


# -- authentication --------------------------------------------------------------------------------


def _bearer_guard(token: str) -> Callable[..., Awaitable[None]]:
    expected = token.encode("utf-8")
    scheme = HTTPBearer(auto_error=False, description="`Authorization: Bearer <token>`.")

    # A default rather than Annotated[...]: `scheme` is local, and annotations are strings here.
    async def guard(credentials: HTTPAuthorizationCredentials | None = Depends(scheme)) -> None:
        # Header values arrive latin-1 decoded; re-encoding gives back the bytes the client sent.
        given = credentials.credentials.encode("latin-1") if credentials is not None else b""
        if not hmac.compare_digest(given, expected):
            raise HTTPException(401, "missing or wrong bearer token", headers={"WWW-Authenticate": "Bearer"})

    return guard


# -- the app ---------------------------------------------------------------------------------------


def _limited(decision: Decision, headers: Mapping[str, str] | None = None) -> Response:
    name = decision.limited_by.name if decision.limited_by is not None else None
    return JSONResponse({"error": "Too Many Requests", "limit_name": name}, status_code=429, headers=headers)


def _null(headers: Mapping[str, str] | None = None) -> Response:
    return Response(_JSON_NULL, media_type="application/json", headers=headers)


def create_http_app(service: Service) -> FastAPI:
    """The HTTP API over `service`. The bearer token is read once, here: the OpenAPI document
    declares the security scheme only when it is enforced."""
    engine = service.engine
    token = service.options.api_token
    app = FastAPI(
        title="ratelimit",
        summary="Limitador-compatible rate limiting, with token reservations.",
        version="1",
    )
    app.add_middleware(_BodyLimit)
    _install_error_handlers(app)

    guarded = APIRouter(
        dependencies=[Depends(_bearer_guard(token))] if token else [],
        responses=_UNAUTHORIZED if token else {},
    )

    @app.get("/api/spec", include_in_schema=False)
    async def api_spec() -> JSONResponse:
        """Limitador's path for its API document (Swagger 2.0 there, this OpenAPI 3.1 one here)."""
        return JSONResponse(app.openapi())

    @app.get("/status", response_model=StatusBody, tags=["service"], responses=_STATUS_RESPONSES)
    async def status(response: Response) -> dict[str, Any]:
        config = service.status
        response.headers[WORKER_HEADER] = str(os.getpid())
        return {
            "started_at": config.started_at.isoformat(),
            "config_applied_at": config.config_applied_at.isoformat() if config.config_applied_at else None,
            "config_version": config.config_version,
            "config_err_since": config.config_err_since,
            "config_error": config.last_error,
            "limits_source": config.source,
        }

    @app.get(
        "/ready",
        response_model=ReadyBody,
        tags=["service"],
        responses={503: _json("Not ready: the counter storage is unavailable and decisions fail closed", ReadyBody)},
        summary="Readiness: 503 while decisions cannot be answered (liveness is /status).",
    )
    async def ready() -> Response:
        if service.engine.storage.ready():
            return JSONResponse({"ready": True, "reason": None})
        return JSONResponse(
            {"ready": False, "reason": "counter storage unavailable (--on-storage-error closed)"}, status_code=503
        )

    @app.get(
        "/metrics",
        response_class=Response,
        tags=["service"],
        responses={200: {"description": "Prometheus text format", "content": {"text/plain": {"schema": _STRING}}}},
    )
    async def metrics() -> Response:
        await service.metrics.refresh()
        # Formatting thousands of series takes a while: in paced slices, decisions in between.
        body, content_type = await service.metrics.render_paced()
        return Response(body, media_type=content_type)

    # An encoded %2F arrives decoded, so the namespace parameter must match "/" (see _NamespaceConvertor).
    @guarded.get("/limits/{namespace:namespace}", response_model=list[LimitBody], tags=["limits"])
    async def limits(namespace: str) -> list[dict[str, Any]]:
        return [limit.to_dict() for limit in engine.get_limits(namespace)]

    @guarded.get(
        "/counters/{namespace:namespace}",
        response_model=list[CounterBody],
        responses={
            200: {"description": "Live counters", "headers": _NEXT_CURSOR_HEADER},
            **_INVALID,
            409: _json("The cursor is not one this listing handed out (or no longer valid): start again", ErrorBody),
            **_UNAVAILABLE,
        },
        tags=["limits"],
        summary=f"Live counters, at most `limit` (default and most {MAX_COUNTERS_PER_CALL}) per call.",
    )
    async def counters(
        request: Request,
        namespace: str,
        limit: Annotated[int, Query(ge=1, le=MAX_COUNTERS_PER_CALL, description=_LIMIT_DOC)] = MAX_COUNTERS_PER_CALL,
        cursor: Annotated[Text | None, Query(min_length=1, max_length=256, description=_CURSOR_DOC)] = None,
        variable: Annotated[
            list[VariableFilter], Query(max_length=MAX_ENTRIES, description=_VARIABLE_DOC)
        ] = [],  # noqa: B006 - FastAPI copies defaults
    ) -> Response:
        unknown = sorted(set(request.query_params) - _COUNTERS_PARAMETERS)
        if unknown:  # `?limt=10` silently ignored would return far more than asked
            raise RequestValidationError(
                [{"loc": ["query", name], "msg": "unknown query parameter", "type": "extra_forbidden"} for name in unknown]
            )
        match = _variable_filter(variable)
        parts: list[str] = []
        limits_json: dict[int, _LimitJson] = {}
        listed = 0
        pace = Pace()
        while True:
            # Chunks of a bounded size, each formatted as soon as it is read (no Python object per
            # counter outlives its chunk), the loop free in between: a walk over many counters never
            # holds the storage or the event loop for more than about a millisecond at a time, and
            # takes at most half of the loop's time (ratelimit.pacing).
            try:
                page = await engine.get_counters_page(namespace, cursor, min(PAGE_CHUNK, limit - listed), match)
            except InvalidCursor as error:
                return _error(409, error.message, "cursor")
            if page.counters:
                parts.append(_counters_json(page.counters, limits_json))
            listed += len(page.counters)
            cursor = page.next_cursor
            if cursor is None or listed >= limit:
                break
            await pace.rest()
        headers = {NEXT_CURSOR_HEADER: cursor} if cursor is not None else None
        return Response(f"[{','.join(parts)}]".encode(), media_type="application/json", headers=headers)

    post_errors = {**_INVALID, **_TOO_LARGE, **_UNAVAILABLE}

    @guarded.post(
        "/check",
        responses={200: _json("Within limits"), **_LIMITED, **post_errors},
        tags=["limitador"],
        summary="Would `delta` more fit (0 counts as 1)? Charges nothing.",
    )
    async def check(body: CheckAndReportInfo) -> Response:
        decision = await engine.check(body.namespace, body.descriptors(), body.delta)
        return _limited(decision) if decision.limited else _null()

    @guarded.post(
        "/report",
        responses={200: _json("Charged"), **post_errors},
        tags=["limitador"],
        summary="Charge `delta` unconditionally (may overshoot).",
    )
    async def report(body: CheckAndReportInfo) -> Response:
        await engine.report(body.namespace, body.descriptors(), body.delta)
        return _null()

    @guarded.post(
        "/check_and_report",
        responses={
            200: _json("Within limits and charged", headers=_RATE_LIMIT_HEADERS),
            429: _json("Over the limit; nothing charged", LimitedBody, headers=_RATE_LIMIT_HEADERS),
            **post_errors,
        },
        tags=["limitador"],
        summary="Atomically check and charge `delta`.",
    )
    async def check_and_report(body: CheckAndReportInfo) -> Response:
        descriptors = body.descriptors()
        # Only the body asks for headers: Limitador's -H/--rate-limit-headers configures its RLS server alone.
        want_headers = body.response_headers == DRAFT_03
        decision = await engine.check_and_report(body.namespace, descriptors, body.delta, load_counters=want_headers)
        headers = decision.rate_limit_headers() if want_headers else None
        if decision.limited:
            service.metrics.record_limited(body.namespace, descriptors, decision.limited_by)
            return _limited(decision, headers)
        service.metrics.record_authorized(body.namespace, descriptors, body.delta)
        return _null(headers)

    @guarded.post(
        "/reserve",
        response_model=ReservationBody,
        responses={**_LIMITED, **post_errors},
        tags=["reservations"],
        summary="Hold `amount` on every counter until commit or the ttl.",
    )
    async def reserve(body: ReserveRequest) -> Response:
        decision = await engine.reserve(body.namespace, body.descriptors(), body.amount, body.ttl_seconds)
        if decision.limited:
            return _limited(decision)
        return JSONResponse({"reservation_id": decision.reservation_id})

    @guarded.post(
        "/commit",
        response_model=CommitBody,
        responses=post_errors,
        tags=["reservations"],
        summary="Replace a reservation by the amount really used (charged even if it expired).",
    )
    async def commit(body: CommitRequest) -> Response:
        committed = await engine.commit(body.namespace, body.descriptors(), body.reservation_id, body.actual)
        return JSONResponse({"reservation_held": committed.held})

    app.include_router(guarded)
    return app
