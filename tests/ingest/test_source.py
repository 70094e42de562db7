"""The connection task's reads: what trio-websocket already parsed is taken in one wake-up.

`buffered_messages` reaches into trio-websocket's private `_recv_channel` (0.12 has no public
non-blocking receive): these tests break if a release changes it.
"""

from __future__ import annotations

import trio
import trio_websocket

from marketd.ingest.source import WS_QUEUE_FRAMES, buffered_messages


async def test_buffered_messages_takes_what_the_reader_parsed_in_order() -> None:
    sent = [f"m{i}" for i in range(20)]

    async def handler(request: trio_websocket.WebSocketRequest) -> None:
        ws = await request.accept()
        for m in sent:
            await ws.send_message(m)
        await trio.sleep_forever()

    with trio.fail_after(10):
        async with trio.open_nursery() as nursery:
            listeners = await nursery.start(
                trio_websocket.serve_websocket, handler, "127.0.0.1", 0, None
            )
            port = listeners.port
            async with trio_websocket.open_websocket(
                "127.0.0.1", port, "/", use_ssl=False, message_queue_size=WS_QUEUE_FRAMES
            ) as ws:
                assert isinstance(ws._recv_channel, trio.MemoryReceiveChannel)
                take = buffered_messages(ws)
                got = [await ws.get_message()]
                while len(got) < len(sent):
                    try:
                        got.append(take())
                    except trio.WouldBlock:
                        await trio.sleep(0.01)  # the reader has not parsed the rest yet
                assert got == sent
                try:
                    take()
                except trio.WouldBlock:
                    pass
                else:
                    raise AssertionError("nothing more was sent")
            nursery.cancel_scope.cancel()
