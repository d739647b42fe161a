"""A minimal echo bridge built on mautrix-python's application-service machinery.

The homeserver pushes transactions to mautrix's aiohttp server; every event is
reported on stdout as one JSON line. With BRIDGE_ECHO=1 the bot accepts
invites, and a ghost user answers every m.text message from a real user with
"echo: <body>". Commands come as JSON lines on stdin: {"ping": "<txn id>"}
and {"quit": true}; EOF quits too.

Environment: BRIDGE_HS_URL, BRIDGE_SERVER_NAME, BRIDGE_PORT, BRIDGE_AS_ID,
BRIDGE_AS_TOKEN, BRIDGE_HS_TOKEN, BRIDGE_BOT_LOCALPART, BRIDGE_GHOST_PREFIX,
BRIDGE_ECHO ("1" or "0"); BRIDGE_DEBUG=1 logs mautrix's requests to stderr.

Requires `pip install mautrix==0.21.1` (it pulls aiohttp, yarl, attrs; no
optional extras are needed). Prints {"echo_error": ...} if answering fails.
"""

import asyncio
import json
import logging
import os
import sys

from mautrix.appservice import AppService, ASStateStore
from mautrix.client.state_store import MemoryStateStore
from mautrix.errors import MatrixError
from mautrix.types import EventType, Membership, MessageType
from mautrix.util import background_task

ENV = os.environ
SERVER = ENV["BRIDGE_SERVER_NAME"]
GHOST_PREFIX = ENV["BRIDGE_GHOST_PREFIX"]
ECHO = ENV.get("BRIDGE_ECHO", "0") == "1"


def emit(**line):
    print(json.dumps(line), flush=True)


class MemoryASStateStore(MemoryStateStore, ASStateStore):
    """mautrix's default store is a file (mx-state.json in the working
    directory); keep membership/power-level/registration caches in memory."""

    def __init__(self):
        MemoryStateStore.__init__(self)
        ASStateStore.__init__(self)


class EchoBridge(AppService):
    async def handle_transaction(self, txn_id, **kwargs):
        # The handlers never see the transaction ID, so report it here.
        # mautrix only calls this for IDs it has not handled before: a
        # retried transaction is answered {} without reaching this point.
        emit(txn=txn_id)
        return await super().handle_transaction(txn_id, **kwargs)


def is_bridge_user(az, user_id):
    return user_id == az.bot_mxid or (
        user_id.startswith(f"@{GHOST_PREFIX}") and user_id.endswith(f":{SERVER}")
    )


async def answer(az, room_id, body):
    ghost = az.intent.user(f"@{GHOST_PREFIX}echo:{SERVER}")
    # POST /register {"type": "m.login.application_service", "username": ...,
    # "inhibit_login": true}; M_USER_IN_USE counts as success.
    await ghost.ensure_registered()
    # Tries POST /join as the ghost; on M_FORBIDDEN the bot invites it and
    # the ghost joins again.
    await ghost.ensure_joined(room_id)
    # GET .../profile/{ghost}/displayname first; PUT only if it differs.
    await ghost.set_displayname("Echo")
    # Before sending, mautrix checks the ghost's power level (fetching
    # m.room.power_levels and m.room.create?format=event if not cached).
    event_id = await ghost.send_text(room_id, f"echo: {body}")
    emit(answered={"room_id": room_id, "event_id": event_id})


async def react(az, event):
    if (
        event.type == EventType.ROOM_MEMBER
        and event.state_key == az.bot_mxid
        and event.content.membership == Membership.INVITE
    ):
        # The bot's ensure_joined registers the bot too (M_USER_IN_USE is fine).
        await az.intent.ensure_joined(event.room_id)
    elif (
        event.type == EventType.ROOM_MESSAGE
        and event.content.msgtype == MessageType.TEXT
        and not is_bridge_user(az, event.sender)
    ):
        await answer(az, event.room_id, event.content.body)


def make_handler(az):
    async def on_event(event):
        raw = event.serialize()
        content = raw.get("content") or {}
        if event.type.is_ephemeral:
            emit(ephemeral={"type": raw.get("type"), "room_id": raw.get("room_id")})
            return
        emit(
            event={
                "event_id": raw.get("event_id"),
                "room_id": raw.get("room_id"),
                "sender": raw.get("sender"),
                "type": raw.get("type"),
                "body": content.get("body"),
                "state_key": raw.get("state_key"),
                "membership": content.get("membership"),
            }
        )
        if ECHO:
            # Answer outside the transaction, so the homeserver gets its 200
            # before the bridge calls back into it.
            background_task.create(react_logged(az, event))

    return on_event


# Echo work runs one event at a time, in arrival order: an invite is accepted
# before a message that follows it is answered.
ECHO_LOCK = asyncio.Lock()


async def react_logged(az, event):
    try:
        async with ECHO_LOCK:
            await react(az, event)
    except Exception as e:
        logging.exception("echo failed")
        emit(echo_error=f"{type(e).__name__}: {e}")


async def ping(az, txn_id):
    try:
        # POST /_matrix/client/v1/appservice/{id}/ping {"transaction_id": ...}
        # with ?user_id=<bot>; returns the response's duration_ms (or -1).
        emit(pong={"duration_ms": await az.ping_self(txn_id)})
    except MatrixError as e:
        emit(ping_error=f"{type(e).__name__}: {e}")


async def main():
    debug = ENV.get("BRIDGE_DEBUG") == "1"
    logging.basicConfig(stream=sys.stderr, level=logging.DEBUG if debug else logging.INFO)
    logging.getLogger("aiohttp.access").setLevel(logging.INFO if debug else logging.WARNING)
    az = EchoBridge(
        server=ENV["BRIDGE_HS_URL"],
        domain=SERVER,
        as_token=ENV["BRIDGE_AS_TOKEN"],
        hs_token=ENV["BRIDGE_HS_TOKEN"],
        bot_localpart=ENV["BRIDGE_BOT_LOCALPART"],
        id=ENV["BRIDGE_AS_ID"],
        loop=asyncio.get_running_loop(),
        state_store=MemoryASStateStore(),
        ephemeral_events=True,  # otherwise mautrix drops a transaction's "ephemeral"
    )
    # Await handlers in order inside the transaction (mautrix's default runs
    # each as a background task), so every event line is printed before the
    # homeserver gets its 200. The first handler is mautrix's state cache.
    az.synchronous_handlers = True
    az.matrix_event_handler(make_handler(az))
    await az.start(host="127.0.0.1", port=int(ENV["BRIDGE_PORT"]))
    az.ready = True
    emit(ready=True)

    loop = asyncio.get_running_loop()
    try:
        while True:
            line = await loop.run_in_executor(None, sys.stdin.readline)
            if not line:
                break  # EOF
            if not line.strip():
                continue
            command = json.loads(line)
            if "ping" in command:
                await ping(az, command["ping"])
            if command.get("quit"):
                break
    finally:
        await az.stop()


if __name__ == "__main__":
    asyncio.run(main())
