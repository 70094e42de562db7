"""Order books: a local book per symbol kept exact by Binance's diff-depth procedure.

The pure core (no I/O, no threads): `model` (validated depth payloads), `book` (the book),
`sync` (the per-symbol sync state machine: events in, commands out), `audit` (a book against a
REST snapshot), `pacing` (snapshot requests of many books against one weight budget).
docs/books.md describes Binance's formats and the procedure this relies on.
"""

from marketd.books.audit import AuditResult, compare
from marketd.books.book import DEFAULT_MAX_LEVELS, BookSide, OrderBook
from marketd.books.model import (
    DepthDataError,
    DepthError,
    DepthSnapshot,
    DepthStream,
    DepthUpdate,
    Level,
    PartialDepth,
    levels_json,
    parse_depth_stream,
    parse_diff,
    parse_levels,
    parse_partial,
    parse_snapshot,
    snapshot_weight,
)
from marketd.books.pacing import AuditRotation, SnapshotPacer
from marketd.books.sync import (
    Applied,
    AuditDone,
    AuditSkipped,
    BookSync,
    BookView,
    Command,
    Phase,
    PublishBook,
    PublishGap,
    RequestSnapshot,
    ResyncReason,
    SetInSync,
    SnapshotPurpose,
    SnapshotReason,
)

__all__ = [
    "DEFAULT_MAX_LEVELS",
    "Applied",
    "AuditDone",
    "AuditResult",
    "AuditRotation",
    "AuditSkipped",
    "BookSide",
    "BookSync",
    "BookView",
    "Command",
    "DepthDataError",
    "DepthError",
    "DepthSnapshot",
    "DepthStream",
    "DepthUpdate",
    "Level",
    "OrderBook",
    "PartialDepth",
    "Phase",
    "PublishBook",
    "PublishGap",
    "RequestSnapshot",
    "ResyncReason",
    "SetInSync",
    "SnapshotPacer",
    "SnapshotPurpose",
    "SnapshotReason",
    "compare",
    "levels_json",
    "parse_depth_stream",
    "parse_diff",
    "parse_levels",
    "parse_partial",
    "parse_snapshot",
    "snapshot_weight",
]
