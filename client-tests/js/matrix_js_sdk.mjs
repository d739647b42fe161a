// Drives a running Myelin server with the real matrix-js-sdk and its Rust
// cryptography (@matrix-org/matrix-sdk-crypto-wasm, `initRustCrypto`):
// registration (UIA with m.login.dummy), the SDK's password login, /sync,
// a plain room with a message received through sync, server-side search, and
// an encrypted room where each side decrypts the other's message.
//
// Environment (argv may give the two user names instead: `node
// matrix_js_sdk.mjs ALICE BOB`):
//   CLIENT_URL          the homeserver's base URL, e.g. http://127.0.0.1:8008
//   CLIENT_ALICE        alice's localpart (default: alice-<random>)
//   CLIENT_BOB          bob's localpart (default: bob-<random>)
//   CLIENT_PASSWORD     the password both accounts get (default below)
//   CLIENT_NODE_MODULES the node_modules folder that holds matrix-js-sdk
//                       (else NODE_PATH, else ordinary resolution from here)
//   CLIENT_TIMEOUT_MS   the bound of every wait (default 60000)
//   CLIENT_VERBOSE=1    passes the SDK's console logging through to stderr
//                       (otherwise it is kept, and its tail printed on failure)
//
// On success it prints one JSON line ({"ok":true,...}) to stdout and exits 0.
// On failure it prints {"ok":false,"step":...,"error":...} to stdout, a
// readable message to stderr, and exits 1.

import { createRequire } from "node:module";
import path from "node:path";
import { pathToFileURL } from "node:url";
import { randomBytes } from "node:crypto";
import { format } from "node:util";
import { existsSync } from "node:fs";

const TIMEOUT_MS = Number(process.env.CLIENT_TIMEOUT_MS ?? 60000);
const started = Date.now();
let currentStep = "start";
const observed = {};
const clients = [];

class StepFailure extends Error {}

// The SDK logs a lot through the console (its loglevel loggers, the Rust
// crypto's tracing). Keep it out of the way, but keep its tail for failures.
const VERBOSE = process.env.CLIENT_VERBOSE === "1";
const sdkLog = [];
for (const method of ["log", "info", "debug", "warn", "error", "trace"]) {
    console[method] = (...args) => {
        const line = `[sdk ${method}] ${format(...args)}`;
        if (VERBOSE) {
            process.stderr.write(`${line}\n`);
        } else {
            sdkLog.push(line.length > 800 ? `${line.slice(0, 800)}...` : line);
            if (sdkLog.length > 60) sdkLog.shift();
        }
    };
}

function fail(message) {
    throw new StepFailure(message);
}

function check(condition, message) {
    if (!condition) fail(message);
}

// Runs `body` as the step `name`, recording how long it took.
async function step(name, body) {
    currentStep = name;
    const begin = Date.now();
    const result = await body();
    (observed.step_ms ??= {})[name] = Date.now() - begin;
    return result;
}

// Waits for `promise`, failing the step after TIMEOUT_MS.
function within(promise, what, onTimeout = () => {}) {
    let timer;
    const timeout = new Promise((_, reject) => {
        timer = setTimeout(() => {
            onTimeout();
            reject(new StepFailure(`timed out after ${TIMEOUT_MS} ms waiting for ${what}`));
        }, TIMEOUT_MS);
    });
    return Promise.race([promise, timeout]).finally(() => clearTimeout(timer));
}

// Polls `condition` (which may be async) until it returns a truthy value.
async function until(condition, what, intervalMs = 25) {
    let stop = false;
    const poll = (async () => {
        for (;;) {
            const value = await condition();
            if (value) return value;
            if (stop) return undefined;
            await new Promise((resolve) => setTimeout(resolve, intervalMs));
        }
    })();
    return within(poll, what, () => {
        stop = true;
    });
}

// ---------------------------------------------------------------------------
// Loading matrix-js-sdk from the npm prefix the test provisioned.

async function loadSdk() {
    const require = createRequire(import.meta.url);
    const bases = [
        process.env.CLIENT_NODE_MODULES,
        ...(process.env.NODE_PATH ?? "").split(path.delimiter),
    ].filter(Boolean);
    let main;
    try {
        main = bases.length
            ? require.resolve("matrix-js-sdk", { paths: bases })
            : require.resolve("matrix-js-sdk");
    } catch (e) {
        fail(
            `cannot find matrix-js-sdk (searched ${bases.join(", ") || "from the script"}); ` +
                `set CLIENT_NODE_MODULES to the node_modules folder that holds it: ${e.message}`,
        );
    }
    const sdk = await import(pathToFileURL(main).href);
    const { logger } = await import(pathToFileURL(path.join(path.dirname(main), "logger.js")).href);
    const pkg = require(path.join(path.dirname(main), "..", "package.json"));
    // matrix-js-sdk 37.6.0 and later need Node 22 (Promise.withResolvers): on
    // Node 20 their sync loop stops silently after the first /sync. Say so
    // instead of timing out.
    const needed = Number(/(\d+)/.exec(pkg.engines?.node ?? "")?.[1] ?? 0);
    const running = Number(process.versions.node.split(".")[0]);
    check(
        running >= needed,
        `matrix-js-sdk ${pkg.version} needs Node ${pkg.engines.node}, this is Node ${process.versions.node} ` +
            `(on Node 20 use matrix-js-sdk@37.5.0, the newest that runs there)`,
    );
    // The crypto-wasm package exports no package.json: look for it beside
    // matrix-js-sdk (npm hoists it) or inside it.
    const sdkDir = path.dirname(path.dirname(main));
    const wasmPackage = [path.dirname(sdkDir), path.join(sdkDir, "node_modules")]
        .map((dir) => path.join(dir, "@matrix-org", "matrix-sdk-crypto-wasm", "package.json"))
        .find((file) => existsSync(file));
    const wasmVersion = wasmPackage ? require(wasmPackage).version : undefined;
    return { sdk, logger, version: pkg.version, wasmVersion };
}

// ---------------------------------------------------------------------------
// The steps.

// Registers `username` through POST /register with UIA: the first request
// must be answered 401 with a session offering m.login.dummy, the second
// completes it.
async function register(sdk, baseUrl, username, password) {
    const anonymous = sdk.createClient({ baseUrl });
    const request = { username, password, inhibit_login: true };
    let session;
    try {
        await anonymous.registerRequest(request);
        fail(`POST /register for ${username} without auth succeeded; expected 401 with a UIA session`);
    } catch (e) {
        if (e instanceof StepFailure) throw e;
        check(
            e.httpStatus === 401,
            `POST /register for ${username}: expected 401 with a UIA session, got ` +
                `${e.httpStatus} ${e.errcode ?? ""} ${e.message}`,
        );
        session = e.data?.session;
        check(typeof session === "string" && session, `the 401 of POST /register has no session: ${JSON.stringify(e.data)}`);
        const flows = e.data?.flows ?? [];
        check(
            flows.some((flow) => flow.stages?.length === 1 && flow.stages[0] === "m.login.dummy"),
            `the 401 of POST /register offers no m.login.dummy flow: ${JSON.stringify(flows)}`,
        );
    }
    let response;
    try {
        response = await anonymous.registerRequest({ ...request, auth: { type: "m.login.dummy", session } });
    } catch (e) {
        fail(`POST /register for ${username} with m.login.dummy: ${e.httpStatus} ${e.errcode ?? ""} ${e.message}`);
    }
    check(
        typeof response.user_id === "string" && response.user_id.startsWith(`@${username}:`),
        `POST /register for ${username} answered user_id ${JSON.stringify(response.user_id)}`,
    );
    return response.user_id;
}

// Logs in through the SDK's own login request and returns a client made
// from the credentials, with Rust crypto initialised (in memory).
async function login(sdk, baseUrl, username, password, expectedUserId) {
    const anonymous = sdk.createClient({ baseUrl });
    let response;
    try {
        response = await anonymous.loginRequest({
            type: "m.login.password",
            identifier: { type: "m.id.user", user: username },
            password,
            initial_device_display_name: `matrix-js-sdk ${username}`,
        });
    } catch (e) {
        fail(`login of ${username}: ${e.httpStatus} ${e.errcode ?? ""} ${e.message}`);
    }
    check(response.user_id === expectedUserId, `login of ${username} answered user_id ${response.user_id}, expected ${expectedUserId}`);
    check(response.access_token && response.device_id, `login of ${username} lacks access_token or device_id: ${JSON.stringify(response)}`);
    const client = sdk.createClient({
        baseUrl,
        userId: response.user_id,
        accessToken: response.access_token,
        deviceId: response.device_id,
    });
    clients.push(client);
    await client.initRustCrypto({ useIndexedDB: false });
    check(client.getCrypto(), `initRustCrypto gave ${username} no crypto API`);
    return client;
}

// Starts syncing and waits for the first successful sync.
async function startSyncing(sdk, client) {
    const ready = new Promise((resolve, reject) => {
        const onSync = (state, _previous, data) => {
            if (state === "PREPARED" || state === "SYNCING") {
                client.off(sdk.ClientEvent.Sync, onSync);
                resolve(state);
            } else if (state === "ERROR") {
                client.off(sdk.ClientEvent.Sync, onSync);
                reject(new StepFailure(`sync of ${client.getUserId()} failed: ${data?.error?.message ?? "unknown error"}`));
            }
        };
        client.on(sdk.ClientEvent.Sync, onSync);
    });
    await client.startClient({ initialSyncLimit: 20 });
    return within(ready, `the first sync of ${client.getUserId()}`);
}

// Resolves with the first timeline event of `roomId` (already there or
// arriving through sync) for which `predicate` holds.
function timelineEvent(sdk, client, roomId, predicate, what) {
    let listener;
    const found = new Promise((resolve) => {
        listener = (event, room) => {
            if (room?.roomId === roomId && predicate(event)) {
                client.off(sdk.RoomEvent.Timeline, listener);
                resolve(event);
            }
        };
        client.on(sdk.RoomEvent.Timeline, listener);
        const room = client.getRoom(roomId);
        for (const event of room?.getLiveTimeline().getEvents() ?? []) listener(event, room);
    });
    return within(found, what, () => client.off(sdk.RoomEvent.Timeline, listener));
}

// Waits until `client` sees `userId` with `membership` in `roomId`.
function membership(client, roomId, userId, wanted) {
    return until(
        () => client.getRoom(roomId)?.getMember(userId)?.membership === wanted,
        `${client.getUserId()} to see ${userId} with membership ${wanted} in ${roomId}`,
    );
}

// Creates a room as `owner`, invites `guest`, lets the guest see the invite
// through sync and join, and waits until the owner sees the join.
async function roomWith(owner, guest, options) {
    const { room_id: roomId } = await owner.createRoom(options);
    check(typeof roomId === "string" && roomId.startsWith("!"), `createRoom answered room_id ${roomId}`);
    await membership(owner, roomId, owner.getUserId(), "join");
    await owner.invite(roomId, guest.getUserId());
    await until(
        () => guest.getRoom(roomId)?.getMyMembership() === "invite",
        `${guest.getUserId()} to receive the invite to ${roomId} through sync`,
    );
    const joined = await guest.joinRoom(roomId);
    check(joined?.roomId === roomId, `joinRoom answered room ${joined?.roomId}, expected ${roomId}`);
    await membership(guest, roomId, guest.getUserId(), "join");
    await membership(owner, roomId, guest.getUserId(), "join");
    return roomId;
}

// Waits until `client` knows a device `deviceId` of `userId` (downloading
// the keys through /keys/query).
function knowsDevice(client, userId, deviceId) {
    return until(
        async () => {
            const devices = await client.getCrypto().getUserDeviceInfo([userId], true);
            return devices.get(userId)?.has(deviceId);
        },
        `${client.getUserId()} to see device ${deviceId} of ${userId} in /keys/query`,
        200,
    );
}

// Sends `body` as `sender` into the encrypted `roomId` and makes `receiver`
// decrypt it. Returns what was observed.
async function encryptedExchange(sdk, sender, receiver, roomId, body) {
    const arrival = timelineEvent(
        sdk,
        receiver,
        roomId,
        (event) => event.getSender() === sender.getUserId() && event.getWireType() === "m.room.encrypted",
        `${receiver.getUserId()} to receive an m.room.encrypted event from ${sender.getUserId()}`,
    );
    const { event_id: eventId } = await sender.sendMessage(roomId, { msgtype: "m.text", body });
    const sent = sender.getRoom(roomId)?.findEventById(eventId);
    check(sent, `${sender.getUserId()} has no local echo of ${eventId}`);
    check(sent.isEncrypted(), `${sender.getUserId()} sent ${eventId} unencrypted into the encrypted room`);

    const event = await arrival;
    check(event.getId() === eventId, `${receiver.getUserId()} received ${event.getId()}, expected ${eventId}`);
    await within(receiver.decryptEventIfNeeded(event), `${receiver.getUserId()} to decrypt ${eventId}`);
    if (event.isDecryptionFailure() || event.getType() !== "m.room.message") {
        // The room key may come after the message; the SDK retries when it does.
        await until(
            () => !event.isBeingDecrypted() && !event.isDecryptionFailure() && event.getType() === "m.room.message",
            `${receiver.getUserId()} to decrypt ${eventId} (last: ${event.decryptionFailureReason ?? event.getContent()?.body})`,
        );
    }
    const clear = event.getClearContent();
    check(
        clear?.body === body,
        `${receiver.getUserId()} decrypted ${eventId} to ${JSON.stringify(clear)}, expected body ${JSON.stringify(body)}`,
    );
    check(event.getWireType() === "m.room.encrypted", `wire type of ${eventId} is ${event.getWireType()}`);
    check(
        event.getWireContent()?.algorithm === "m.megolm.v1.aes-sha2",
        `wire algorithm of ${eventId} is ${event.getWireContent()?.algorithm}`,
    );
    return {
        event_id: eventId,
        wire_type: event.getWireType(),
        algorithm: event.getWireContent().algorithm,
        clear_type: event.getType(),
        body: clear.body,
    };
}

async function main() {
    const baseUrl = process.env.CLIENT_URL;
    check(baseUrl, "CLIENT_URL is not set (the homeserver's base URL, e.g. http://127.0.0.1:8008)");
    const suffix = randomBytes(4).toString("hex");
    const aliceName = process.argv[2] ?? process.env.CLIENT_ALICE ?? `alice-${suffix}`;
    const bobName = process.argv[3] ?? process.env.CLIENT_BOB ?? `bob-${suffix}`;
    const password = process.env.CLIENT_PASSWORD ?? "myelin js-sdk test password";

    const { sdk, logger, version, wasmVersion } = await step("load", loadSdk);
    logger.setLevel("silent");
    logger.disableAll();
    observed.sdk = version;
    observed.crypto_wasm = wasmVersion;
    observed.node = process.versions.node;

    const [aliceId, bobId] = await step("register", async () => [
        await register(sdk, baseUrl, aliceName, password),
        await register(sdk, baseUrl, bobName, password),
    ]);
    observed.users = [aliceId, bobId];

    const [alice, bob] = await step("login", async () => [
        await login(sdk, baseUrl, aliceName, password, aliceId),
        await login(sdk, baseUrl, bobName, password, bobId),
    ]);
    observed.devices = [alice.getDeviceId(), bob.getDeviceId()];

    observed.sync_states = await step("sync", () => Promise.all([startSyncing(sdk, alice), startSyncing(sdk, bob)]));

    const word = `zebrafish${suffix}`;
    const plainBody = `hello bob, a ${word} from matrix-js-sdk`;
    const plainRoom = await step("plain_room", async () => {
        const roomId = await roomWith(alice, bob, { preset: "private_chat", name: "js-sdk plain" });
        const arrival = timelineEvent(
            sdk,
            bob,
            roomId,
            (event) => event.getSender() === aliceId && event.getType() === "m.room.message",
            `${bobId} to receive alice's message in ${roomId}`,
        );
        const { event_id: eventId } = await alice.sendTextMessage(roomId, plainBody);
        const event = await arrival;
        check(event.getId() === eventId, `bob received ${event.getId()}, expected ${eventId}`);
        check(event.getContent().body === plainBody, `bob received body ${JSON.stringify(event.getContent().body)}`);
        check(event.getWireType() === "m.room.message", `the plain message came as ${event.getWireType()}`);
        return { room_id: roomId, event_id: eventId };
    });
    observed.plain = plainRoom;

    observed.search = await step("search", async () => {
        const results = await alice.searchRoomEvents({ term: word, filter: { rooms: [plainRoom.room_id] } });
        const hits = results.results.map((result) => result.context.getEvent());
        const hit = hits.find((event) => event.getId() === plainRoom.event_id);
        check(
            hit,
            `searching ${JSON.stringify(word)} found ${JSON.stringify(hits.map((e) => e.getId()))}, ` +
                `expected ${plainRoom.event_id} (count ${results.count})`,
        );
        check(hit.getContent().body === plainBody, `the search result's body is ${JSON.stringify(hit.getContent().body)}`);
        return { term: word, count: results.count, results: hits.length, highlights: results.highlights };
    });

    observed.encrypted = await step("encrypted_room", async () => {
        const roomId = await roomWith(alice, bob, {
            preset: "private_chat",
            name: "js-sdk encrypted",
            initial_state: [
                { type: "m.room.encryption", state_key: "", content: { algorithm: "m.megolm.v1.aes-sha2" } },
            ],
        });
        check(
            await alice.getCrypto().isEncryptionEnabledInRoom(roomId),
            `alice's crypto does not consider ${roomId} encrypted`,
        );
        await knowsDevice(alice, bobId, bob.getDeviceId());
        await knowsDevice(bob, aliceId, alice.getDeviceId());
        const toBob = await encryptedExchange(sdk, alice, bob, roomId, `secret for bob ${suffix}`);
        const toAlice = await encryptedExchange(sdk, bob, alice, roomId, `secret reply for alice ${suffix}`);
        return { room_id: roomId, alice_to_bob: toBob, bob_to_alice: toAlice };
    });

    await step("stop", async () => {
        for (const client of clients.splice(0)) client.stopClient();
    });
    observed.total_ms = Date.now() - started;
    process.stdout.write(JSON.stringify({ ok: true, ...observed }) + "\n");
}

try {
    await main();
    process.exit(0);
} catch (e) {
    for (const client of clients) {
        try {
            client.stopClient();
        } catch {
            // already failing
        }
    }
    const message = e instanceof StepFailure ? e.message : `${e?.name ?? "Error"}: ${e?.message ?? e}${e?.httpStatus ? ` (HTTP ${e.httpStatus} ${e.errcode ?? ""})` : ""}`;
    process.stderr.write(`matrix-js-sdk against Myelin failed in step ${currentStep}: ${message}\n`);
    if (!(e instanceof StepFailure) && e?.stack) process.stderr.write(`${e.stack}\n`);
    if (sdkLog.length) process.stderr.write(`last SDK log lines:\n${sdkLog.join("\n")}\n`);
    process.stdout.write(JSON.stringify({ ok: false, step: currentStep, error: message, ...observed }) + "\n");
    process.exit(1);
}
