"""Kafka-outage spool: bounded, checksummed, append-only segment files (see spool.py)."""

from marketd.spool.segment import SpoolEntry
from marketd.spool.spool import (
    Corruption,
    OpenReport,
    Position,
    Spool,
    SpoolError,
    SpoolFull,
)

__all__ = [
    "Corruption",
    "OpenReport",
    "Position",
    "Spool",
    "SpoolEntry",
    "SpoolError",
    "SpoolFull",
]
