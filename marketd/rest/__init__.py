"""Binance REST for backfill: a shared request-weight budget and a typed client."""

from marketd.rest.budget import WeightBudget
from marketd.rest.client import BinanceRest, RestAggTrade, RestKline, RestTrade
from marketd.rest.errors import (
    RestBadResponse,
    RestBanned,
    RestError,
    RestRateLimited,
    RestRejected,
    RestUnavailable,
)

__all__ = [
    "BinanceRest",
    "RestAggTrade",
    "RestBadResponse",
    "RestBanned",
    "RestError",
    "RestKline",
    "RestRateLimited",
    "RestRejected",
    "RestTrade",
    "RestUnavailable",
    "WeightBudget",
]
