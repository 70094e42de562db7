"""The HTTP API (Quart-Trio): tickers from Redis, ticker health, liveness, readiness, metrics.

`create_app(rt)` receives the Runtime and returns the app; its Redis reader task runs in the app's
lifespan nursery (started before serving, stopped after). Every answer is JSON (errors included:
no HTML, no traceback), except /metrics (Prometheus text). Symbols are validated before any Redis
access. The analytics blueprint (marketd/api/analytics.py), when present, is mounted with its
OpenAPI paths.
"""

from __future__ import annotations

import importlib
import importlib.metadata
import time
import weakref
from collections.abc import Mapping
from typing import Any, Final

import msgspec
import trio
from prometheus_client import CONTENT_TYPE_LATEST, Counter
from quart import Response, request
from quart_trio import QuartTrio
from werkzeug.exceptions import HTTPException, MethodNotAllowed

from marketd.api import book, dashboard, openapi, stream
from marketd.api.hot import READ_TIMEOUT_S, HotReads, TickerReads
from marketd.api.middleware import CloseAfterResponse, RequestMetrics
from marketd.api.reader import TickerReader
from marketd.api.views import freshness, health_view
from marketd.errors import StoreUnavailable
from marketd.logs import get_logger
from marketd.metrics import FastHistogramCollector, MetricsFactory
from marketd.runtime import Runtime
from marketd.tickers import state as ticker_state
from marketd.tickers.store import TickerStore

log = get_logger(__name__)

API_COMPONENT: Final = "api"
ANALYTICS_MODULE: Final = "marketd.api.analytics"
_encode = msgspec.json.Encoder().encode
_JSON = "application/json"


def _json(body: Any, status: int = 200, headers: dict[str, str] | None = None) -> Response:
    return Response(_encode(body), status=status, content_type=_JSON, headers=headers)


def _error(status: int, error: str, detail: str, **extra: Any) -> Response:
    return _json({"error": error, "detail": detail, **extra}, status)


def _now_ms() -> int:
    return time.time_ns() // 1_000_000


def _version() -> str:
    try:
        return importlib.metadata.version("marketd")
    except importlib.metadata.PackageNotFoundError:
        return "0+unknown"


def _analytics(rt: Runtime) -> tuple[Any, tuple[Mapping[str, Any], Mapping[str, Any]]] | None:
    """The analytics blueprint and its OpenAPI contribution, if that module is installed."""
    try:
        module = importlib.import_module(ANALYTICS_MODULE)
    except ModuleNotFoundError as exc:
        if exc.name != ANALYTICS_MODULE:
            raise  # the module exists but one of its imports is missing: say so
        return None
    blueprint = module.create_blueprint(rt)
    paths = getattr(module, "OPENAPI_PATHS", {})
    schemas = getattr(module, "OPENAPI_SCHEMAS", {})
    return blueprint, (paths, schemas)


_METRICS: weakref.WeakKeyDictionary[MetricsFactory, tuple[Counter, FastHistogramCollector]] = (
    weakref.WeakKeyDictionary()
)


def _api_metrics(m: MetricsFactory) -> tuple[Counter, FastHistogramCollector]:
    """Declared once per registry: a restarted API (or a second app in tests) reuses them."""
    found = _METRICS.get(m)
    if found is None:
        found = _METRICS[m] = (
            m.counter("api_requests", "HTTP requests by route and status", ["route", "status"]),
            m.fast_histogram("api_request_seconds", "HTTP handling time by route", ["route"]),
        )
    return found


def create_app(rt: Runtime, *, reader: TickerReader | None = None) -> QuartTrio:
    """Build the app. Without `reader`, one is made on `rt.redis_url` and closed with the app."""
    cfg = rt.config
    tracked = tuple(dict.fromkeys(s.strip().upper() for s in cfg.tickers.symbols if s.strip()))
    stale_ms = cfg.tickers.stale_s * 1000
    own_store: TickerStore | None = None
    if reader is None:
        if rt.redis_url is None:
            raise StoreUnavailable("the API needs Redis (redis.url); none was resolved")
        own_store = TickerStore(
            rt.redis_url, timeout_s=READ_TIMEOUT_S, client_name="marketd-api", max_connections=4
        )
        reader = TickerReader(own_store)
    the_reader = reader

    # static_folder=None: the dashboard serves its own assets (with its CSP); no bare /static/.
    app = QuartTrio(__name__, static_folder=None)
    app.config["JSONIFY_MIMETYPE"] = _JSON

    # The push API (SSE, raw ASGI in front of Quart) and the dashboard page: marketd/api/stream.py.
    # Order books (marketd/api/book.py): GET /api/v1/book/{symbol}, its stream, the page's panel.
    books = book.settings(rt, symbols=cfg.book.symbols, redis_depth=cfg.book.redis_depth)
    app.register_blueprint(book.create_blueprint(rt, books))
    app.register_blueprint(dashboard.create_blueprint(rt, books.symbols))
    # The ASGI stack, outermost first: HotReads (the polled ticker GETs, marketd/api/hot.py),
    # StreamApp (SSE, with metrics of its own), RequestMetrics, CloseAfterResponse (only Quart
    # needs it), Quart. Each layer costs every request that passes through it.
    requests, latency = _api_metrics(rt.metrics)
    app.asgi_app = CloseAfterResponse(app.asgi_app)  # type: ignore[method-assign]
    app.asgi_app = RequestMetrics(app.asgi_app, requests, latency)  # type: ignore[method-assign]
    app.asgi_app = stream.mount(app, rt, tracked, books)  # type: ignore[method-assign]
    reads = TickerReads(the_reader.read, tracked)
    app.asgi_app = HotReads(app.asgi_app, reads, requests, latency)  # type: ignore[method-assign]

    @app.before_serving
    async def _start_reader() -> None:
        await app.nursery.start(the_reader.run)

    @app.after_serving
    async def _stop_reader() -> None:
        # Stopped here rather than by Quart's background-task deadline (5 s of waiting).
        the_reader.stop()
        if own_store is not None:
            await the_reader.close_store()

    # -- errors: always JSON ----------------------------------------------------------------

    @app.errorhandler(HTTPException)
    async def _http_error(exc: HTTPException) -> Response:
        code = exc.code or 500
        headers: dict[str, str] = {}
        if isinstance(exc, MethodNotAllowed) and exc.valid_methods:
            headers["Allow"] = ", ".join(exc.valid_methods)
        name = (exc.name or "error").lower().replace(" ", "_")
        return _json({"error": name, "detail": exc.description or ""}, code, headers)

    @app.errorhandler(StoreUnavailable)
    async def _store_down(exc: StoreUnavailable) -> Response:
        return _error(503, "redis_unavailable", str(exc))

    @app.errorhandler(trio.TooSlowError)
    async def _store_slow(_exc: trio.TooSlowError) -> Response:
        return _error(503, "redis_unavailable", f"Redis did not answer in {READ_TIMEOUT_S * 2:g}s")

    @app.errorhandler(Exception)
    async def _unexpected(exc: Exception) -> Response:
        log.error("api.unhandled", path=request.path, exc_info=exc)
        return _error(500, "internal_error", "unexpected server error; see the server log")

    # -- tickers --------------------------------------------------------------------------------

    async def read(symbols: tuple[str, ...]) -> list[dict[str, str]]:
        with trio.fail_after(READ_TIMEOUT_S * 2):
            return await the_reader.read(symbols)

    @app.get("/api/v1/ticker/health")
    async def ticker_health() -> Response:
        try:
            rows = await read(tracked)
            counts: tuple[int, int, int] | None = freshness(rows, _now_ms(), stale_ms)
            redis_ok = True
        except (StoreUnavailable, trio.TooSlowError):
            counts, redis_ok = None, False
        running = ticker_state.running_state(rt)
        lag = running.consumer_lag if running is not None else None
        age = None
        if running is not None and running.last_message_ms is not None:
            age = max(0, _now_ms() - running.last_message_ms)
        status, body = health_view(
            redis_ok=redis_ok,
            tracked=len(tracked),
            counts=counts,
            consumer_lag=lag,
            last_message_age_ms=age,
        )
        return _json(body, status)

    # GET of these two is answered by HotReads in front of Quart (marketd/api/hot.py); these
    # routes serve HEAD (and document the paths to Quart's router) with the same answers.
    @app.get("/api/v1/ticker/<path:symbol>")  # path: "BTC/USDT" is a malformed symbol, a 400
    async def ticker(symbol: str) -> Response:
        status, body = await reads.one(symbol)
        return Response(body, status=status, content_type=_JSON)

    @app.get("/api/v1/tickers")
    async def tickers() -> Response:
        status, body = await reads.all()
        return Response(body, status=status, content_type=_JSON)

    # -- operations -----------------------------------------------------------------------------

    @app.get("/healthz")
    async def healthz() -> Response:
        return _json({"status": "alive"})

    @app.get("/readyz")
    async def readyz() -> Response:
        # Every enabled component, plus the parts with a dependency of their own (backfill:
        # Binance REST, analytics: PostgreSQL): healthy, a reason naming the dependency and
        # the error, since when. 503 while any is unhealthy (marketd/health.py).
        enabled = cfg.components.enabled()
        components = rt.health.entries(enabled)
        ready = all(c["started"] and c["healthy"] for c in components.values())
        dependencies = {n: d.view() for n, d in sorted(rt.health.dependencies.items())}
        body = {"ready": ready, "components": components, "dependencies": dependencies}
        return _json(body, 200 if ready else 503)

    @app.get("/metrics")
    async def metrics() -> Response:
        return Response(rt.metrics.exposition(), status=200, content_type=CONTENT_TYPE_LATEST)

    contributions = []
    analytics = _analytics(rt)
    if analytics is not None:
        blueprint, contribution = analytics
        app.register_blueprint(blueprint)
        contributions.append(contribution)
    document = _encode(openapi.build_document(_version(), contributions))

    @app.get("/openapi.json")
    async def openapi_json() -> Response:
        return Response(document, status=200, content_type=_JSON)

    return app
