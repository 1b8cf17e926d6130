// The console's calls: the signed-in key in the Authorization header of every call (never in a URL), the JSON API of
// gateway/console (/api/rpc, /api/stream, /api/datasets/upload, /api/export), errors as ApiError.

const KEY_SLOT = "aimass.key";

export class ApiError extends Error {
  constructor(status, message, code) {
    super(message);
    this.status = status;
    this.code = code || "";
  }
}

export const session = {
  key: sessionStorage.getItem(KEY_SLOT) || "",
  whoami: null, // {tenant_id, key_id, scopes: [...]}
  info: null, // {version, gateway, rest}
  services: null, // Map "Service/Method" -> {service, method, request, response, python_module, ...}
};

export function setKey(key) {
  session.key = key;
  if (key) sessionStorage.setItem(KEY_SLOT, key);
  else sessionStorage.removeItem(KEY_SLOT);
}

export function hasScope(scope) {
  const scopes = session.whoami ? session.whoami.scopes : [];
  return scopes.includes(scope) || scopes.includes("tenants:admin");
}

function headers(extra) {
  const out = { ...(extra || {}) };
  if (session.key) out.authorization = `Bearer ${session.key}`;
  return out;
}

async function failure(response) {
  let message = `${response.status} ${response.statusText}`;
  let code = "";
  try {
    const body = await response.json();
    if (body && body.error) {
      message = body.error.message || message;
      code = body.error.code || "";
    }
  } catch (_) {
    /* not JSON: keep the status line */
  }
  return new ApiError(response.status, message, code);
}

// A unary RPC: "NlpService", "Sentiment", {texts: [...]} -> the response message as JSON (proto field names).
export async function rpc(service, method, body, { signal } = {}) {
  const response = await fetch(`/api/rpc/${service}/${method}`, {
    method: "POST",
    headers: headers({ "content-type": "application/json" }),
    body: JSON.stringify(body || {}),
    signal,
  });
  if (!response.ok) throw await failure(response);
  return response.json();
}

// A server stream: calls onMessage(message) for each message; resolves when the stream ends; aborting `signal`
// cancels the call on the gateway. Rejects with ApiError on a refusal or an error mid-stream.
export async function stream(service, method, body, onMessage, { signal } = {}) {
  const response = await fetch(`/api/stream/${service}/${method}`, {
    method: "POST",
    headers: headers({ "content-type": "application/json", accept: "text/event-stream" }),
    body: JSON.stringify(body || {}),
    signal,
  });
  if (!response.ok) throw await failure(response);
  const reader = response.body.pipeThrough(new TextDecoderStream()).getReader();
  let buffer = "";
  for (;;) {
    const { value, done } = await reader.read();
    if (done) return;
    buffer += value;
    let cut;
    while ((cut = buffer.indexOf("\n\n")) >= 0) {
      const event = buffer.slice(0, cut);
      buffer = buffer.slice(cut + 2);
      const isError = event.split("\n").some((line) => line === "event: error");
      const data = event
        .split("\n")
        .filter((line) => line.startsWith("data: "))
        .map((line) => line.slice(6))
        .join("\n");
      if (!data) continue;
      if (data === "[DONE]") return;
      const message = JSON.parse(data);
      if (isError) {
        const error = message.error || {};
        throw new ApiError(0, error.message || "the stream failed", error.code);
      }
      onMessage(message);
    }
  }
}

// A dataset upload with progress: params {name, task, format, text_column, label_column}; onProgress(sent, total).
export function uploadDataset(file, params, onProgress) {
  const query = new URLSearchParams(Object.entries(params).filter(([, v]) => v));
  return new Promise((resolve, reject) => {
    const xhr = new XMLHttpRequest();
    xhr.open("POST", `/api/datasets/upload?${query}`);
    xhr.setRequestHeader("authorization", `Bearer ${session.key}`);
    xhr.setRequestHeader("content-type", "application/octet-stream");
    xhr.upload.onprogress = (event) => onProgress && onProgress(event.loaded, event.total || file.size);
    xhr.onload = () => {
      let body = null;
      try {
        body = JSON.parse(xhr.responseText);
      } catch (_) {
        /* keep null */
      }
      if (xhr.status >= 200 && xhr.status < 300) resolve(body);
      else reject(new ApiError(xhr.status, (body && body.error && body.error.message) || xhr.statusText));
    };
    xhr.onerror = () => reject(new ApiError(0, "the upload failed (network)"));
    xhr.send(file);
  });
}

// A download through the JSON API (the key in a header, so no plain link): saves the answer as a file.
export async function download(path, body, fallbackName) {
  const response = await fetch(path, {
    method: "POST",
    headers: headers({ "content-type": "application/json" }),
    body: JSON.stringify(body || {}),
  });
  if (!response.ok) throw await failure(response);
  const blob = await response.blob();
  const disposition = response.headers.get("content-disposition") || "";
  const match = /filename="?([^";]+)"?/.exec(disposition);
  const link = document.createElement("a");
  link.href = URL.createObjectURL(blob);
  link.download = match ? match[1] : fallbackName;
  document.body.append(link);
  link.click();
  link.remove();
  setTimeout(() => URL.revokeObjectURL(link.href), 10000);
  return blob.size;
}

// A plain GET of the console's own JSON (no key needed): /api/info, /api/services.
export async function getJson(path) {
  const response = await fetch(path, { headers: headers() });
  if (!response.ok) throw await failure(response);
  return response.json();
}
