#!/usr/bin/env node
// matrix-js-sdk clients of one user kept busy while the test SIGKILLs the Synapse worker that
// serves them. Run by tests/e2e/test_js_sigkill.py, which talks to it over stdin/stdout, one
// JSON object a line:
//
//   node sigkill.mjs CONFIG.json
//   CONFIG: {"base_url": "http://127.0.0.1:PORT", "user": "localpart", "password": "...",
//            "rooms": 16, "summary_path": ".../summary.json"}
//
// 1. Three devices of the user log in: `syncer` runs the SDK's own /sync loop (startClient,
//    8 s long-polls, a filter without rooms so that messages do not wake them), `sender` sends
//    messages, `poller` long-polls simplified sliding sync (client.slidingSync: POST
//    .../org.matrix.simplified_msc3575/sync?pos=..&timeout=..). The sender creates `rooms`
//    rooms and sends one probe message in each (txnId `probe-<nonce>-<i>`), so the test can tell
//    from Synapse's access logs which room's sends reach the worker it will kill.
//    -> {"event": "ready", "user_id": ..., "rooms": [{"room_id": ..., "txn": ...}, ...]}
// 2. <- {"room": ROOM_ID}: the sender sends into that room in three concurrent loops (txnId
//    `k<loop>x<i>-<nonce>`, body the same); the poller long-polls two sliding-sync connections,
//    `busy` listing the rooms (every message wakes it, so its `pos` advances) and `quiet`
//    listing none (6 s polls, in flight when the worker dies); the syncer keeps syncing.
//    -> {"event": "running"}
// 3. <- {"stop": true, "killed_at": EPOCH_MS}: the loops stop (the busy poller's long-poll in
//    flight is aborted, which is not an error; the quiet ones in flight at the kill are waited
//    for), the room's timeline is read back through /messages.
//    -> the summary (also written to summary_path), then exit 0.
//
// Every request goes through one recording fetch (fetchFn): method, path template, raw path
// (no query: it could carry a token), status, start and end time of each response; a fetch that
// failed (other than an abort of a client being stopped) and a sync loop ERROR state are
// errors. The test judges the summary: this script only records.

import { randomBytes } from "node:crypto";
import { readFileSync, writeFileSync } from "node:fs";
import { createInterface } from "node:readline";

import * as sdk from "matrix-js-sdk";
import { logger as sdkLogger } from "matrix-js-sdk/lib/logger.js";

sdkLogger.setLevel("warn");

const config = JSON.parse(readFileSync(process.argv[2], "utf8"));
const BASE = config.base_url.replace(/\/$/, "");
const ROOMS = config.rooms ?? 16;
const LONG_POLL_MS = 20_000; // sliding sync's server-side timeout; messages wake it long before
const SYNC_POLL_MS = 8_000; // the syncer's /sync timeout (the SDK's default is 30 s)
const WAIT_MS = 60_000;
const nonce = randomBytes(6).toString("hex");

const log = (...args) => console.error(`[sigkill ${new Date().toISOString()}]`, ...args);
const say = (obj) => process.stdout.write(JSON.stringify(obj) + "\n");
const sleep = (ms) => new Promise((r) => setTimeout(r, ms));

// Commands from the test, one JSON object a line.
const lines = createInterface({ input: process.stdin })[Symbol.asyncIterator]();
async function command() {
    const { value, done } = await lines.next();
    if (done) throw new Error("stdin closed before the test's next command");
    return JSON.parse(value);
}

// ---------------------------------------------------------------------------------------------
// The recording fetch

const TEMPLATES = [
    [/\/rooms\/[^/]+\/send\/([^/]+)\/[^/]+$/, "/rooms/{roomId}/send/$1/{txnId}"],
    [/\/rooms\/[^/]+\//, "/rooms/{roomId}/"],
    [/\/user\/[^/]+\//, "/user/{userId}/"],
    [/\/profile\/[^/]+/, "/profile/{userId}"],
    [/\/pushrules\/.*$/, "/pushrules/..."],
];

function template(path) {
    let t = path;
    for (const [pattern, replacement] of TEMPLATES) t = t.replace(pattern, replacement);
    return t;
}

const requests = []; // {device, method, template, path, status, at}
const errors = []; // fetch failures, sync loop ERROR states
let aborted = 0;

function recordingFetch(device) {
    return async (resource, init = {}) => {
        const method = (init.method ?? "GET").toUpperCase();
        const url = new URL(resource instanceof Request ? resource.url : String(resource));
        const started = Date.now();
        let response;
        try {
            response = await fetch(resource, init);
        } catch (e) {
            if (device.stopping && (e?.name === "AbortError" || init.signal?.aborted)) {
                aborted += 1;
            } else {
                errors.push({ device: device.name, method, path: url.pathname, error: `${e?.name}: ${e?.message}`, started, at: Date.now() });
            }
            throw e;
        }
        const entry = { device: device.name, method, template: template(url.pathname), path: url.pathname, status: response.status, started, at: Date.now() };
        if (response.status >= 300) {
            entry.body = (await response.clone().text().catch(() => "")).slice(0, 300);
            entry.content_type = response.headers.get("content-type");
        }
        requests.push(entry);
        return response;
    };
}

async function login(name) {
    const device = { name, stopping: false };
    const loginClient = sdk.createClient({ baseUrl: BASE, fetchFn: recordingFetch(device) });
    const answer = await loginClient.loginRequest({
        type: "m.login.password",
        identifier: { type: "m.id.user", user: config.user },
        password: config.password,
        initial_device_display_name: `js-sdk sigkill ${name}`,
    });
    device.client = sdk.createClient({
        baseUrl: BASE,
        userId: answer.user_id,
        accessToken: answer.access_token,
        deviceId: answer.device_id,
        fetchFn: recordingFetch(device),
    });
    device.userId = answer.user_id;
    device.credentials = answer;
    return device;
}

// The syncer's filter leaves every room out: its long-polls are not woken by the messages sent,
// so one is in flight when the worker is killed.
async function startSyncing(device) {
    const client = device.client;
    client.on(sdk.ClientEvent.Sync, (state, _prev, data) => {
        if (state === "ERROR") errors.push({ device: device.name, sync_state: state, error: String(data?.error ?? ""), at: Date.now() });
    });
    const prepared = new Promise((resolve, reject) => {
        const timer = setTimeout(() => reject(new Error("syncer not PREPARED in time")), WAIT_MS);
        client.on(sdk.ClientEvent.Sync, (state) => {
            if (state === "PREPARED") {
                clearTimeout(timer);
                resolve();
            }
        });
    });
    const filter = new sdk.Filter(device.userId);
    filter.setDefinition({
        room: { rooms: [] },
        presence: { not_types: ["*"] },
        account_data: { not_types: ["*"] },
    });
    await client.startClient({ filter, pollTimeout: SYNC_POLL_MS });
    await prepared;
}

// ---------------------------------------------------------------------------------------------
// The run

const syncer = await login("syncer");
const sender = await login("sender");
const poller = await login("poller");
const devices = [syncer, sender, poller];
await startSyncing(syncer);

const rooms = [];
for (let i = 0; i < ROOMS; i++) {
    const { room_id } = await sender.client.createRoom({ preset: sdk.Preset.PrivateChat, name: `sigkill ${nonce} ${i}` });
    const txn = `probe-${nonce}-${i}`;
    await sender.client.sendMessage(room_id, { msgtype: "m.text", body: txn }, txn);
    rooms.push({ room_id, txn });
}
say({ event: "ready", user_id: sender.userId, rooms });

const { room } = await command();
// The poller's `busy` connection lists the rooms (each message wakes it: its pos advances); its
// `quiet` one lists none, so it waits its whole timeout (in flight when the worker is killed).
const slidingBody = (kind) => ({
    conn_id: `sigkill-${kind}-${nonce}`,
    lists: kind === "busy" ? { all: { ranges: [[0, 20]], required_state: [["m.room.create", ""]], timeline_limit: 1 } } : {},
});
const QUIET_POLL_MS = 6_000; // outlasts the kill; the test stops the clients 4 s after it

let stopping = false;
const sent = []; // {txn, status: "ok" | error text, event_id, at}
const polls = { busy: [], quiet: [] }; // {pos_in, pos_out, started, at}
const busyAbort = new AbortController();

// The SDK's scheduler sends a client's messages to one room one at a time: three clients of
// the sender's device (as three tabs would be) keep three sends in flight.
function senderClient() {
    const { user_id, access_token, device_id } = sender.credentials;
    const client = sdk.createClient({ baseUrl: BASE, userId: user_id, accessToken: access_token, deviceId: device_id, fetchFn: recordingFetch(sender) });
    devices.push({ name: "sender", client });
    return client;
}

async function sendLoop(loop) {
    const client = senderClient();
    for (let i = 0; !stopping; i++) {
        const txn = `k${loop}x${i}-${nonce}`;
        try {
            const { event_id } = await client.sendMessage(room, { msgtype: "m.text", body: txn }, txn);
            sent.push({ txn, status: "ok", event_id, at: Date.now() });
        } catch (e) {
            sent.push({ txn, status: `${e?.name}: ${e?.httpStatus ?? ""} ${e?.message}`, at: Date.now() });
            await sleep(200);
        }
    }
}

async function pollLoop(kind, pos) {
    const timeout = kind === "busy" ? LONG_POLL_MS : QUIET_POLL_MS;
    const signal = kind === "busy" ? busyAbort.signal : undefined;
    while (!stopping) {
        const started = Date.now();
        try {
            const answer = await poller.client.slidingSync(
                { ...slidingBody(kind), pos, timeout, clientTimeout: 3 * LONG_POLL_MS },
                undefined,
                signal,
            );
            polls[kind].push({ pos_in: pos, pos_out: answer.pos, started, at: Date.now() });
            pos = answer.pos ?? pos;
        } catch (e) {
            if (stopping && kind === "busy") return;
            polls[kind].push({ pos_in: pos, pos_out: null, started, at: Date.now(), error: `${e?.name}: ${e?.httpStatus ?? ""} ${e?.message}` });
            await sleep(200);
        }
    }
}

const firstPos = {};
for (const kind of ["busy", "quiet"]) firstPos[kind] = (await poller.client.slidingSync(slidingBody(kind))).pos;
// Three sends in flight at a time: the kill does not fall between two of them.
const loops = [sendLoop(0), sendLoop(1), sendLoop(2), pollLoop("busy", firstPos.busy), pollLoop("quiet", firstPos.quiet)];
say({ event: "running" });

const stop = await command();
stopping = true;
poller.stopping = true;
busyAbort.abort();
await Promise.all(loops); // the quiet poll in flight ends at its timeout
// The syncer's long-poll that was in flight at the kill ends at its timeout too (on the worker
// it was resent to): wait for it rather than abort it.
const syncedAcross = () =>
    requests.some((r) => r.device === "syncer" && r.template.endsWith("/sync") && r.started < stop.killed_at && r.at > stop.killed_at);
for (const deadline = Date.now() + WAIT_MS; !syncedAcross() && !errors.length && Date.now() < deadline; ) await sleep(100);
syncer.stopping = true;
syncer.client.stopClient();

// The room's timeline as the (surviving) room worker has it: every message sent, by body.
async function timelineCounts() {
    const counts = {};
    let from = null;
    for (;;) {
        const page = await sender.client.createMessagesRequest(room, from, 500, sdk.Direction.Backward);
        for (const e of page.chunk ?? []) {
            if (e.type === "m.room.message") counts[e.content?.body] = (counts[e.content?.body] ?? 0) + 1;
        }
        if (!page.chunk?.length || !page.end) return counts;
        from = page.end;
    }
}
let timeline = await timelineCounts();
const deadline = Date.now() + WAIT_MS;
while (sent.some((s) => s.status === "ok" && !timeline[s.txn]) && Date.now() < deadline) {
    await sleep(500); // replication to the reading worker
    timeline = await timelineCounts();
}

devices.forEach((d) => {
    d.stopping = true;
    d.client.stopClient();
});
await sleep(300);
const summary = { user_id: sender.userId, room, requests, errors, aborted_on_stop: aborted, sent, polls, timeline, stop };
if (config.summary_path) writeFileSync(config.summary_path, JSON.stringify(summary) + "\n");
say({ event: "summary", requests: requests.length, errors: errors.length, sent: sent.length, polls: polls.length });
process.exit(0);
