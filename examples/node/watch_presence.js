#!/usr/bin/env node
// Prints presence changes (devices joining, changing, leaving) and resumes after a break.
//
//   SWITCHBOARD_TOKEN=... node watch_presence.js [IDENTITY ...] [--account A] [--from-revision N]
//
// The token needs the scope `presence.read`. SWITCHBOARD_PRESENCE may name several replicas
// (comma-separated): when the stream breaks the watcher moves to the next one.
//
// WatchPresence (proto/switchboard/presence/v1/presence.proto) stamps every event with the
// etcd revision of the change and never skips a change after its start point, so a watcher
// that remembers the last revision it saw loses nothing across a break:
// - the first watch asks for a snapshot (the devices present now, as `joined`, then
//   `snapshot_complete`), unless --from-revision says where to start;
// - when the stream breaks (UNAVAILABLE when the replica stops, or the connection drops) it
//   reconnects with backoff and resumes from the last revision seen;
// - when that revision has been compacted the server sends `compacted` and ends the stream
//   with OUT_OF_RANGE: changes were lost, so it takes a new snapshot.
//
// Each line starts with a fixed word: watch, resume, joined, updated, left,
// snapshot_complete, compacted, disconnected, error. A refused token or request exits 1.
'use strict';

const { parseArgs } = require('node:util');
const { grpc, PRESENCE, address, auth, load } = require('./connection');

const presencePb = load('switchboard/presence/v1/presence.proto', 'switchboard.presence.v1');

const INITIAL_BACKOFF_MS = 250;
const MAX_BACKOFF_MS = 5000;
// Retrying cannot help these: the token or the request is wrong.
const FATAL = new Set([
  grpc.status.UNAUTHENTICATED,
  grpc.status.PERMISSION_DENIED,
  grpc.status.INVALID_ARGUMENT,
  grpc.status.UNIMPLEMENTED,
]);

/**
 * Where the next watch starts: a snapshot (0n), or a revision.
 *
 * After a change it is the revision of the last change seen, not the one after: one
 * revision can carry several events (one etcd transaction changes several devices), and a
 * stream that broke between two of them must deliver the rest; the events of that revision
 * already printed are remembered and skipped. After a snapshot it is the snapshot's
 * revision + 1, since the snapshot already shows every change up to it.
 */
class Position {
  constructor(fromRevision) {
    this.start = fromRevision;
    this.seen = new Set(); // events already printed at revision this.start
    this.inSnapshot = false;
  }

  request(account, identities) {
    const snapshot = this.start === 0n;
    this.inSnapshot = snapshot;
    return {
      account_id: account,
      identities,
      start_revision: snapshot ? '0' : this.start.toString(),
      snapshot,
    };
  }

  /** Records `event`; false when it was already printed before a break. */
  isNew(event) {
    const revision = BigInt(event.revision);
    if (this.inSnapshot) {
      // Snapshot events all carry the snapshot's revision; it counts only once the snapshot
      // is complete (a snapshot cut short is taken again).
      if (event.event === 'snapshot_complete') {
        this.inSnapshot = false;
        this.start = revision + 1n;
        this.seen = new Set();
      }
      return true;
    }
    if (event.event === 'compacted') {
      this.start = 0n;
      this.seen = new Set();
      return true;
    }
    const device = event[event.event].device;
    const key = `${event.event} ${device.identity} ${device.device_id}`;
    if (revision > this.start) {
      this.start = revision;
      this.seen = new Set();
    } else if (revision < this.start || this.seen.has(key)) {
      return false;
    }
    this.seen.add(key);
    return true;
  }
}

const lower = (value, prefix) => String(value).replace(prefix, '').toLowerCase();

function describe(event) {
  if (event.event === 'snapshot_complete') return `snapshot_complete revision=${event.revision}`;
  if (event.event === 'compacted') {
    const revision = event.compacted.compact_revision;
    return `compacted compact_revision=${revision} (changes were lost: taking a new snapshot)`;
  }
  const change = event[event.event];
  const { device } = change;
  let line =
    `${event.event} revision=${event.revision} device=${device.identity}/${device.device_id} ` +
    `status=${lower(device.status, 'STATUS_')} kind=${lower(device.connection_kind, 'CONNECTION_KIND_')}`;
  if (event.event === 'left') line += ` reason=${lower(change.reason, 'LEAVE_REASON_')}`;
  return line;
}

/** One WatchPresence stream on its own channel, printed until it ends; its status code. */
function watchOnce(target, request, metadata, position) {
  return new Promise((resolve) => {
    const client = new presencePb.PresenceService(target, grpc.credentials.createInsecure());
    const stream = client.WatchPresence(request, metadata);
    let settled = false;
    const finish = (code, details) => {
      if (settled) return;
      settled = true;
      client.close();
      if (FATAL.has(code))
        console.log(`error address=${target} code=${grpc.status[code]} message=${details}`);
      resolve(code);
    };
    stream.on('data', (event) => {
      if (position.isNew(event)) console.log(describe(event));
    });
    stream.on('error', (err) => finish(err.code, err.details));
    stream.on('end', () => finish(grpc.status.OK, 'the stream ended'));
  });
}

async function main() {
  const { values: args, positionals: identities } = parseArgs({
    allowPositionals: true,
    options: {
      account: { type: 'string', default: process.env.SWITCHBOARD_ACCOUNT || '' },
      'from-revision': { type: 'string', default: '0' },
    },
  });
  const addresses = address(PRESENCE)
    .split(',')
    .map((a) => a.trim())
    .filter(Boolean);
  const metadata = auth();
  const position = new Position(BigInt(args['from-revision']));
  let backoffMs = INITIAL_BACKOFF_MS;
  for (let attempt = 0; ;) {
    const target = addresses[attempt % addresses.length];
    const request = position.request(args.account, identities);
    if (request.snapshot) console.log(`watch address=${target} snapshot=true`);
    else console.log(`resume address=${target} start_revision=${request.start_revision}`);
    const before = `${position.start} ${position.seen.size}`;
    const code = await watchOnce(target, request, metadata, position);
    if (FATAL.has(code)) return 1;
    if (`${position.start} ${position.seen.size}` !== before) backoffMs = INITIAL_BACKOFF_MS;
    attempt += 1;
    const next = addresses[attempt % addresses.length];
    if (code === grpc.status.OUT_OF_RANGE) {
      position.start = 0n; // compacted: only a new snapshot can catch up
      backoffMs = 0;
    }
    console.log(
      `disconnected address=${target} code=${grpc.status[code]} retry_in=${backoffMs}ms next=${next}`,
    );
    await new Promise((resolve) => setTimeout(resolve, backoffMs));
    backoffMs = Math.min(Math.max(backoffMs * 2, INITIAL_BACKOFF_MS), MAX_BACKOFF_MS);
  }
}

process.on('SIGINT', () => process.exit(0));
main().then((code) => {
  process.exitCode = code;
});
