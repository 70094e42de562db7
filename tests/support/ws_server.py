"""A scripted WebSocket server for ingest tests: sends given frames to each connection.

Unlike the fake exchange, it sends exactly what the test says (malformed frames included) and
records every connection's request path, so tests can check subscription and reconnect behaviour.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import attrs
import trio
from trio_websocket import ConnectionClosed, WebSocketRequest, serve_websocket


@attrs.define
class Scripted:
    """Per-connection script: frames to send, then either close or stay open."""

    frames_for: Callable[[int], Sequence[str | bytes]]  # connection index -> frames
    # Close the connection after sending its frames: for every connection, or those it says.
    close_after: bool | Callable[[int], bool] = False
    paths: list[str] = attrs.field(factory=list)
    connections: int = 0
    sent: int = 0
    done: trio.Event = attrs.field(factory=trio.Event)

    async def handler(self, request: WebSocketRequest) -> None:
        index = self.connections
        self.connections += 1
        self.paths.append(request.path)
        ws = await request.accept()
        try:
            for frame in self.frames_for(index):
                await ws.send_message(frame)
                self.sent += 1
            close = self.close_after(index) if callable(self.close_after) else self.close_after
            if close:
                await ws.aclose(code=1001, reason="scripted close")
                return
            self.done.set()
            await trio.sleep_forever()
        except ConnectionClosed:
            return


async def serve_scripted(
    script: Scripted, *, task_status: trio.TaskStatus[int] = trio.TASK_STATUS_IGNORED
) -> None:
    """Serve on 127.0.0.1, free port; reports the port."""
    async with trio.open_nursery() as nursery:
        servers = await nursery.start(
            lambda **kw: serve_websocket(
                script.handler, "127.0.0.1", 0, ssl_context=None, max_message_size=16 << 20, **kw
            )
        )
        task_status.started(servers.port)
