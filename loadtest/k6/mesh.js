// What the k6 scripts here share: paths from the repository root, the connection (mesh mTLS straight to a replica,
// or plaintext to the gateway's front door), the API key, and why calls fail, said once per VU.
import { sleep } from 'k6';
import grpc from 'k6/net/grpc';

// These scripts live in loadtest/k6/; k6 resolves open()'s relative paths from the script's folder.
const ROOT = '../../';

export function resolve(path) {
  return path.startsWith('/') ? path : ROOT + path;
}

// Mesh mTLS (a direct run) when a certificate is given; plaintext (the gateway's front door) otherwise.
export const TLS = __ENV.CERT
  ? { cacerts: [open(resolve(__ENV.CACERT))], cert: open(resolve(__ENV.CERT)), key: open(resolve(__ENV.CERT_KEY)) }
  : null;

// The gateway's key from API_KEY (none when unset: the gateway then says how to get one).
export const API_KEY_METADATA = __ENV.API_KEY ? { authorization: `Bearer ${__ENV.API_KEY}` } : {};

// k6 registers the message types reflection finds in one process-wide registry, and two VUs registering the same
// type at once panic ("proto: message ... is already registered", grafana/k6#3961; it took down 1 in 2 runs of a
// 2-VU test once the gateway's reflection grew). VU 1 reflects first; the others wait a moment, then find every
// type already registered and register nothing.
const REFLECT_STAGGER_S = 1;

export function connect(client, target) {
  if (__VU > 1) {
    sleep(REFLECT_STAGGER_S);
  }
  const params = { reflect: true, timeout: '10s' };
  if (TLS) {
    params.tls = TLS;
  } else {
    params.plaintext = true;
  }
  client.connect(target, params);
}

let reported = false;

// Once per VU: why calls fail (a missing or unknown key says how to get one).
export function reportFailure(what, response) {
  if (response && response.status !== grpc.StatusOK && !reported) {
    reported = true;
    console.error(`${what}: ${response.status} ${response.error && response.error.message}`);
  }
}
