"""A passive subscriber that keeps the fake exchange's market trading while marketd is away.

The fake exchange generates trades only for symbols somebody subscribes to; Binance trades on
whether marketd is connected or not. A fault test or benchmark that disconnects, restarts or
kills marketd runs this beside it, so a disconnect leaves a real hole to backfill. It subscribes
to `<symbol>@avgPrice`, whose frames carry no trade ids, so the ledger's trade ranges stay
marketd's. It resubscribes after every close (fault switches close it too) until cancelled.
"""

from __future__ import annotations

from collections.abc import Iterable
from urllib.parse import urlsplit

import trio
import trio_websocket


async def keep_market_trading(
    ws_url: str,
    symbols: Iterable[str],
    *,
    task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED,
) -> None:
    """Stay subscribed to `<symbol>@avgPrice` on `ws_url`; started once the first connection is
    up."""
    parts = urlsplit(ws_url)
    if parts.hostname is None or parts.port is None:
        raise ValueError(f"{ws_url!r}: need ws://host:port/...")
    resource = parts.path + "?streams=" + "/".join(f"{s.lower()}@avgPrice" for s in symbols)
    started = False
    while True:
        try:
            # Our own TCP stream, closed by us: trio-websocket 0.12 leaves the socket open when
            # the server completes a close handshake (serverShutdown, the 24 h close).
            async with (
                await trio.open_tcp_stream(parts.hostname, parts.port) as stream,
                trio.open_nursery() as nursery,
            ):
                ws = await trio_websocket.wrap_client_stream(
                    nursery, stream, parts.hostname, resource
                )
                if not started:
                    started = True
                    task_status.started()
                try:
                    while True:
                        await ws.get_message()
                finally:
                    with trio.CancelScope(shield=True, deadline=trio.current_time() + 1):
                        await ws.aclose()
        except* (trio_websocket.ConnectionClosed, trio_websocket.HandshakeError, OSError):
            pass  # closed by a fault switch (or the exchange went): subscribe again
        await trio.sleep(0.1)
