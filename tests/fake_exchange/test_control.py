"""Live control protocol replies and errors, the 5 messages/s limit, and server pings (§2, §3)."""

from __future__ import annotations

import json
from typing import Any

import pytest
import trio
import trio_websocket

from marketd.testing.fake_exchange import control
from tests.fake_exchange.conftest import Start
from tests.fake_exchange.support import RawClient, collect, masked_text_frame, ws_url


async def _ask(ws: trio_websocket.WebSocketConnection, request: str) -> Any:
    """Send a control message, return its reply (skipping market data)."""
    await ws.send_message(request)
    msgs = await collect(ws, lambda ms: bool(ms) and "id" in ms[-1] and "e" not in ms[-1])
    return msgs[-1]


async def test_subscribe_list_unsubscribe_and_properties(start: Start) -> None:
    ex = await start()
    async with trio_websocket.open_websocket_url(ws_url(ex, "/stream")) as ws:
        req = '{"method":"SUBSCRIBE","params":["btcusdt@trade","ethusdt@aggTrade"],"id":1}'
        assert await _ask(ws, req) == {"result": None, "id": 1}
        data = await collect(ws, lambda ms: len(ms) >= 5)
        assert {m["stream"] for m in data} <= {"btcusdt@trade", "ethusdt@aggTrade"}
        await trio.sleep(0.25)  # stay under 5 messages per second
        assert await _ask(ws, '{"method":"LIST_SUBSCRIPTIONS","id":"abc"}') == {
            "result": ["btcusdt@trade", "ethusdt@aggTrade"],
            "id": "abc",
        }
        assert await _ask(ws, '{"method":"UNSUBSCRIBE","params":["ethusdt@aggTrade"],"id":-3}') == {
            "result": None,
            "id": -3,
        }
        assert await _ask(ws, '{"method":"GET_PROPERTY","params":["combined"],"id":4}') == {
            "result": True,
            "id": 4,
        }
        await trio.sleep(1.0)
        assert await _ask(
            ws, '{"method":"SET_PROPERTY","params":["combined",false],"id":null}'
        ) == {"result": None, "id": None}
        # Now the frames are bare payloads.
        bare = await collect(ws, lambda ms: len(ms) >= 3)
        assert all("stream" not in m and m["e"] == "trade" for m in bare[1:])
        assert await _ask(ws, '{"method":"LIST_SUBSCRIPTIONS","id":7}') == {
            "result": ["btcusdt@trade"],
            "id": 7,
        }


@pytest.mark.parametrize(
    ("request_text", "code", "msg_start"),
    [
        ("{nope", 3, "Invalid JSON"),
        ('{"method":"SUBSCRIBE","params":[],"id":true}', 2, "Invalid request: request ID"),
        ('{"params":[],"id":1}', 2, "Invalid request: missing field `method`"),
        ('{"method":"SUBSCRIBEE","params":[],"id":1}', 2, "Invalid request: unknown variant"),
        ('{"method":"SUBSCRIBE","params":["btcusdt@bogus"],"id":1}', 2, "Invalid request"),
        ('{"method":"SET_PROPERTY","params":["combined",1],"id":1}', 1, "Invalid value type"),
        ('{"method":"SET_PROPERTY","params":["other",true],"id":1}', 0, "Unknown property"),
        ('{"method":"GET_PROPERTY","params":[5],"id":1}', 2, "Invalid request: property name"),
        (
            '{"method":"SET_PROPERTY","params":["combined",true,1],"id":1}',
            2,
            "Invalid request: too many",
        ),
        ('{"method":"SUBSCRIBE","params":[],"id":"' + "a" * 37 + '"}', 2, "Invalid request"),
    ],
)
def test_error_replies_follow_the_documented_table(
    request_text: str, code: int, msg_start: str
) -> None:
    flat = json.loads(control.handle(request_text, [], True).reply)
    assert flat["code"] == code and flat["msg"].startswith(msg_start) and "id" in flat
    nested = json.loads(control.handle(request_text, [], True, nested=True).reply)
    assert nested["error"] == {"code": code, "msg": flat["msg"]} and "id" in nested


async def test_nested_error_shape_switch_on_the_wire(start: Start) -> None:
    ex = await start()
    async with trio_websocket.open_websocket_url(ws_url(ex, "/ws")) as ws:
        assert await _ask(ws, '{"method":"NOPE","id":5}') == {
            "code": 2,
            "msg": control.handle('{"method":"NOPE","id":5}', [], False).reply
            and json.loads(control.handle('{"method":"NOPE","id":5}', [], False).reply)["msg"],
            "id": 5,
        }
        ex.set_faults(nested_errors=True)
        reply = await _ask(ws, '{"method":"NOPE","id":6}')
        assert reply["id"] == 6 and reply["error"]["code"] == 2


async def test_more_than_five_messages_per_second_disconnects(start: Start) -> None:
    # A raw client: trio-websocket 0.12 leaves its socket open when the server closes first
    # while it is still sending (a ResourceWarning under filterwarnings=error).
    ex = await start()
    assert ex.port is not None
    client = await RawClient.connect(ex.port, "/ws")
    try:
        for i in range(6):
            await client.send_raw(masked_text_frame(f'{{"method":"LIST_SUBSCRIPTIONS","id":{i}}}'))
        await client.pump(lambda: client.closed is not None or client.eof)
    finally:
        await client.aclose()
    assert len(client.messages) == 5  # five answered, the sixth closed the connection
    assert client.closed is not None and client.closed.code == 1008
    assert ex.counters["msg_limit_disconnect"] == 1


async def test_message_limit_can_be_switched_off(start: Start) -> None:
    ex = await start()
    ex.set_faults(enforce_msg_limit=False)
    async with trio_websocket.open_websocket_url(ws_url(ex, "/ws")) as ws:
        for i in range(12):
            assert await _ask(ws, f'{{"method":"LIST_SUBSCRIPTIONS","id":{i}}}') == {
                "result": [],
                "id": i,
            }


async def test_server_pings_and_drops_a_client_that_never_pongs(start: Start) -> None:
    ex = await start(ping_interval_s=0.2, pong_timeout_s=0.5)
    assert ex.port is not None
    good = await RawClient.connect(ex.port, "/ws")
    bad = await RawClient.connect(ex.port, "/ws")
    bad.answer_pings = False
    try:
        async with trio.open_nursery() as nursery:
            # The answering client is still connected after several pings.
            nursery.start_soon(good.pump, lambda: len(good.pings) >= 6)
            await bad.pump(lambda: bad.closed is not None or bad.eof, timeout=5)
        assert len(bad.pings) >= 1
        assert bad.closed is not None and bad.closed.code == 1008
        assert ex.counters["pong_timeout"] == 1
        assert good.closed is None and not good.eof
    finally:
        await good.aclose()
        await bad.aclose()


async def test_unsolicited_pongs_do_not_keep_a_connection_alive(start: Start) -> None:
    ex = await start(ping_interval_s=0.2, pong_timeout_s=0.6)
    assert ex.port is not None
    client = await RawClient.connect(ex.port, "/ws")
    client.answer_pings = False
    try:
        with trio.move_on_after(0.5):
            while True:
                # Unmasked pong frames would be a protocol error: send a masked empty pong.
                await client.send_raw(bytes((0x8A, 0x80)) + b"\0\0\0\0")
                await trio.sleep(0.3)
        await client.pump(lambda: client.closed is not None or client.eof, timeout=5)
        assert client.closed is not None and client.closed.code == 1008
    finally:
        await client.aclose()


async def test_control_on_raw_client_frames(start: Start) -> None:
    ex = await start()
    assert ex.port is not None
    client = await RawClient.connect(ex.port, "/ws")
    try:
        await client.send_raw(masked_text_frame('{"method":"LIST_SUBSCRIPTIONS","id":1}'))
        await client.pump(lambda: bool(client.messages))
        assert json.loads(client.messages[0]) == {"result": [], "id": 1}
    finally:
        await client.aclose()
