// Where the examples connect, and with which token: the SWITCHBOARD_* environment; and the
// Switchboard contract, loaded at run time from ../../proto (no generated code).
'use strict';

const path = require('node:path');
const grpc = require('@grpc/grpc-js');
const protoLoader = require('@grpc/proto-loader');

const PROTO_ROOT = path.resolve(__dirname, '..', '..', 'proto');

// The ports scripts/stack (and each service's --listen default) uses.
const PRESENCE = ['SWITCHBOARD_PRESENCE', '127.0.0.1:50051'];
const LIMITER = ['SWITCHBOARD_LIMITER', '127.0.0.1:50052'];

/** The address of `service` (PRESENCE or LIMITER): its variable, else the stack's port. */
function address([variable, fallback]) {
  return process.env[variable] || fallback;
}

/** Call metadata carrying SWITCHBOARD_TOKEN as `authorization: Bearer <JWT>`. */
function auth() {
  const token = process.env.SWITCHBOARD_TOKEN;
  if (!token) {
    console.error(
      'SWITCHBOARD_TOKEN is not set: export a token (with scripts/stack running, ' +
        '`. .stack/env && export SWITCHBOARD_TOKEN=$DEMO_TOKEN`)',
    );
    process.exit(2);
  }
  const metadata = new grpc.Metadata();
  metadata.set('authorization', `Bearer ${token}`);
  return metadata;
}

/** The package `name` (e.g. 'switchboard.limiter.v1') of `file` under proto/. */
function load(file, name) {
  const definition = protoLoader.loadSync(path.join(PROTO_ROOT, file), {
    includeDirs: [PROTO_ROOT], // google/protobuf/*.proto come with protobufjs
    keepCase: true, // field names as in the .proto files: slot_id, start_revision
    longs: String, // int64/uint64 as decimal strings (revisions, fencing tokens)
    enums: String, // enum values by name: 'DECISION_GRANTED'
    defaults: true,
    oneofs: true, // a oneof's name says which field is set: event.event === 'joined'
  });
  return name.split('.').reduce((scope, part) => scope[part], grpc.loadPackageDefinition(definition));
}

/** A Timestamp as ISO 8601. */
function isoTime(timestamp) {
  if (!timestamp) return '-';
  return new Date(Number(timestamp.seconds) * 1000 + Math.floor(timestamp.nanos / 1e6)).toISOString();
}

module.exports = { grpc, PRESENCE, LIMITER, address, auth, load, isoTime };
