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
        "properties": {
            "ready": {"type": "boolean"},
            "components": {"type": "object", "additionalProperties": {"type": "object"}},
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

OPENAPI_PATHS: Final[dict[str, Any]] = {
    "/api/v1/ticker/{symbol}": {
        "get": {
            "summary": "One tracked ticker (SPEC §5)",
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
            "description": "Real-time Binance market data: tickers from Redis, health, metrics.",
        },
        "paths": paths,
        "components": {"schemas": schemas},
    }
