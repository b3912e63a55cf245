#!/usr/bin/env node
// A real Matrix client (matrix-js-sdk, pinned in package-lock.json) used as an app would use it,
// through the router. Run by tests/e2e/test_js_client.py:
//
//   node scenario.mjs CONFIG.json
//
// CONFIG: {"base_url": "http://127.0.0.1:PORT", "summary_path": ".../summary.json",
//          "users": {"alice": {"user": "@a:x", "password": "..."}, "bob": {...}},
//          "media_bytes": 5242880}
//
// Alice logs in twice (devices alice1, alice2), Bob once; each syncs with the SDK's own loop
// (startClient). Messages both ways, typing, a read receipt, read markers, to-device both ways,
// account data, a media upload + authenticated download compared byte for byte, simplified
// sliding sync (MSC4186) initial + a long-poll woken by a message, logout of alice2.
//
// Every request the SDK (or this script) makes goes through one recording fetch: status, and
// whether the router's X-Synapse-Router-Route/-Pool/-Worker debug headers were on the response.
// An error is: a response >= 400 that the scenario did not ask for (only the logged-out token's
// 401 is asked for), a fetch that failed (an abort counts unless its client was being stopped),
// or the SDK's sync loop reporting ERROR. The summary (JSON) is written to summary_path and as
// the last line of stdout, with the steps that failed; the exit code is 0 only if every step passed
// and there were no errors.

import { createHash, randomBytes } from "node:crypto";
import { readFileSync, writeFileSync } from "node:fs";

import * as sdk from "matrix-js-sdk";
import { logger as sdkLogger } from "matrix-js-sdk/lib/logger.js";

sdkLogger.setLevel("warn"); // the SDK's own warnings and errors still show (on stderr)

const config = JSON.parse(readFileSync(process.argv[2], "utf8"));
const BASE = config.base_url.replace(/\/$/, "");
const MEDIA_BYTES = config.media_bytes ?? 5 * 1024 * 1024;
const WAIT_MS = 60_000;
const LONG_POLL_MS = 120_000; // sliding sync's server-side timeout
const DEBUG_HEADERS = ["x-synapse-router-route", "x-synapse-router-pool", "x-synapse-router-worker"];

const log = (...args) => console.error(`[scenario ${new Date().toISOString()}]`, ...args);

// ---------------------------------------------------------------------------------------------
// The recording fetch

class Recorder {
    constructor() {
        this.requests = 0;
        this.statuses = {};
        this.errors = [];
        this.aborted = 0; // aborts of a client being stopped (its sync long-poll): not errors
        this.expected = []; // non-2xx responses the scenario asked for
        this.withDebug = 0;
        this.withoutDebug = [];
        this.routes = {};
        this.workers = {};
        this.decisions = {}; // route -> {worker -> responses}
        this.expect = new Map(); // "METHOD path" -> status the scenario expects once
    }

    fetchFor(device) {
        return async (resource, init = {}) => {
            const method = (init.method ?? "GET").toUpperCase();
            const url = new URL(resource instanceof Request ? resource.url : String(resource));
            const what = `${method} ${url.pathname}`; // no query: it could carry a token
            let response;
            try {
                response = await fetch(resource, init);
            } catch (e) {
                if (device.stopping && (e?.name === "AbortError" || init.signal?.aborted)) {
                    this.aborted += 1;
                } else {
                    this.errors.push({ device: device.name, request: what, error: `${e?.name}: ${e?.message}` });
                }
                throw e;
            }
            this.requests += 1;
            this.statuses[response.status] = (this.statuses[response.status] ?? 0) + 1;
            const present = DEBUG_HEADERS.filter((h) => response.headers.has(h));
            if (present.length === DEBUG_HEADERS.length) {
                this.withDebug += 1;
                const route = response.headers.get("x-synapse-router-route");
                const worker = response.headers.get("x-synapse-router-worker");
                this.routes[route] = (this.routes[route] ?? 0) + 1;
                this.workers[worker] = (this.workers[worker] ?? 0) + 1;
                const byWorker = (this.decisions[route] ??= {});
                byWorker[worker] = (byWorker[worker] ?? 0) + 1;
            } else {
                this.withoutDebug.push({ request: what, status: response.status, present });
            }
            if (response.status >= 400) {
                const expected = this.expect.get(what);
                if (expected === response.status) {
                    this.expect.delete(what);
                    this.expected.push({ device: device.name, request: what, status: response.status });
                } else {
                    const body = await response.clone().text().catch(() => "");
                    this.errors.push({
                        device: device.name,
                        request: what,
                        status: response.status,
                        route: response.headers.get("x-synapse-router-route"),
                        worker: response.headers.get("x-synapse-router-worker"),
                        body: body.slice(0, 300),
                    });
                }
            }
            return response;
        };
    }

    summary(extra) {
        return {
            requests: this.requests,
            statuses: this.statuses,
            error_count: this.errors.length,
            errors: this.errors,
            aborted_on_stop: this.aborted,
            expected_errors: this.expected,
            debug_headers: {
                with: this.withDebug,
                without: this.withoutDebug.length,
                missing: this.withoutDebug,
            },
            routes: this.routes,
            workers: this.workers,
            decisions: this.decisions,
            ...extra,
        };
    }
}

const recorder = new Recorder();

// ---------------------------------------------------------------------------------------------
// Helpers

function waitFor(emitter, event, predicate, what) {
    return new Promise((resolve, reject) => {
        const timer = setTimeout(() => {
            emitter.removeListener(event, listener);
            reject(new Error(`timed out after ${WAIT_MS} ms waiting for ${what}`));
        }, WAIT_MS);
        function listener(...args) {
            let matched;
            try {
                matched = predicate(...args);
            } catch (e) {
                matched = false;
            }
            if (matched) {
                clearTimeout(timer);
                emitter.removeListener(event, listener);
                resolve(args);
            }
        }
        emitter.on(event, listener);
    });
}

async function poll(check, what) {
    const deadline = Date.now() + WAIT_MS;
    for (;;) {
        const value = check();
        if (value) return value;
        if (Date.now() > deadline) throw new Error(`timed out after ${WAIT_MS} ms waiting for ${what}`);
        await new Promise((r) => setTimeout(r, 50));
    }
}

// A read after a write served by another Synapse process sees the write once replication has
// brought it there (milliseconds): re-read until it does, within WAIT_MS.
async function eventually(read, check, what) {
    const deadline = Date.now() + WAIT_MS;
    for (;;) {
        const value = await read();
        if (check(value)) return value;
        if (Date.now() > deadline) throw new Error(`${what}: still ${JSON.stringify(value)} after ${WAIT_MS} ms`);
        await new Promise((r) => setTimeout(r, 200));
    }
}

async function login(name, user, password) {
    const device = { name, stopping: false };
    const loginClient = sdk.createClient({ baseUrl: BASE, fetchFn: recorder.fetchFor(device) });
    const answer = await loginClient.loginRequest({
        type: "m.login.password",
        identifier: { type: "m.id.user", user },
        password,
        initial_device_display_name: `js-sdk scenario ${name}`,
    });
    device.client = sdk.createClient({
        baseUrl: BASE,
        userId: answer.user_id,
        accessToken: answer.access_token,
        deviceId: answer.device_id,
        fetchFn: recorder.fetchFor(device),
    });
    device.userId = answer.user_id;
    device.deviceId = answer.device_id;
    device.accessToken = answer.access_token;
    return device;
}

async function start(device) {
    const client = device.client;
    client.on(sdk.ClientEvent.Sync, (state, _prev, data) => {
        if (state === "ERROR") {
            recorder.errors.push({ device: device.name, sync_state: state, error: String(data?.error ?? "") });
        }
    });
    const prepared = waitFor(client, sdk.ClientEvent.Sync, (state) => state === "PREPARED", `${device.name} PREPARED`);
    await client.startClient({ initialSyncLimit: 20 });
    await prepared;
}

function stop(device) {
    device.stopping = true;
    device.client.stopClient();
}

function timelineHas(client, roomId, predicate) {
    const room = client.getRoom(roomId);
    return room?.getLiveTimeline().getEvents().find(predicate);
}

async function sees(device, roomId, body) {
    return poll(
        () => timelineHas(device.client, roomId, (e) => e.getContent()?.body === body),
        `${device.name} to see "${body}"`,
    );
}

// A step that fails is recorded and the scenario goes on with the next one (one run shows every
// failing feature), except for steps the others need (`needed`), whose failure ends the run.
const steps = {};
const failures = [];
async function step(name, fn, { needed = false } = {}) {
    const started = Date.now();
    log(`step ${name}`);
    try {
        const result = await fn();
        steps[name] = Date.now() - started;
        return result;
    } catch (e) {
        failures.push(`${name}: ${e?.name}: ${e?.message}`);
        log(`step ${name} FAILED: ${e?.name}: ${e?.message}`);
        if (needed) throw e;
        return undefined;
    }
}

// ---------------------------------------------------------------------------------------------
// The scenario

const nonce = randomBytes(6).toString("hex");
const extra = { steps };

async function scenario() {
    const { alice: a, bob: b } = config.users;
    const [alice1, alice2, bob] = await step("login", async () => [
        await login("alice1", a.user, a.password),
        await login("alice2", a.user, a.password),
        await login("bob", b.user, b.password),
    ], { needed: true });
    const devices = [alice1, alice2, bob];
    try {
        await step("start_client", () => Promise.all(devices.map(start)), { needed: true });

        const roomId = await step("room", async () => {
            const { room_id } = await alice1.client.createRoom({
                preset: sdk.Preset.PrivateChat,
                invite: [bob.userId],
                name: `js-sdk ${nonce}`,
            });
            await poll(() => bob.client.getRoom(room_id)?.getMyMembership() === "invite", "bob's invite");
            await bob.client.joinRoom(room_id);
            await poll(
                () => alice1.client.getRoom(room_id)?.getMember(bob.userId)?.membership === "join",
                "alice1 to see bob join",
            );
            return room_id;
        }, { needed: true });

        const bobEvent = await step("messages", async () => {
            const fromAlice = `hello bob ${nonce}`;
            await alice1.client.sendTextMessage(roomId, fromAlice);
            await sees(bob, roomId, fromAlice);
            const fromBob = `hello alice ${nonce}`;
            await bob.client.sendTextMessage(roomId, fromBob);
            await sees(alice1, roomId, fromBob);
            return sees(alice2, roomId, fromBob);
        }, { needed: true });

        await step("typing", async () => {
            const typingMember = (device, typing) =>
                device.client.getRoom(roomId)?.getMember(bob.userId)?.typing === typing;
            await bob.client.sendTyping(roomId, true, 30_000);
            await poll(() => typingMember(alice1, true), "alice1 to see bob typing");
            await bob.client.sendTyping(roomId, false);
            await poll(() => typingMember(alice1, false), "alice1 to see bob stop typing");
        });

        await step("read_receipt", async () => {
            await alice1.client.sendReadReceipt(bobEvent, sdk.ReceiptType.Read);
            await poll(
                () => bob.client.getRoom(roomId)?.getEventReadUpTo(alice1.userId) === bobEvent.getId(),
                "bob to see alice's read receipt",
            );
        });

        await step("read_markers", async () => {
            const fromBob = `read this ${nonce}`;
            await bob.client.sendTextMessage(roomId, fromBob);
            const event = await sees(alice1, roomId, fromBob);
            await alice1.client.setRoomReadMarkers(roomId, event.getId(), event);
            await poll(
                () => alice2.client.getRoom(roomId)?.getAccountData("m.fully_read")?.getContent()?.event_id === event.getId(),
                "alice2 to see m.fully_read",
            );
            await poll(
                () => bob.client.getRoom(roomId)?.getEventReadUpTo(alice1.userId) === event.getId(),
                "bob to see the receipt sent with the read marker",
            );
        });

        await step("to_device", async () => {
            const type = "org.example.scenario.ping";
            const toBob = waitFor(
                bob.client,
                sdk.ClientEvent.ToDeviceEvent,
                (e) => e.getType() === type && e.getContent().nonce === `a${nonce}`,
                "bob's to-device message",
            );
            await alice1.client.sendToDevice(type, new Map([[bob.userId, new Map([[bob.deviceId, { nonce: `a${nonce}` }]])]]));
            await toBob;
            const toAlice2 = waitFor(
                alice2.client,
                sdk.ClientEvent.ToDeviceEvent,
                (e) => e.getType() === type && e.getContent().nonce === `b${nonce}`,
                "alice2's to-device message",
            );
            await bob.client.sendToDevice(type, new Map([[alice2.userId, new Map([[alice2.deviceId, { nonce: `b${nonce}` }]])]]));
            await toAlice2;
        });

        await step("account_data", async () => {
            const type = "org.example.scenario.settings";
            const onAlice2 = waitFor(
                alice2.client,
                sdk.ClientEvent.AccountData,
                (e) => e.getType() === type && e.getContent().nonce === nonce,
                "alice2 to see the account data",
            );
            await alice1.client.setAccountData(type, { nonce }); // resolves once alice1's sync echoes it
            await onAlice2;
            await eventually(
                () => alice2.client.getAccountDataFromServer(type),
                (stored) => stored?.nonce === nonce,
                "account data read back",
            );
        });

        // What a client like Element does besides the above: history, members, a redaction,
        // profile, tags, the user directory, device names, keys, relations; then presence.
        await step("everyday_calls", async () => {
            const c = alice1.client;
            const history = await c.createMessagesRequest(roomId, null, 30, sdk.Direction.Backward);
            if (!history.chunk?.some((e) => e.event_id === bobEvent.getId())) throw new Error("/messages lacks bob's message");
            const { chunk: members } = await c.members(roomId);
            if (members.length !== 2) throw new Error(`/members answered ${members.length} members`);
            await c.getStateEvent(roomId, "m.room.name", "");
            await c.getJoinedRooms();
            await c.fetchRoomEvent(roomId, bobEvent.getId());
            await c.relations(roomId, bobEvent.getId(), "m.annotation");
            const { event_id: toRedact } = await c.sendTextMessage(roomId, `oops ${nonce}`);
            await c.redactEvent(roomId, toRedact);
            await c.setDisplayName(`Alice ${nonce}`);
            await eventually(
                () => bob.client.getProfileInfo(alice1.userId),
                (profile) => profile.displayname === `Alice ${nonce}`,
                "alice's profile seen by bob",
            );
            await c.setRoomTag(roomId, "m.favourite", { order: 0.5 });
            await eventually(() => c.getRoomTags(roomId), ({ tags }) => Boolean(tags["m.favourite"]), "tags read back");
            await bob.client.searchUserDirectory({ term: alice1.userId.slice(1, 8) });
            await c.setDeviceDetails(alice1.deviceId, { display_name: `alice1 ${nonce}` });
            await c.downloadKeysForUsers([bob.userId]);
            await c.getMediaConfig();
            await c.getCapabilities();
        });

        await step("presence", async () => {
            await alice1.client.setPresence({ presence: "online", status_msg: `here ${nonce}` });
            const online = (presence) => presence.presence === "online";
            await eventually(() => alice1.client.getPresence(alice1.userId), online, "own presence read back");
            await eventually(() => bob.client.getPresence(alice1.userId), online, "alice's presence seen by bob");
        });

        await step("media", async () => {
            const bytes = randomBytes(MEDIA_BYTES);
            const { content_uri } = await alice1.client.uploadContent(bytes, {
                type: "application/octet-stream",
                name: "scenario.bin",
            });
            if (!content_uri?.startsWith("mxc://")) throw new Error(`upload answered ${content_uri}`);
            // Authenticated media (Synapse's default): /_matrix/client/v1/media/download with the token.
            const url = bob.client.mxcUrlToHttp(content_uri, undefined, undefined, undefined, false, true, true);
            const response = await recorder.fetchFor(bob)(url, {
                headers: { Authorization: `Bearer ${bob.accessToken}` },
            });
            if (response.status !== 200) throw new Error(`download answered ${response.status}`);
            const got = Buffer.from(await response.arrayBuffer());
            if (!got.equals(bytes)) throw new Error(`downloaded ${got.length} bytes, differing from the ${bytes.length} uploaded`);
            extra.media = { bytes: got.length, sha256: createHash("sha256").update(got).digest("hex") };
        });

        await step("sliding_sync", async () => {
            const body = () => ({
                conn_id: `scenario-${nonce}`,
                lists: {
                    all: { ranges: [[0, 20]], required_state: [["m.room.create", ""]], timeline_limit: 5 },
                },
            });
            let started = Date.now();
            const initial = await alice1.client.slidingSync(body());
            const initialMs = Date.now() - started;
            if (!initial.pos || !initial.rooms?.[roomId]) {
                throw new Error(`initial sliding sync without pos or without the room: ${JSON.stringify(initial).slice(0, 300)}`);
            }
            // Long-poll until the response carrying Bob's message. It must end before the server's
            // timeout (woken by the message, not timed out and then carrying it); other changes
            // may wake an earlier poll.
            const wake = `wake up ${nonce}`;
            let pos = initial.pos;
            let sent = false;
            for (let polls = 1; polls <= 5; polls++) {
                started = Date.now();
                const pending = alice1.client.slidingSync({ ...body(), pos, timeout: LONG_POLL_MS, clientTimeout: 2 * LONG_POLL_MS });
                if (!sent) {
                    await new Promise((r) => setTimeout(r, 1000));
                    await bob.client.sendTextMessage(roomId, wake);
                    sent = true;
                }
                const answer = await pending;
                const ms = Date.now() - started;
                pos = answer.pos;
                const timeline = answer.rooms?.[roomId]?.timeline ?? [];
                if (timeline.some((e) => e.content?.body === wake)) {
                    if (ms >= LONG_POLL_MS / 2) throw new Error(`the long-poll timed out (${ms} ms) instead of being woken`);
                    extra.sliding_sync = { initial_ms: initialMs, woken_ms: ms, polls };
                    return;
                }
            }
            throw new Error("no sliding-sync long-poll returned the message");
        });

        await step("logout", async () => {
            stop(alice2);
            await alice2.client.logout(true);
            // The logged-out token is refused; alice1 still works and no longer lists the device.
            // (A worker other than the one that logged it out may accept it until replication
            // tells it; what a router may not do is keep accepting it.)
            await eventually(
                async () => {
                    recorder.expect.set("GET /_matrix/client/v3/account/whoami", 401);
                    const answer = await recorder.fetchFor(alice2)(`${BASE}/_matrix/client/v3/account/whoami`, {
                        headers: { Authorization: `Bearer ${alice2.accessToken}` },
                    });
                    recorder.expect.delete("GET /_matrix/client/v3/account/whoami");
                    return answer.status;
                },
                (status) => status === 401,
                "whoami with the logged-out token",
            );
            await eventually(
                () => alice1.client.getDevices(),
                ({ devices }) =>
                    !devices.some((d) => d.device_id === alice2.deviceId) &&
                    devices.some((d) => d.device_id === alice1.deviceId),
                "alice's devices without alice2",
            );
        });
    } finally {
        devices.forEach(stop);
    }
}

try {
    await scenario();
} catch (e) {
    if (!failures.length) failures.push(`${e?.name}: ${e?.message}`); // not from a step
    if (e?.stack) log(e.stack);
}
// Let aborted long-polls settle before counting.
await new Promise((r) => setTimeout(r, 500));
const summary = recorder.summary({ ...extra, failures });
const text = JSON.stringify(summary);
if (config.summary_path) writeFileSync(config.summary_path, text + "\n");
console.log(text);
process.exit(failures.length === 0 && summary.error_count === 0 ? 0 : 1);
