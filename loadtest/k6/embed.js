// k6 scenario: aimass.v1.NlpService/Embed through the gateway, one short sentence per request.
// Uses server reflection (the gateway serves it), so no .proto files are needed.
//
//   k6 run -e TARGET=127.0.0.1:50051 loadtest/k6/embed.js
//   k6 run --vus 4 --iterations 40 -e TARGET=127.0.0.1:50051 loadtest/k6/embed.js
//
// Bounded: at most ITERATIONS calls (default 200) and MAX_DURATION (default 60s), whichever comes first;
// --vus/--iterations/--duration on the command line override both. A failed status check fails the run.
import grpc from 'k6/net/grpc';
import { check } from 'k6';

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
    client.connect(TARGET, { plaintext: true, reflect: true, timeout: '10s' });
  }
  const response = client.invoke(
    'aimass.v1.NlpService/Embed',
    { texts: [TEXT], normalize: true },
    { timeout: DEADLINE },
  );
  check(response, {
    'status is OK': (r) => r && r.status === grpc.StatusOK,
    'one 384-d embedding': (r) =>
      r && r.message && r.message.embeddings.length === 1 && r.message.embeddings[0].values.length === 384,
  });
}

export function teardown() {
  client.close();
}
