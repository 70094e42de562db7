"""The OpenAPI 3.1 document served at /openapi.json.

The core endpoints are described here as plain data (`OPENAPI_PATHS`); a blueprint module
(e.g. marketd/api/analytics.py) contributes its own paths by exporting `OPENAPI_PATHS` (and
optionally `OPENAPI_SCHEMAS`), merged by `build_document` when the app is created.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from typing import Any, Final

_STR = {"type": "string"}
_INT = {"type": "integer"}
_NINT = {"type": ["integer", "null"]}
_DEC = {"type": ["string", "null"], "description": "exact decimal string, as the exchange sent it"}


def _json(schema: str, description: str) -> dict[str, Any]:
    return {
        "description": description,
        "content": {"application/json": {"schema": {"$ref": f"#/components/schemas/{schema}"}}},
    }


def _events(**schemas: str) -> dict[str, Any]:
    """A Server-Sent Events response: the event names and each one's data schema."""
    return {
        "description": "the event stream",
        "content": {
            "text/event-stream": {
                "schema": {"type": "string"},
                "x-events": {
                    event: {"$ref": f"#/components/schemas/{schema}"}
                    for event, schema in schemas.items()
                },
            }
        },
    }


SCHEMAS: Final[dict[str, Any]] = {
    "Ticker": {
        "type": "object",
        "required": ["symbol", "complete"],
        "properties": {
            "symbol": _STR,
            "last_price": _DEC,
            "price_change": _DEC,
            "price_change_pct": _DEC,
            "open": _DEC,
            "high": _DEC,
            "low": _DEC,
            "volume": _DEC,
            "quote_volume": _DEC,
            "trades_count": _NINT,
            "event_time": {**_NINT, "description": "exchange event time, epoch ms"},
            "updated_at": {**_NINT, "description": "when written to Redis, epoch ms"},
            "age_ms": {**_NINT, "description": "now - event_time: how fresh the value is"},
            "complete": {"type": "boolean", "description": "every field present and well-formed"},
        },
    },
    "Tickers": {
        "type": "object",
        "required": ["tickers", "missing", "count"],
        "properties": {
            "tickers": {"type": "array", "items": {"$ref": "#/components/schemas/Ticker"}},
            "missing": {"type": "array", "items": _STR, "description": "tracked, no data"},
            "count": _INT,
        },
    },
    "TickerHealth": {
        "type": "object",
        "properties": {
            "status": {"enum": ["ok", "degraded"]},
            "redis": {"type": "boolean"},
            "tracked": _INT,
            "fresh": _INT,
            "stale": _INT,
            "missing": _INT,
            "consumer_lag": {**_NINT, "description": "null when the consumer is not in-process"},
            "last_message_age_ms": _NINT,
        },
    },
    "Readiness": {
        "type": "object",
        "required": ["ready", "components", "dependencies"],
        "properties": {
            "ready": {"type": "boolean", "description": "every entry started and healthy"},
            "components": {
                "type": "object",
                "description": "enabled components, plus parts with a dependency of their own "
                "(backfill: Binance REST, analytics: PostgreSQL)",
                "additionalProperties": {
                    "type": "object",
                    "required": ["started", "healthy", "reason"],
                    "properties": {
                        "started": {"type": "boolean"},
                        "healthy": {"type": "boolean"},
                        "reason": {
                            "type": "string",
                            "description": "what it does, or the dependency, its address and "
                            "the error, with ', since HH:MM:SSZ' while unhealthy",
                        },
                        "since": {"type": "string", "format": "date-time"},
                        "since_ms": {"type": "integer"},
                    },
                },
            },
            "dependencies": {
                "type": "object",
                "description": "redis, kafka, binance_ws, binance_rest, postgres: reachability",
                "additionalProperties": {
                    "type": "object",
                    "properties": {
                        "up": {"type": "boolean"},
                        "reason": {"type": "string"},
                        "since": {"type": "string", "format": "date-time"},
                    },
                },
            },
        },
    },
    "Error": {
        "type": "object",
        "required": ["error"],
        "properties": {"error": _STR, "detail": _STR},
    },
}

_SYMBOL_PARAM = {
    "name": "symbol",
    "in": "path",
    "required": True,
    "description": "case-insensitive; [A-Z0-9]{2,30} after upper-casing",
    "schema": {"type": "string", "pattern": "^[A-Za-z0-9]{2,30}$"},
}

_DEPTH_PARAM = {
    "name": "depth",
    "in": "query",
    "required": False,
    "description": "levels per side, 1 to the stored depth (book.redis_depth, default 20); "
    "default: every stored level",
    "schema": {"type": "integer", "minimum": 1},
}

_LAST_EVENT_ID_PARAM = {
    "name": "Last-Event-ID",
    "in": "header",
    "required": False,
    "description": "the last `id:` received; sent by EventSource on reconnect",
    "schema": {"type": "string", "pattern": "^[0-9]+-[0-9]+$"},
}

OPENAPI_PATHS: Final[dict[str, Any]] = {
    "/api/v1/ticker/{symbol}": {
        "get": {
            "summary": "One tracked ticker",
            "parameters": [_SYMBOL_PARAM],
            "responses": {
                "200": _json("Ticker", "the stored ticker"),
                "400": _json("Error", "malformed symbol"),
                "404": _json("Error", "untracked symbol, or no data yet / expired (no_data)"),
                "503": _json("Error", "Redis unavailable"),
            },
        }
    },
    "/api/v1/tickers": {
        "get": {
            "summary": "All tracked tickers, one Redis round trip",
            "responses": {
                "200": _json("Tickers", "tickers with data, and the tracked ones without"),
                "503": _json("Error", "Redis unavailable"),
            },
        }
    },
    "/api/v1/ticker/health": {
        "get": {
            "summary": "Ticker service health",
            "responses": {
                "200": _json("TickerHealth", "Redis answers and at least half are fresh"),
                "503": _json("TickerHealth", "degraded"),
            },
        }
    },
    "/healthz": {
        "get": {
            "summary": "Process alive",
            "responses": {"200": {"description": "alive"}},
        }
    },
    "/readyz": {
        "get": {
            "summary": "All enabled components started and healthy",
            "responses": {
                "200": _json("Readiness", "ready"),
                "503": _json("Readiness", "not ready"),
            },
        }
    },
    "/metrics": {
        "get": {
            "summary": "Prometheus metrics",
            "responses": {
                "200": {"description": "text exposition format", "content": {"text/plain": {}}}
            },
        }
    },
    "/openapi.json": {
        "get": {"summary": "This document", "responses": {"200": {"description": "OpenAPI"}}}
    },
    "/api/v1/stream/tickers": {
        "get": {
            "summary": "Server-Sent Events: a snapshot, then one event per stored ticker update",
            "description": (
                "`text/event-stream`. Events: `snapshot` (data: Tickers, id: the last update id "
                "at that instant), then `ticker` (data: Ticker plus age_ms at send time, id: the "
                "update's id in the Redis stream `tickers:updates`), `status` (data: StreamStatus; "
                "Redis unavailable or back, followed by a fresh `snapshot`), and `: keep-alive` "
                "comments every 15 s. Reconnect with `Last-Event-ID` to get the newest update of "
                "every symbol that changed since that id, or a fresh `snapshot` when the id is no "
                "longer in the stream: never a silent gap. A slow client gets the newest update "
                "per symbol (intermediate ones are conflated); one behind for more than 10 s is "
                "disconnected. See docs/streaming.md."
            ),
            "parameters": [
                {
                    "name": "symbols",
                    "in": "query",
                    "required": False,
                    "description": "comma-separated tracked symbols (default: all tracked)",
                    "schema": {"type": "string"},
                },
                {
                    "name": "conflate",
                    "in": "query",
                    "required": False,
                    "description": "0 = every update, no conflation (disconnected past 10,000 "
                    "pending updates)",
                    "schema": {"type": "string", "enum": ["0", "1"], "default": "1"},
                },
                _LAST_EVENT_ID_PARAM,
            ],
            "responses": {
                "200": _events(snapshot="Tickers", ticker="Ticker", status="StreamStatus"),
                "400": _json("Error", "malformed or untracked symbol"),
                "405": _json("Error", "not GET"),
                "503": _json("Error", "too many streams on this process, or not running"),
            },
        }
    },
    "/api/v1/stream/health": {
        "get": {
            "summary": "Server-Sent Events: component health, an event on every change",
            "description": (
                "`text/event-stream` of `health` events (data: HealthState: every component's "
                "health record and the push stream's view of Redis), the first at once, then on "
                "each change (checked every 0.5 s), keep-alive comments every 15 s."
            ),
            "responses": {
                "200": _events(health="HealthState"),
                "503": _json("Error", "too many streams on this process"),
            },
        }
    },
    "/api/v1/book/{symbol}": {
        "get": {
            "summary": "One order book's top levels, as last written to Redis book:{SYMBOL}",
            "description": (
                "The local book marketd keeps from the diff depth stream, its top levels as the "
                "book writer stored them after an applied batch. 503 `out_of_sync` (with the "
                "reason) while the book resynchronises with the exchange. See docs/books.md."
            ),
            "parameters": [_SYMBOL_PARAM, _DEPTH_PARAM],
            "responses": {
                "200": _json("Book", "the stored book"),
                "400": _json("Error", "malformed symbol (invalid_symbol) or depth (invalid_depth)"),
                "404": _json("Error", "no book kept for this symbol, or none stored yet (no_data)"),
                "500": _json("Error", "the stored hash is not a book (corrupt_book)"),
                "503": _json("OutOfSync", "the book is resynchronising, or Redis unavailable"),
            },
        }
    },
    "/api/v1/stream/book/{symbol}": {
        "get": {
            "summary": "Server-Sent Events: a book snapshot, then one event per stored book",
            "description": (
                "`text/event-stream`. Events: `snapshot` (data: BookSnapshot, id: the last "
                "update id of `books:updates` at that instant), then `book` (data: Book with "
                "age_ms at send time, in_sync and reason, id: the entry in the Redis stream "
                "`books:updates`), `status` (Redis unavailable or back, followed by a fresh "
                "`snapshot`), and `: keep-alive` comments every 15 s. A client behind gets the "
                "newest book (intermediate ones are conflated); one behind for more than 10 s "
                "is disconnected. `Last-Event-ID` resumes with the newest book stored since, "
                "or a fresh snapshot when that id is no longer in the stream. The client cap "
                "is shared with the other streams. See docs/streaming.md."
            ),
            "parameters": [
                _SYMBOL_PARAM,
                _DEPTH_PARAM,
                _LAST_EVENT_ID_PARAM,
            ],
            "responses": {
                "200": _events(snapshot="BookSnapshot", book="Book", status="StreamStatus"),
                "400": _json("Error", "malformed symbol or depth"),
                "404": _json("Error", "no book kept for this symbol"),
                "405": _json("Error", "not GET"),
                "503": _json("Error", "too many streams on this process, or not running"),
            },
        }
    },
    "/api/v1/dashboard/stats": {
        "get": {
            "summary": "This process's ingest counters for the dashboard (GET / serves the page)",
            "responses": {"200": {"description": "counters by family and label set"}},
        }
    },
}

_LEVELS = {
    "type": "array",
    "description": "[[price, quantity], ...], best first, exact decimal strings",
    "items": {"type": "array", "items": _STR, "minItems": 2, "maxItems": 2},
}
SCHEMAS["Book"] = {
    "type": "object",
    "required": ["symbol", "last_update_id", "event_time", "bids", "asks", "age_ms", "in_sync"],
    "properties": {
        "symbol": _STR,
        "last_update_id": {**_INT, "description": "Binance's update id the book is at (u)"},
        "event_time": {**_INT, "description": "exchange time of the last applied event, epoch "
                       "ms (0: unknown)"},
        "updated_at": {**_INT, "description": "when written to Redis, epoch ms"},
        "bids": _LEVELS,
        "asks": _LEVELS,
        "age_ms": {**_INT, "description": "now - event_time (or - updated_at when unknown)"},
        "in_sync": {"type": "boolean", "description": "false while the book resynchronises"},
        "reason": {"type": ["string", "null"], "description": "why it is out of sync"},
    },
}  # fmt: skip
SCHEMAS["BookSnapshot"] = {
    "type": "object",
    "required": ["symbol", "book"],
    "properties": {
        "symbol": _STR,
        "book": {
            "oneOf": [{"$ref": "#/components/schemas/Book"}, {"type": "null"}],
            "description": "null: no book stored yet (or expired)",
        },
    },
}
SCHEMAS["OutOfSync"] = {
    "type": "object",
    "required": ["error"],
    "properties": {
        "error": {"enum": ["out_of_sync", "redis_unavailable"]},
        "detail": _STR,
        "reason": {**_STR, "description": "out_of_sync: why (gap, crossed, reconnect, ...)"},
        "symbol": _STR,
        "last_update_id": _INT,
    },
}
SCHEMAS["StreamStatus"] = {
    "type": "object",
    "required": ["redis"],
    "properties": {"redis": {"type": "boolean"}, "detail": _STR},
}
SCHEMAS["HealthState"] = {
    "type": "object",
    "required": ["components", "dependencies", "stream"],
    "properties": {
        "components": {
            "type": "object",
            "description": "component name -> its health record (healthy, reason, since, ...)",
            "additionalProperties": {"type": "object"},
        },
        "dependencies": {
            "type": "object",
            "description": "dependency name -> {up, reason, since}",
            "additionalProperties": {"type": "object"},
        },
        "stream": {
            "type": "object",
            "properties": {
                "redis": {"type": "boolean"},
                "detail": _STR,
                "since_ms": _INT,
                "clients": _INT,
            },
        },
    },
}


def build_document(
    version: str,
    contributions: Iterable[tuple[Mapping[str, Any], Mapping[str, Any]]] = (),
) -> dict[str, Any]:
    """The full document: core paths plus each (paths, schemas) contribution of a blueprint."""
    paths = dict(OPENAPI_PATHS)
    schemas = dict(SCHEMAS)
    for extra_paths, extra_schemas in contributions:
        for path, item in extra_paths.items():
            if path in paths:
                raise ValueError(f"OpenAPI path {path} is described twice")
            paths[path] = item
        schemas.update(extra_schemas)
    return {
        "openapi": "3.1.0",
        "info": {
            "title": "marketd",
            "version": version,
            "description": "Real-time Binance market data: tickers and order books from Redis, "
            "health, metrics.",
        },
        "paths": paths,
        "components": {"schemas": schemas},
    }
