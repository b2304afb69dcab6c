"""One user of a Broadcast and Presence app built on realtime-py (PyPI
`realtime`), unmodified, as tests/clients.rs drives it:

    python room.py <endpoint> <token> <room> <config JSON>

It joins `room` with `{"config": <config JSON>}` and listens to every
broadcast and to presence. Everything the app is handed goes to stdout as
JSON lines, as room.mjs prints them:

    {"status": "SUBSCRIBED", "error": null}
    {"broadcast": {...}}                        the broadcast callback's argument
    {"presence": "sync", "state": {...}}        presence_state() at each sync
    {"presence": "join", "key": "k", "new": [...]} / {"presence": "leave", "key": "k", "left": [...]}
    {"done": <command>, "result": ...}          after each command

Commands come on stdin, one JSON object per line: {"op": "send", "event",
"payload"}, {"op": "send_many", "event", "count"}, {"op": "track", "meta"},
{"op": "untrack"}, {"op": "http", "event", "payload"} (http_send),
{"op": "auth", "token"} (set_auth). When
stdin closes it unsubscribes, closes the socket and exits.
"""

import asyncio
import json
import logging
import sys

from realtime import AsyncRealtimeClient, RealtimeSubscribeStates


def out(line: dict) -> None:
    print(json.dumps(line), flush=True)


def plain(presences) -> list:
    """Presences without their refs (they differ per run)."""
    return [
        {k: v for k, v in dict(p).items() if k not in ("presence_ref", "phx_ref", "phx_ref_prev")}
        for p in presences
    ]


async def main() -> None:
    if len(sys.argv) != 5:
        sys.exit("usage: python room.py <endpoint> <token> <room> <config JSON>")
    endpoint, token, room, config = sys.argv[1:]
    client = AsyncRealtimeClient(endpoint, token)
    await client.connect()
    channel = client.channel(room, {"config": json.loads(config)})

    def state() -> dict:
        return {key: plain(ps) for key, ps in sorted(channel.presence_state().items())}

    channel.on_broadcast("*", lambda payload: out({"broadcast": payload}))
    channel.on_presence_sync(lambda: out({"presence": "sync", "state": state()}))
    channel.on_presence_join(
        lambda key, current, new: out({"presence": "join", "key": key, "new": plain(new)})
    )
    channel.on_presence_leave(
        lambda key, current, left: out({"presence": "leave", "key": key, "left": plain(left)})
    )

    def on_status(status, error) -> None:
        out({"status": status.value, "error": None if error is None else str(error)})

    await channel.subscribe(on_status)

    loop = asyncio.get_running_loop()
    while True:
        line = await loop.run_in_executor(None, sys.stdin.readline)
        if not line:
            break
        command = json.loads(line)
        op = command["op"]
        result = None
        if op == "send":
            await channel.send_broadcast(command["event"], command["payload"])
        elif op == "send_many":
            for i in range(command["count"]):
                await channel.send_broadcast(command["event"], {"i": i})
        elif op == "track":
            await channel.track(command["meta"])
        elif op == "untrack":
            await channel.untrack()
        elif op == "auth":
            await client.set_auth(command["token"])
            result = "ok"
        elif op == "http":
            try:
                await channel.http_send(command["event"], command["payload"])
                result = "ok"
            except Exception as e:  # noqa: BLE001 - reported to the test
                result = str(e)
        else:
            result = f"unknown op {op}"
        out({"done": op, "result": result})
    await channel.unsubscribe()
    await client.close()


if __name__ == "__main__":
    logging.basicConfig(stream=sys.stderr, level=logging.DEBUG)
    asyncio.run(main())
