"""One user of an app built on realtime-py (PyPI `realtime`), unmodified, as
tests/clients.rs drives it:

    python listen.py <endpoint> <token> <owner uuid>

`endpoint` is the gateway's `ws://HOST:PORT/realtime/v1` (the client adds
`/websocket?apikey=<token>&vsn=1.0.0`; realtime-py speaks 1.0.0 only and
sends the same token as `access_token`). Two channels on `public.notes`:
`all` (no filter) and `mine` (`owner=eq.<owner uuid>`). Everything the app
is handed goes to stdout as JSON lines:

    {"channel": "all", "status": "SUBSCRIBED", "error": null, "ids": [123]}
    {"channel": "all", "system": {...}}     the payload of a `system` message
    {"channel": "all", "change": {...}}     the postgres_changes callback's argument

(`ids`: the binding ids from the join reply, on SUBSCRIBED only.) The
client's own debug log (every frame) goes to stderr. When stdin closes it
prints `{"leaving": true}`, unsubscribes each channel and waits for it to
report CLOSED (at most 10 s), closes the socket and prints
`{"left": ["ok" or "timed out" per channel], "close_code": <the socket's>}`.
"""

import asyncio
import json
import logging
import sys

from realtime import AsyncRealtimeClient, RealtimeSubscribeStates

LEAVE_TIMEOUT = 10


def out(line: dict) -> None:
    print(json.dumps(line), flush=True)


async def main() -> None:
    if len(sys.argv) != 4:
        sys.exit("usage: python listen.py <endpoint> <token> <owner uuid>")
    endpoint, token, owner = sys.argv[1:]
    client = AsyncRealtimeClient(endpoint, token)
    await client.connect()
    channels = []
    for name, filter in (("all", None), ("mine", f"owner=eq.{owner}")):
        channel = client.channel(name)
        closed = asyncio.Event()

        def on_change(payload, name=name) -> None:
            out({"channel": name, "change": payload})

        def on_system(payload, name=name) -> None:
            out({"channel": name, "system": payload.model_dump()})

        def on_status(status, error, name=name, channel=channel, closed=closed) -> None:
            line = {
                "channel": name,
                "status": status.value,
                "error": None if error is None else str(error),
            }
            if status == RealtimeSubscribeStates.SUBSCRIBED:
                line["ids"] = [c.id for c in channel.postgres_changes_callbacks]
            out(line)
            if status == RealtimeSubscribeStates.CLOSED:
                closed.set()

        channel.on_postgres_changes(
            "*", on_change, table="notes", schema="public", filter=filter
        )
        channel.on_system(on_system)
        await channel.subscribe(on_status)
        channels.append((channel, closed))

    await asyncio.get_running_loop().run_in_executor(None, sys.stdin.read)
    out({"leaving": True})
    left = []
    for channel, closed in channels:
        await channel.unsubscribe()
        try:
            await asyncio.wait_for(closed.wait(), LEAVE_TIMEOUT)
            left.append("ok")
        except TimeoutError:
            left.append("timed out")
    # The websockets connection (read from the client, not changed), to
    # report how it closed: 1000 after a closing handshake, 1006 without one.
    ws = client._ws_connection
    await client.close()
    out({"left": left, "close_code": None if ws is None else ws.close_code})


if __name__ == "__main__":
    logging.basicConfig(stream=sys.stderr, level=logging.DEBUG)
    asyncio.run(main())
