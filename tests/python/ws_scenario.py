"""One chat over the WebSocket extension with Python's `websockets`.

Alice connects with her token in the Authorization header, Bob with an
auth frame. Alice creates a chat with Bob and sends messages; Bob gets them
pushed, acknowledges them, and Alice sees his delivery receipt. Bob goes
away, Alice sends more, and Bob's next connection resumes after his
acknowledgement with exactly the messages he missed. Errors come back as
Matrix errors.

Usage: ws_scenario.py BASE_URL ALICE_TOKEN BOB_TOKEN
Exits 0 and prints a summary when every check passed.
"""

import asyncio
import json
import sys
import urllib.request

from websockets.asyncio.client import connect

PATH = "/_matrix/client/unstable/org.myelin.ws/connect"
WAIT = 20


class Client:
    def __init__(self, socket):
        self.socket = socket
        self.pushes = []
        self.next_id = 0

    async def frame(self):
        text = await asyncio.wait_for(self.socket.recv(), WAIT)
        return json.loads(text)

    async def call(self, kind, data):
        self.next_id += 1
        request_id = f"py{self.next_id}"
        await self.socket.send(json.dumps({"type": kind, "id": request_id, "data": data}))
        while True:
            frame = await self.frame()
            if "ok" in frame and frame["id"] == request_id:
                return frame
            if "ok" not in frame:
                self.pushes.append(frame)

    async def ok(self, kind, data):
        answer = await self.call(kind, data)
        assert answer["ok"] is True, answer
        return answer["data"]

    async def push(self, wanted):
        while self.pushes:
            frame = self.pushes.pop(0)
            if wanted(frame):
                return frame
        while True:
            frame = await self.frame()
            if "ok" not in frame and wanted(frame):
                return frame


def http(base, method, path, token, body):
    request = urllib.request.Request(
        base + path,
        method=method,
        data=json.dumps(body).encode(),
        headers={"Authorization": f"Bearer {token}", "Content-Type": "application/json"},
    )
    with urllib.request.urlopen(request, timeout=WAIT) as response:
        return json.loads(response.read())


def is_message(frame):
    return frame["type"] == "event" and frame["data"]["event"]["type"] == "m.room.message"


async def main(base, alice_token, bob_token):
    url = base.replace("http://", "ws://") + PATH
    alice_socket = await connect(url, additional_headers={"Authorization": f"Bearer {alice_token}"})
    alice = Client(alice_socket)
    ready = await alice.frame()
    assert ready["type"] == "ready" and ready["data"]["user_id"].startswith("@alice:"), ready

    bob_socket = await connect(url)
    bob = Client(bob_socket)
    answer = await bob.call("auth", {"access_token": bob_token})
    assert answer["ok"] is True and answer["data"]["user_id"].startswith("@bob:"), answer
    assert (await bob.frame())["type"] == "ready"

    server = ready["data"]["user_id"].split(":", 1)[1]
    chat = await alice.ok("create_chat", {"participants": [f"@bob:{server}"], "chat_name": "py"})
    room_id = chat["room_id"]
    invite = await bob.push(lambda f: f["type"] == "invite")
    assert invite["data"]["room_id"] == room_id, invite
    http(base, "POST", f"/_matrix/client/v3/rooms/{room_id}/join", bob_token, {})

    for n in range(20):
        await alice.ok("send_message", {"chat_id": room_id, "txn_id": f"p{n}", "text": f"m{n}"})
    bodies = []
    while len(bodies) < 20:
        frame = await bob.push(is_message)
        bodies.append(frame["data"]["event"]["content"]["body"])
    assert bodies == [f"m{n}" for n in range(20)], bodies
    synced = await bob.push(lambda f: f["type"] == "synced")
    await bob.ok("ack_message", {"pos": synced["pos"]})
    delivered = await alice.push(
        lambda f: f["type"] == "receipt"
        and any("org.myelin.delivered" in r for r in f["data"]["content"].values())
    )
    assert delivered["data"]["room_id"] == room_id, delivered

    await bob_socket.close()
    for n in range(20, 25):
        await alice.ok("send_message", {"chat_id": room_id, "txn_id": f"p{n}", "text": f"m{n}"})
    bob_socket = await connect(url, additional_headers={"Authorization": f"Bearer {bob_token}"})
    bob = Client(bob_socket)
    ready = await bob.frame()
    assert ready["type"] == "ready" and ready["data"]["resumed"] is True, ready
    # The acknowledged stream position (typing notices are not stored).
    assert ready["pos"].split("_")[0] == synced["pos"].split("_")[0], (ready, synced)
    missed = []
    while True:
        frame = await bob.push(lambda f: is_message(f) or f["type"] == "synced")
        if frame["type"] == "synced":
            break
        missed.append(frame["data"]["event"]["content"]["body"])
    assert missed == [f"m{n}" for n in range(20, 25)], missed

    error = await bob.call("launch_rocket", {})
    assert error["ok"] is False and error["errcode"] == "M_UNRECOGNIZED", error
    error = await bob.call("send_message", {"chat_id": room_id})
    assert error["errcode"] == "M_MISSING_PARAM", error

    await alice_socket.close()
    await bob_socket.close()
    print(f"python websockets scenario: {len(bodies)} pushed, {len(missed)} resumed, errors checked")


if __name__ == "__main__":
    asyncio.run(main(*sys.argv[1:4]))
