// k6 scenario: aimass.v1.NlpService/Embed through the gateway, one short sentence per request.
// Uses server reflection (the gateway serves it), so no .proto files are needed.
//
//   k6 run -e TARGET=127.0.0.1:50051 -e API_KEY="$(cat ~/.local/state/aimass/admin.key)" loadtest/k6/embed.js
//   k6 run --vus 4 --iterations 40 -e TARGET=127.0.0.1:50051 -e API_KEY="$AIMASS_API_KEY" loadtest/k6/embed.js
//
// The gateway wants an API key on every call: API_KEY (an admin key, or a tenant's from `aimass keys create`).
// Straight to an NLP replica instead (gateway vs direct), as a gateway calls it: mesh mTLS with the mesh's CA and a
// gateway certificate (`aimass up` keeps them in its state directory's pki/; local processes' certificates name
// 127.0.0.1, the name k6 checks, as it cannot be told another), and no key:
//
//   PKI=~/.local/state/aimass/pki
//   k6 run -e TARGET=127.0.0.1:50061 -e CACERT="$PKI/ca.crt" -e CERT="$PKI/gateway.crt" \
//       -e CERT_KEY="$PKI/gateway.key" loadtest/k6/embed.js
//
// Bounded: at most ITERATIONS calls (default 200) and MAX_DURATION (default 60s), whichever comes first;
// --vus/--iterations/--duration on the command line override both. A failed status check fails the run.
import grpc from 'k6/net/grpc';
import { check } from 'k6';
import { API_KEY_METADATA, connect, reportFailure } from './mesh.js';

const TARGET = __ENV.TARGET || '127.0.0.1:50051';
const TEXT = __ENV.TEXT || 'The quick brown fox jumps over the lazy dog.';
const DEADLINE = __ENV.DEADLINE || '10s';

export const options = {
  vus: Number(__ENV.VUS || 4),
  iterations: Number(__ENV.ITERATIONS || 200),
  duration: __ENV.MAX_DURATION || '60s',
  thresholds: {
    checks: ['rate==1.0'],
  },
};

const client = new grpc.Client();

export default function () {
  if (__ITER === 0) {
    // One connection per VU, reused for all its iterations.
    connect(client, TARGET);
  }
  const response = client.invoke(
    'aimass.v1.NlpService/Embed',
    { texts: [TEXT], normalize: true },
    { timeout: DEADLINE, metadata: API_KEY_METADATA },
  );
  check(response, {
    'status is OK': (r) => r && r.status === grpc.StatusOK,
    'one 384-d embedding': (r) =>
      r && r.message && r.message.embeddings.length === 1 && r.message.embeddings[0].values.length === 384,
  });
  reportFailure(`Embed at ${TARGET}`, response);
}

export function teardown() {
  client.close();
}
