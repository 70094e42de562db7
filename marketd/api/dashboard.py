"""The dashboard: GET / (one page), its checked-in assets, and a small stats endpoint.

The page (marketd/api/static/) is plain HTML, CSS and one script, no framework and no CDN, so it
works offline. Everything it shows comes from the public API: the ticker and health streams
(marketd/api/stream.py), the 1-minute klines of the analytics API when present, and
GET /api/v1/dashboard/stats, which sums this process's ingest counters from its metrics registry.
Read-only. Every answer here carries a strict Content-Security-Policy: scripts and styles from
this origin only, no inline script, no eval; the script writes data with textContent only.
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any, Final

import msgspec
from quart import Blueprint, Response

from marketd.runtime import Runtime

STATIC: Final = Path(__file__).parent / "static"
ASSETS: Final = {
    "dashboard.js": "text/javascript; charset=utf-8",
    "dashboard.css": "text/css; charset=utf-8",
    "favicon.svg": "image/svg+xml",
}
CSP: Final = (
    "default-src 'none'; script-src 'self'; style-src 'self'; img-src 'self' data:; "
    "connect-src 'self'; font-src 'self'; base-uri 'none'; form-action 'none'; "
    "frame-ancestors 'none'"
)
SECURITY_HEADERS: Final = {
    "Content-Security-Policy": CSP,
    "X-Content-Type-Options": "nosniff",
    "Referrer-Policy": "no-referrer",
    "X-Frame-Options": "DENY",
}
# The counters the page turns into rates and recent-event counts (families of marketd/metrics).
STAT_FAMILIES: Final = (
    "marketd_decode_records",
    "marketd_kafka_produced",
    "marketd_gaps",
    "marketd_backfill_requests",
    "marketd_backfill_records",
    "marketd_ws_reconnects",
    "marketd_tickers_consumer_lag",
    "marketd_stream_clients",
    "marketd_stream_dropped_clients",
)
_encode = msgspec.json.Encoder().encode


def stats(rt: Runtime, books: tuple[str, ...] = ()) -> dict[str, Any]:
    """Current values of STAT_FAMILIES in this process, by family and label set.

    An API-only process has no ingest: its families are simply absent and the page says so.
    """
    out: dict[str, dict[str, float]] = {}
    for family in rt.metrics.registry.collect():
        if family.name not in STAT_FAMILIES:
            continue
        series = out.setdefault(family.name.removeprefix("marketd_"), {})
        for sample in family.samples:
            if sample.name.endswith("_created"):
                continue
            label = ",".join(f"{k}={v}" for k, v in sorted(sample.labels.items()))
            series[label] = series.get(label, 0.0) + sample.value
    return {
        "now_ms": time.time_ns() // 1_000_000,
        "components": list(rt.config.components.enabled()),
        "symbols": list(rt.config.tickers.symbols),
        "books": list(books),  # symbols with an order book (the page's book panel)
        # The klines panel asks the analytics API only when warm storage is configured.
        "klines": bool(getattr(getattr(rt.config, "analytics", None), "postgres_dsn", "")),
        "series": out,
    }


def create_blueprint(rt: Runtime, books: tuple[str, ...] = ()) -> Blueprint:
    bp = Blueprint("dashboard", __name__)
    # Read once: the assets are small and checked in; a missing one is a packaging error.
    index = (STATIC / "index.html").read_bytes()
    assets = {name: (STATIC / name).read_bytes() for name in ASSETS}

    @bp.get("/")
    async def page() -> Response:
        headers = {**SECURITY_HEADERS, "Cache-Control": "no-cache"}
        return Response(index, status=200, content_type="text/html; charset=utf-8", headers=headers)

    @bp.get("/assets/<name>")
    async def asset(name: str) -> Response:
        body = assets.get(name)
        if body is None:
            return Response(
                _encode({"error": "not_found", "detail": "no such asset"}),
                status=404,
                content_type="application/json",
            )
        headers = {**SECURITY_HEADERS, "Cache-Control": "no-cache"}
        return Response(body, status=200, content_type=ASSETS[name], headers=headers)

    @bp.get("/api/v1/dashboard/stats")
    async def dashboard_stats() -> Response:
        return Response(
            _encode(stats(rt, books)),
            status=200,
            content_type="application/json",
            headers={"Cache-Control": "no-store"},
        )

    return bp
