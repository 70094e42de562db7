"""Market and analytics endpoints over the Spark jobs' stores (blueprint mounted by app.py).

Reads PostgreSQL warm storage (trade_aggregates, indicators, anomalies;
spark/marketd_spark/migrations) and the Redis latest values the jobs write
(`<prefix>:agg:<SYMBOL>:<interval>`). Every blocking call runs in a worker thread
(trio.to_thread) under its own CapacityLimiter; PostgreSQL connections are reused from a small
pool that is closed after serving. Errors are JSON: 400 for bad input, 503
`storage_unavailable` when a store is not configured or does not answer.
"""

from __future__ import annotations

import re
import threading
import time
from collections.abc import Callable, Sequence
from decimal import Decimal
from typing import Any, Final, TypeVar

import psycopg
import redis
import trio
from psycopg.rows import dict_row
from quart import Blueprint, Response, current_app, jsonify, request

from marketd.api.views import BadSymbol, normalise_symbol
from marketd.health import Dependency, error_text
from marketd.logs import Throttle, get_logger
from marketd.runtime import Runtime

log = get_logger(__name__)

T = TypeVar("T")

AGG_INTERVALS: Final = ("1m", "5m", "15m")  # trade_aggregation's windows
# Binance kline intervals (docs/binance.md): the indicators job keeps the interval of each kline.
KLINE_INTERVALS: Final = (
    *("1s", "1m", "3m", "5m", "15m", "30m"),
    *("1h", "2h", "4h", "6h", "8h", "12h"),
    *("1d", "3d", "1w", "1M"),
)
MAX_LIMIT: Final = 1000
# Worker threads per store: enough for a few concurrent requests without starving trio's pool.
PG_THREADS: Final = 4
REDIS_THREADS: Final = 4
PG_CONNECT_TIMEOUT_S: Final = 5
PG_STATEMENT_TIMEOUT_MS: Final = 5000
# With POSTGRES_DSN set, PostgreSQL is asked (SELECT 1) this often, so /readyz's `analytics`
# entry shows an outage, and its end, within seconds even when no analytics request comes.
PG_PROBE_S: Final = 5.0
ANALYTICS: Final = "analytics"


class BadRequest(ValueError):
    def __init__(self, error: str, detail: str, **extra: Any) -> None:
        super().__init__(detail)
        self.error = error
        self.detail = detail
        self.extra = extra


class Unavailable(Exception):
    pass


def _error(status: int, error: str, detail: str = "", **extra: Any) -> Response:
    body: dict[str, Any] = {"error": error}
    if detail:
        body["detail"] = detail
    body.update(extra)
    resp = jsonify(body)
    resp.status_code = status
    return resp


def _symbol(raw: str) -> str:
    # The ticker API's rule (ASCII before upper-casing), its error body included.
    try:
        return normalise_symbol(raw)
    except BadSymbol:
        raise BadRequest(
            "invalid_symbol", "a symbol is 2 to 30 letters or digits", symbol=raw[:64]
        ) from None


def _choice(name: str, raw: str | None, allowed: Sequence[str], default: str) -> str:
    value = default if raw is None else raw
    if value not in allowed:
        raise BadRequest(f"invalid_{name}", f"{name} must be one of {', '.join(allowed)}")
    return value


def _int_arg(name: str, raw: str | None, default: int | None, lo: int, hi: int) -> int | None:
    if raw is None or raw == "":
        return default
    if not re.fullmatch(r"[0-9]{1,19}", raw) or not lo <= int(raw) <= hi:
        raise BadRequest(f"invalid_{name}", f"{name} must be an integer from {lo} to {hi}")
    return int(raw)


def _text(value: Any) -> Any:
    # Decimals leave as exact strings, like the ticker API's prices.
    return str(value) if isinstance(value, Decimal) else value


class _PgPool:
    """Idle psycopg connections reused across requests; used only from worker threads."""

    def __init__(self, dsn: str, size: int) -> None:
        self.dsn = dsn
        self.size = size
        self._idle: list[psycopg.Connection[dict[str, Any]]] = []
        self._lock = threading.Lock()

    def _connect(self) -> psycopg.Connection[dict[str, Any]]:
        return psycopg.connect(
            self.dsn,
            autocommit=True,
            row_factory=dict_row,
            connect_timeout=PG_CONNECT_TIMEOUT_S,
            options=f"-c statement_timeout={PG_STATEMENT_TIMEOUT_MS}",
        )

    def fetch(self, sql: str, params: Sequence[Any]) -> list[dict[str, Any]]:
        with self._lock:
            conn = self._idle.pop() if self._idle else None
        if conn is None or conn.closed:
            conn = self._connect()
        try:
            rows = conn.execute(sql, params).fetchall()
        except BaseException:
            conn.close()  # its state is unknown: never reuse it
            raise
        with self._lock:
            if len(self._idle) < self.size:
                self._idle.append(conn)
                conn = None
        if conn is not None:
            conn.close()
        return rows

    def ping(self) -> None:
        with self._connect() as conn:
            conn.execute("SELECT 1")

    def close(self) -> None:
        with self._lock:
            idle, self._idle = self._idle, []
        for conn in idle:
            conn.close()


def _pg_address(dsn: str) -> str:
    """host:port of a DSN (URL or key=value form), never its credentials."""
    try:
        info = psycopg.conninfo.conninfo_to_dict(dsn)
    except psycopg.ProgrammingError:
        return "the configured POSTGRES_DSN"
    host = str(info.get("host") or "localhost")
    return f"{host}:{info.get('port') or 5432}"


class _Stores:
    def __init__(self, rt: Runtime) -> None:
        dsn = rt.config.analytics.postgres_dsn
        self.rt = rt
        self.pg = _PgPool(dsn, PG_THREADS) if dsn else None
        self.pg_at = _pg_address(dsn) if dsn else ""
        self.pg_problem: str | None = None
        self.probe_scope = trio.CancelScope()
        if self.pg is not None:
            rt.health.set(ANALYTICS, started=True, healthy=False, reason="starting")
        self.pg_limiter = trio.CapacityLimiter(PG_THREADS)
        self.redis = (
            redis.Redis.from_url(rt.redis_url, socket_timeout=5, decode_responses=True)
            if rt.redis_url
            else None
        )
        self.redis_limiter = trio.CapacityLimiter(REDIS_THREADS)
        self.prefix = rt.config.analytics.redis_prefix
        self.throttle = Throttle()

    async def sql(self, query: str, params: Sequence[Any]) -> list[dict[str, Any]]:
        pg = self.pg
        if pg is None:
            raise Unavailable("POSTGRES_DSN is not set")
        try:
            rows = await trio.to_thread.run_sync(pg.fetch, query, params, limiter=self.pg_limiter)
        except psycopg.OperationalError as exc:
            self._warn("postgres", exc)
            self.pg_report(exc)
            raise Unavailable(self.pg_problem or "PostgreSQL did not answer") from exc
        except psycopg.errors.UndefinedTable as exc:
            # No Spark job (nor spark/migrate.py) has run against this database yet.
            self._warn("postgres", exc)
            raise Unavailable(
                "the analytics tables do not exist yet: run python spark/migrate.py --dsn ..."
            ) from exc
        self.pg_report(None)
        return rows

    def pg_report(self, exc: BaseException | None) -> None:
        """PostgreSQL reachability -> the `analytics` entry of /readyz and `postgres`."""
        if exc is None:
            if self.pg_problem is not None:
                log.info("api.postgres_back", postgres=self.pg_at)
            self.pg_problem = None
        else:
            # psycopg's message carries the connection attempt's own words (refused, timeout).
            text = " ".join(error_text(exc).split())[:240]
            if self.pg_problem is None:
                log.warning("api.postgres_down", postgres=self.pg_at, error=text)
            self.pg_problem = f"postgres unreachable at {self.pg_at}: {text}"
        self.rt.health.part(
            ANALYTICS,
            Dependency.POSTGRES,
            self.pg_problem,
            ok=f"postgres answering at {self.pg_at}",
            meanwhile="analytics endpoints answer 503",
        )

    async def probe_forever(self) -> None:
        """SELECT 1 every PG_PROBE_S (bounded by the connect and statement timeouts)."""
        pg = self.pg
        if pg is None:
            return
        with self.probe_scope:
            while True:
                try:
                    # Its own short-lived connection, closed in the thread: a probe abandoned at
                    # shutdown then leaves nothing behind in the pool.
                    await trio.to_thread.run_sync(pg.ping, abandon_on_cancel=True)
                except psycopg.Error as exc:
                    self.pg_report(exc)
                else:
                    self.pg_report(None)
                await trio.sleep(PG_PROBE_S)

    async def redis_call(self, fn: Callable[[redis.Redis], T]) -> T:
        client = self.redis
        if client is None:
            raise Unavailable("no Redis configured")
        try:
            return await trio.to_thread.run_sync(fn, client, limiter=self.redis_limiter)
        except redis.RedisError as exc:
            self._warn("redis", exc)
            raise Unavailable("Redis did not answer") from exc

    def _warn(self, store: str, exc: Exception) -> None:
        suppressed = self.throttle.should_log(f"analytics.{store}", time.monotonic())
        if suppressed is not None:
            log.warning(
                "api.store_unavailable", store=store, error=str(exc)[:300], suppressed=suppressed
            )

    def close(self) -> None:
        if self.pg is not None:
            self.pg.close()
        if self.redis is not None:
            self.redis.close()


_KLINES_SQL = """
SELECT * FROM (
    SELECT window_start, window_end, open, high, low, close, volume, quote_volume, vwap,
           trades_count, taker_buy_volume, taker_sell_volume
    FROM trade_aggregates WHERE symbol = %s AND interval = %s
    ORDER BY window_start DESC LIMIT %s
) newest ORDER BY window_start
"""

_INDICATORS_SQL = """
SELECT * FROM (
    SELECT open_time, close, vwap, "values" FROM indicators
    WHERE symbol = %s AND interval = %s ORDER BY open_time DESC LIMIT %s
) newest ORDER BY open_time
"""


def _anomalies_sql(symbol: str | None, since: int | None) -> tuple[str, list[Any]]:
    where: list[str] = []
    params: list[Any] = []
    if symbol is not None:
        where.append("symbol = %s")
        params.append(symbol)
    if since is not None:
        where.append("window_start >= %s")
        params.append(since)
    clause = f"WHERE {' AND '.join(where)}" if where else ""
    sql = (
        "SELECT symbol, type, window_start, window_end, observed, baseline, score, threshold,"
        f" detected_at, trade_id FROM anomalies {clause}"
        " ORDER BY window_start DESC, symbol, type, trade_id NULLS FIRST LIMIT %s"
    )
    return sql, params


def create_blueprint(rt: Runtime) -> Blueprint:
    bp = Blueprint("analytics", __name__)
    stores = _Stores(rt)

    @bp.before_app_serving
    async def _probe() -> None:
        nursery: trio.Nursery = current_app.nursery  # type: ignore[attr-defined]  # QuartTrio
        nursery.start_soon(stores.probe_forever)

    @bp.after_app_serving
    async def _close() -> None:
        stores.probe_scope.cancel()
        rt.health.forget(ANALYTICS)
        await trio.to_thread.run_sync(stores.close)

    @bp.errorhandler(BadRequest)
    async def _bad(exc: BadRequest) -> Response:
        return _error(400, exc.error, exc.detail, **exc.extra)

    @bp.errorhandler(Unavailable)
    async def _unavailable(exc: Unavailable) -> Response:
        return _error(503, "storage_unavailable", str(exc))

    @bp.get("/api/v1/market/<symbol>/klines")
    async def klines(symbol: str) -> Response:
        name = _symbol(symbol)
        interval = _choice("interval", request.args.get("interval"), AGG_INTERVALS, "1m")
        limit = _int_arg("limit", request.args.get("limit"), 100, 1, MAX_LIMIT)
        rows = await stores.sql(_KLINES_SQL, (name, interval, limit))
        bars = []
        for r in rows:
            bar = {k: _text(v) for k, v in r.items()}
            bars.append({"open_time": r["window_start"], "close_time": r["window_end"], **bar})
        return jsonify({"symbol": name, "interval": interval, "klines": bars})

    @bp.get("/api/v1/market/<symbol>/aggregates")
    async def aggregates(symbol: str) -> Response:
        name = _symbol(symbol)
        keys = [f"{stores.prefix}:agg:{name}:{i}" for i in AGG_INTERVALS]

        def read(client: redis.Redis) -> list[dict[str, str]]:
            pipe = client.pipeline(transaction=False)
            for key in keys:
                pipe.hgetall(key)
            return list(pipe.execute())

        hashes = await stores.redis_call(read)
        latest: dict[str, Any] = {}
        for interval, h in zip(AGG_INTERVALS, hashes, strict=True):
            if not h:
                latest[interval] = None
                continue
            latest[interval] = {
                k: (int(v) if k in ("window_start", "window_end", "trades_count") else v or None)
                for k, v in h.items()
                if k not in ("_order", "symbol", "interval")
            }
        return jsonify({"symbol": name, "aggregates": latest})

    @bp.get("/api/v1/analytics/<symbol>/indicators")
    async def indicators(symbol: str) -> Response:
        name = _symbol(symbol)
        interval = _choice("interval", request.args.get("interval"), KLINE_INTERVALS, "1m")
        limit = _int_arg("limit", request.args.get("limit"), 1, 1, MAX_LIMIT)
        rows = await stores.sql(_INDICATORS_SQL, (name, interval, limit))
        out = [
            {
                "open_time": r["open_time"],
                "close": _text(r["close"]),
                "vwap": _text(r["vwap"]),
                **r["values"],
            }
            for r in rows
        ]
        return jsonify({"symbol": name, "interval": interval, "indicators": out})

    @bp.get("/api/v1/analytics/anomalies")
    async def anomalies() -> Response:
        raw_symbol = request.args.get("symbol")
        name = _symbol(raw_symbol) if raw_symbol else None
        since = _int_arg("since", request.args.get("since"), None, 0, 2**63 - 1)
        limit = _int_arg("limit", request.args.get("limit"), 100, 1, MAX_LIMIT)
        sql, params = _anomalies_sql(name, since)
        rows = await stores.sql(sql, (*params, limit))
        return jsonify({"anomalies": rows})

    return bp


# -- OpenAPI 3.1 path items, merged into /openapi.json by app.py ---------------------------------

_DEC = {"type": ["string", "null"], "description": "exact decimal string"}
_NUM = {"type": ["number", "null"]}


def _err(description: str) -> dict[str, Any]:
    return {
        "description": description,
        "content": {"application/json": {"schema": {"$ref": "#/components/schemas/Error"}}},
    }


def _ok(schema: str, description: str) -> dict[str, Any]:
    return {
        "description": description,
        "content": {"application/json": {"schema": {"$ref": f"#/components/schemas/{schema}"}}},
    }


_SYMBOL = {
    "name": "symbol",
    "in": "path",
    "required": True,
    "description": "case-insensitive; [A-Z0-9]{2,30} after upper-casing",
    "schema": {"type": "string", "pattern": "^[A-Za-z0-9]{2,30}$"},
}


def _limit(default: int) -> dict[str, Any]:
    return {
        "name": "limit",
        "in": "query",
        "schema": {"type": "integer", "minimum": 1, "maximum": MAX_LIMIT, "default": default},
    }


_UNAVAILABLE = _err("storage_unavailable: POSTGRES_DSN unset or PostgreSQL not answering")

OPENAPI_SCHEMAS: Final[dict[str, Any]] = {
    "Klines": {
        "type": "object",
        "required": ["symbol", "interval", "klines"],
        "properties": {
            "symbol": {"type": "string"},
            "interval": {"type": "string", "enum": list(AGG_INTERVALS)},
            "klines": {
                "type": "array",
                "description": "the newest `limit` closed windows, oldest first",
                "items": {
                    "type": "object",
                    "properties": {
                        "open_time": {"type": "integer", "description": "window start, epoch ms"},
                        "close_time": {"type": "integer", "description": "window end, epoch ms"},
                        "window_start": {"type": "integer", "description": "= open_time"},
                        "window_end": {
                            "type": "integer",
                            "description": "= close_time (exclusive end)",
                        },
                        **dict.fromkeys(
                            (
                                "open",
                                "high",
                                "low",
                                "close",
                                "volume",
                                "quote_volume",
                                "vwap",
                                "taker_buy_volume",
                                "taker_sell_volume",
                            ),
                            _DEC,
                        ),
                        "trades_count": {"type": "integer"},
                    },
                },
            },
        },
    },
    "Aggregates": {
        "type": "object",
        "required": ["symbol", "aggregates"],
        "properties": {
            "symbol": {"type": "string"},
            "aggregates": {
                "type": "object",
                "description": "latest closed window per interval (1m, 5m, 15m), null if none",
                "additionalProperties": {"type": ["object", "null"]},
            },
        },
    },
    "Indicators": {
        "type": "object",
        "required": ["symbol", "interval", "indicators"],
        "properties": {
            "symbol": {"type": "string"},
            "interval": {"type": "string"},
            "indicators": {
                "type": "array",
                "description": "the newest `limit` closed klines, oldest first; null until an "
                "indicator's lookback has passed",
                "items": {
                    "type": "object",
                    "properties": {
                        "open_time": {"type": "integer"},
                        "close": _DEC,
                        "vwap": _DEC,
                        **dict.fromkeys(
                            (
                                "sma_7",
                                "sma_25",
                                "sma_99",
                                "ema_7",
                                "ema_25",
                                "ema_99",
                                "rsi_14",
                                "macd",
                                "macd_signal",
                                "macd_hist",
                                "bb_upper",
                                "bb_middle",
                                "bb_lower",
                            ),
                            _NUM,
                        ),
                    },
                    "additionalProperties": _NUM,
                },
            },
        },
    },
    "Anomalies": {
        "type": "object",
        "required": ["anomalies"],
        "properties": {
            "anomalies": {
                "type": "array",
                "description": "newest first",
                "items": {
                    "type": "object",
                    "properties": {
                        "symbol": {"type": "string"},
                        "type": {
                            "type": "string",
                            "enum": [
                                "volume_spike",
                                "price_jump",
                                "volatility_change",
                                "whale_trade",
                            ],
                        },
                        "window_start": {"type": "integer"},
                        "window_end": {"type": "integer"},
                        "observed": {"type": "number"},
                        "baseline": {"type": "number"},
                        "score": {"type": "number"},
                        "threshold": {"type": "number"},
                        "detected_at": {"type": "integer"},
                        "trade_id": {"type": ["integer", "null"]},
                    },
                },
            }
        },
    },
}

OPENAPI_PATHS: Final[dict[str, Any]] = {
    "/api/v1/market/{symbol}/klines": {
        "get": {
            "summary": "OHLCV bars from trade aggregation (PostgreSQL warm storage)",
            "parameters": [
                _SYMBOL,
                {
                    "name": "interval",
                    "in": "query",
                    "schema": {"type": "string", "enum": list(AGG_INTERVALS), "default": "1m"},
                },
                _limit(100),
            ],
            "responses": {
                "200": _ok("Klines", "bars, oldest first"),
                "400": _err("invalid_symbol, invalid_interval or invalid_limit"),
                "503": _UNAVAILABLE,
            },
        }
    },
    "/api/v1/market/{symbol}/aggregates": {
        "get": {
            "summary": "Latest closed aggregate window per interval (Redis)",
            "parameters": [_SYMBOL],
            "responses": {
                "200": _ok("Aggregates", "latest window per interval"),
                "400": _err("invalid_symbol"),
                "503": _err("storage_unavailable: Redis not configured or not answering"),
            },
        }
    },
    "/api/v1/analytics/{symbol}/indicators": {
        "get": {
            "summary": "Technical indicators per closed kline (PostgreSQL)",
            "parameters": [
                _SYMBOL,
                {
                    "name": "interval",
                    "in": "query",
                    "schema": {"type": "string", "enum": list(KLINE_INTERVALS), "default": "1m"},
                },
                _limit(1),
            ],
            "responses": {
                "200": _ok("Indicators", "indicator rows, oldest first"),
                "400": _err("invalid_symbol, invalid_interval or invalid_limit"),
                "503": _UNAVAILABLE,
            },
        }
    },
    "/api/v1/analytics/anomalies": {
        "get": {
            "summary": "Detected anomalies, newest first (PostgreSQL)",
            "parameters": [
                {
                    "name": "symbol",
                    "in": "query",
                    "schema": {"type": "string", "pattern": "^[A-Za-z0-9]{2,30}$"},
                },
                {
                    "name": "since",
                    "in": "query",
                    "description": "only windows starting at or after this epoch ms",
                    "schema": {"type": "integer", "minimum": 0},
                },
                _limit(100),
            ],
            "responses": {
                "200": _ok("Anomalies", "anomalies, newest first"),
                "400": _err("invalid_symbol, invalid_since or invalid_limit"),
                "503": _UNAVAILABLE,
            },
        }
    },
}
