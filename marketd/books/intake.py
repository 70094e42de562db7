"""A connection's frame intake with depth streams: depth frames to the book keeper, the rest to
the tape intake (marketd/ingest/intake.py), one outbox for both.

`BookIntake.take(messages, recv_ns, conn)` looks at each frame's stream name: a frame of a
depth stream this process subscribed goes through `BookKeeper.on_frame` and its records into
the shared outbox at once (per symbol in arrival order); every other frame (other kinds,
control replies, anything it cannot read) goes to the tape intake unchanged, which decodes or
dead-letters it as before. Reconnect notices reach both. Nothing is awaited in `take`.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from typing import Protocol

import msgspec

from marketd.books.keeper import BookKeeper
from marketd.ingest.decode import Outgoing
from marketd.ingest.tape import Reconnected
from marketd.streams import StreamKind, StreamSpec

DEPTH_KINDS = (StreamKind.DEPTH, StreamKind.DEPTH_PARTIAL)


class _Envelope(msgspec.Struct):
    stream: str | None = None
    data: msgspec.Raw = msgspec.Raw(b"")  # empty: no data (a Raw cannot be in a union)


_ENVELOPE = msgspec.json.Decoder(_Envelope)


class Intake(Protocol):
    """marketd.ingest.source.FrameIntake (the tape intake)."""

    def take(self, messages: Sequence[str | bytes], recv_ns: int, conn: int) -> None: ...
    def on_reconnect(self, notice: Reconnected) -> None: ...
    def settle_now(self) -> bool: ...
    async def settle(self) -> None: ...


class Outbox(Protocol):
    def add(self, records: list[Outgoing]) -> None: ...


class BookIntake:
    def __init__(
        self,
        keeper: BookKeeper,
        tape: Intake,
        outbox: Outbox,
        streams: Iterable[StreamSpec],
        *,
        max_frame_bytes: int = 1_048_576,
    ) -> None:
        self.keeper = keeper
        self.tape = tape
        self.outbox = outbox
        self.depth = {s.name: s for s in streams if s.kind in DEPTH_KINDS}
        # Larger frames go to the tape, which dead-letters them as frame_too_large.
        self.max_frame_bytes = max_frame_bytes

    def take(self, messages: Sequence[str | bytes], recv_ns: int, conn: int) -> None:
        rest: list[str | bytes] = []
        keeper = self.keeper
        depth, on_frame, add = self.depth, keeper.on_frame, self.outbox.add
        keeper.begin_batch()  # one board view per changed book per batch
        try:
            for message in messages:
                env = self._depth_envelope(message)
                spec = depth.get(env.stream) if env is not None and env.stream else None
                if spec is None or env is None or not len(env.data):
                    rest.append(message)
                    continue
                add(on_frame(spec, env.data, recv_ns))
        finally:
            keeper.end_batch()
        if rest:
            self.tape.take(rest, recv_ns, conn)

    def _depth_envelope(self, message: str | bytes) -> _Envelope | None:
        """The envelope of what may be a depth frame; None for the others (a cheap substring
        search first: most frames of a mixed connection are not depth)."""
        found = "@depth" in message if isinstance(message, str) else b"@depth" in message
        if not found or len(message) > self.max_frame_bytes:
            return None
        try:
            return _ENVELOPE.decode(message)
        except msgspec.DecodeError:
            return None  # the tape dead-letters it with the reason

    def on_reconnect(self, notice: Reconnected) -> None:
        self.tape.on_reconnect(notice)
        symbols = [s.symbol for s in notice.streams if s.kind is StreamKind.DEPTH and s.symbol]
        if symbols:
            self.outbox.add(self.keeper.on_reconnect(symbols))

    def settle_now(self) -> bool:
        return self.tape.settle_now()

    async def settle(self) -> None:
        await self.tape.settle()
