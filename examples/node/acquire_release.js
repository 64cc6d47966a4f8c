#!/usr/bin/env node
// Acquires a concurrency slot of the limiter, does the work, and always releases it.
//
//   SWITCHBOARD_TOKEN=... node acquire_release.js [--account A] [--resource R] [--fail]
//
// The token needs the scope `limiter.acquire`; its account is used unless --account (or
// SWITCHBOARD_ACCOUNT) names another. --fail makes the work throw, to show that the slot is
// released then too. Exit status: 0 done, 1 over the limit or the work failed, 2 a call failed.
'use strict';

const crypto = require('node:crypto');
const { parseArgs } = require('node:util');
const { grpc, LIMITER, address, auth, load, isoTime } = require('./connection');

const limiterPb = load('switchboard/limiter/v1/limiter.proto', 'switchboard.limiter.v1');

/** A unary call as a promise. */
function call(client, method, request, timeoutMs = 10_000) {
  return new Promise((resolve, reject) => {
    client[method](request, auth(), { deadline: Date.now() + timeoutMs }, (err, answer) =>
      err ? reject(err) : resolve(answer),
    );
  });
}

class OverLimit extends Error {}

/**
 * Runs `work(slot)` holding one slot of (account, resource), and releases the slot when
 * `work` ends, however it ends. A holder that dies without releasing frees its slot when
 * holdSeconds run out.
 */
async function withSlot(limiter, { account, resource, holdSeconds = 60, waitMs = 0 }, work) {
  const granted = await call(
    limiter,
    'Acquire',
    {
      account_id: account,
      resource,
      hold_seconds: holdSeconds,
      wait_timeout_ms: waitMs,
      // An Acquire retried with the same request_id gets the same slot, not a second one.
      request_id: crypto.randomUUID(),
    },
    10_000 + waitMs,
  );
  if (granted.decision !== 'DECISION_GRANTED') {
    const { in_flight: inFlight, limit, retry_after_ms: retryAfterMs } = granted;
    throw new OverLimit(`rejected in_flight=${inFlight} limit=${limit} retry_after_ms=${retryAfterMs}`);
  }
  try {
    return await work(granted);
  } finally {
    const answer = await call(limiter, 'Release', { slot_id: granted.slot_id });
    console.log(`released slot=${granted.slot_id} released=${answer.released}`);
  }
}

async function main() {
  const { values: args } = parseArgs({
    options: {
      account: { type: 'string', default: process.env.SWITCHBOARD_ACCOUNT || '' },
      resource: { type: 'string', default: process.env.SWITCHBOARD_RESOURCE || 'reports' },
      'hold-seconds': { type: 'string', default: '60' },
      'wait-ms': { type: 'string', default: '0' },
      'work-ms': { type: 'string', default: '100' },
      fail: { type: 'boolean', default: false },
    },
  });
  const target = address(LIMITER);
  const limiter = new limiterPb.LimiterService(target, grpc.credentials.createInsecure());
  const options = {
    account: args.account,
    resource: args.resource,
    holdSeconds: Number(args['hold-seconds']),
    waitMs: Number(args['wait-ms']),
  };
  try {
    await withSlot(limiter, options, async (slot) => {
      console.log(
        `granted slot=${slot.slot_id} fencing_token=${slot.fencing_token} ` +
          `in_flight=${slot.in_flight}/${slot.limit} resource=${args.resource} ` +
          `expires=${isoTime(slot.expire_time)}`,
      );
      await new Promise((resolve) => setTimeout(resolve, Number(args['work-ms'])));
      if (args.fail) throw new Error('the work failed (--fail)');
    });
    return 0;
  } catch (err) {
    if (err instanceof OverLimit) {
      console.log(err.message);
      return 1;
    }
    if (err.code !== undefined && err.details !== undefined) {
      console.error(`error address=${target} code=${grpc.status[err.code]} message=${err.details}`);
      return 2;
    }
    console.log(`failed: ${err.message}`);
    return 1;
  } finally {
    limiter.close();
  }
}

main().then((code) => {
  process.exitCode = code;
});
