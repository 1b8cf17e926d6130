// k6 runner for the load-test scenarios: reads a scenario's ghz config (loadtest/ghz/<name>.json, written from
// loadtest/scenarios.py) and sends the same request at the same concurrency, for the same duration, with the same
// deadline. Server reflection finds the method (the gateway and every replica serve it), so no .proto is needed.
//
//   k6 run -e CONFIG=loadtest/ghz/sentiment.json loadtest/k6/scenario.js
//   k6 run -e CONFIG=loadtest/ghz/embed.json -e TARGET=127.0.0.1:50061 --vus 4 --iterations 40 loadtest/k6/scenario.js
//   python -m loadtest.scenarios payloads   # first, for configs with a data-file (photo, speech)
//   k6 run -e CONFIG=loadtest/ghz/vision-classify.json loadtest/k6/scenario.js
//
// Relative paths (CONFIG, the config's data-file, DATA_FILE) are taken from the repository root, wherever k6 runs.
// Unary methods go through client.invoke; server-streaming ones (tags.rpc == "server-streaming": synthesize, chat)
// through grpc.Stream, read to the end. Every call must end OK: a failed status check fails the run.
// Overrides: TARGET (host:port), VUS, DURATION, DEADLINE, DATA_FILE; --vus/--iterations/--duration too.
//
// The gateway wants an API key on every call: API_KEY, else the one in the config's metadata-file
// (loadtest/ghz/payloads/metadata.json, written by `python -m loadtest.scenarios payloads`):
//
//   k6 run -e CONFIG=loadtest/ghz/sentiment.json -e API_KEY="$AIMASS_API_KEY" loadtest/k6/scenario.js
//
// Straight to a replica instead (gateway vs direct), as a gateway calls it: mesh mTLS with the mesh's CA and a
// gateway certificate (`aimass up` keeps them in its state directory's pki/; local processes' certificates name
// 127.0.0.1, the name k6 checks, as it cannot be told another), and no key:
//
//   k6 run -e CONFIG=loadtest/ghz/embed.json -e TARGET=127.0.0.1:50061 \
//       -e CACERT="$PKI/ca.crt" -e CERT="$PKI/gateway.crt" -e CERT_KEY="$PKI/gateway.key" loadtest/k6/scenario.js
import grpc from 'k6/net/grpc';
import { check } from 'k6';
import { API_KEY_METADATA, TLS, connect, reportFailure, resolve } from './mesh.js';

if (!__ENV.CONFIG) {
  throw new Error('give the scenario: -e CONFIG=loadtest/ghz/<name>.json (see python -m loadtest.scenarios list)');
}
const config = JSON.parse(open(resolve(__ENV.CONFIG)));
const dataFile = __ENV.DATA_FILE || config['data-file'];
const REQUEST = dataFile ? JSON.parse(open(resolve(dataFile))) : config.data;
// ghz names methods package.Service.Method; k6 wants package.Service/Method.
const METHOD = config.call.replace(/\.([^.]+)$/, '/$1');
const TARGET = __ENV.TARGET || config.host;
const DEADLINE = __ENV.DEADLINE || config.timeout || '10s';
const STREAMING = (config.tags || {}).rpc === 'server-streaming';
function configMetadata() {
  const own = config.metadata || {};
  if (!config['metadata-file']) {
    return own;
  }
  try {
    return Object.assign({}, own, JSON.parse(open(resolve(config['metadata-file']))));
  } catch (err) {
    return own; // not written yet: API_KEY, or no key at all (the gateway then says how to get one)
  }
}

// A direct run sends no key: replicas take the gateway's word for who is calling.
const METADATA = TLS
  ? config.metadata || {}
  : Object.assign(configMetadata(), API_KEY_METADATA);

export const options = {
  vus: Number(__ENV.VUS || config.concurrency || 1),
  duration: __ENV.DURATION || config.duration || '10s',
  thresholds: {
    checks: ['rate==1.0'],
  },
};

const client = new grpc.Client();

function unary() {
  const response = client.invoke(METHOD, REQUEST, { timeout: DEADLINE, metadata: METADATA });
  check(response, {
    'status is OK': (r) => r && r.status === grpc.StatusOK,
  });
  reportFailure(`${METHOD} at ${TARGET}`, response);
}

function serverStream() {
  const stream = new grpc.Stream(client, METHOD, { timeout: DEADLINE, metadata: METADATA });
  let messages = 0;
  stream.on('data', () => {
    messages += 1;
  });
  stream.on('error', (err) => {
    check(err, { 'status is OK': () => false });
    console.error(`${METHOD}: ${err.code} ${err.message}`);
  });
  stream.on('end', () => {
    check(messages, { 'stream ended with messages': (n) => n > 0 });
  });
  stream.write(REQUEST);
  stream.end();
}

export default function () {
  try {
    if (__ITER === 0) {
      // One connection per VU, reused for all its iterations.
      connect(client, TARGET);
    }
    if (STREAMING) {
      serverStream();
    } else {
      unary();
    }
  } catch (err) {
    // Unreachable target, a method the target does not serve, a request reflection rejects: a failed check, so
    // the run fails instead of passing with no checks at all.
    check(err, { 'call was made': () => false });
    console.error(`${METHOD} at ${TARGET}: ${err}`);
  }
}

export function teardown() {
  client.close();
}
