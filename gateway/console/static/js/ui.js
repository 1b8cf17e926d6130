// Small DOM helpers shared by the pages, and the code samples each result shows (grpcurl, Python, curl).
import { session } from "./api.js";

// el("button", {class: "x", onclick: fn}, "text", child...): an element; attributes starting with "on" are listeners.
export function el(tag, attrs, ...children) {
  const node = document.createElement(tag);
  for (const [name, value] of Object.entries(attrs || {})) {
    if (value === undefined || value === null || value === false) continue;
    if (name.startsWith("on") && typeof value === "function") node.addEventListener(name.slice(2), value);
    else if (name === "class") node.className = value;
    else if (name === "text") node.textContent = value;
    else node.setAttribute(name, value === true ? "" : value);
  }
  for (const child of children.flat()) {
    if (child === undefined || child === null || child === false) continue;
    node.append(child instanceof Node ? child : document.createTextNode(String(child)));
  }
  return node;
}

let fieldCount = 0;
// A labelled form control: field("Texts", el("textarea", {...})) -> <div class="field"><label for=...>...
export function field(label, control, hint) {
  if (!control.id) control.id = `field-${++fieldCount}`;
  return el(
    "div",
    { class: "field" },
    el("label", { for: control.id }, label),
    control,
    hint ? el("p", { class: "hint" }, hint) : null,
  );
}

export function toast(message, kind = "info") {
  const box = el("div", { class: `toast ${kind}` }, message);
  document.getElementById("toasts").append(box);
  setTimeout(() => box.remove(), 6000);
}

// An error where the user looks: a role=alert paragraph in `where` (replacing the previous one).
export function showError(where, error) {
  where.querySelectorAll(":scope > .error").forEach((node) => node.remove());
  const text = error && error.message ? error.message : String(error);
  const code = error && error.code ? ` (${error.code})` : "";
  const node = el("p", { class: "error", role: "alert" }, text + code);
  where.prepend(node);
  return node;
}

export function bytes(n) {
  const value = Number(n || 0);
  if (value >= 1 << 30) return `${(value / (1 << 30)).toFixed(1)} GiB`;
  if (value >= 1 << 20) return `${(value / (1 << 20)).toFixed(1)} MiB`;
  if (value >= 1 << 10) return `${(value / (1 << 10)).toFixed(1)} KiB`;
  return `${value} B`;
}

export function table(columns, rows, caption) {
  return el(
    "table",
    {},
    caption ? el("caption", {}, caption) : null,
    el("thead", {}, el("tr", {}, columns.map((c) => el("th", { scope: "col" }, c)))),
    el(
      "tbody",
      {},
      rows.map((row) => el("tr", {}, row.map((cell) => el("td", {}, cell)))),
    ),
  );
}

function snake(name) {
  return name.replace(/([a-z0-9])([A-Z])/g, "$1_$2").toLowerCase();
}

const GROUPS = {
  AdminService: "admin",
  DatasetService: "datasets",
  DeploymentService: "deployments",
  LlmService: "llm",
  ModelService: "models",
  NlpService: "nlp",
  SpeechService: "speech",
  TrainingService: "training",
  VisionService: "vision",
  ClusterService: "cluster",
};

function shorten(body) {
  // Long base64 payloads (images, audio) would drown the sample: shown cut, with a note.
  return JSON.stringify(
    body,
    (key, value) => (typeof value === "string" && value.length > 120 ? `${value.slice(0, 40)}…(${value.length} chars)` : value),
    2,
  );
}

// The same call as grpcurl, Python (aimass.client) and curl commands. `rest` (optional): {path, body, multipart}
// for the OpenAI-compatible REST route doing the same, else curl calls the console's own JSON API.
export function samples(service, method, body, rest) {
  const info = session.info || { gateway: "127.0.0.1:50051", rest: "http://127.0.0.1:8000/v1" };
  const json = shorten(body);
  const meta = session.services && session.services.get(`${service}/${method}`);
  const streaming = meta && meta.server_streaming;
  const grpcurl =
    `grpcurl -plaintext -H "authorization: Bearer $AIMASS_KEY" \\\n  -d '${json}' \\\n  ${info.gateway} aimass.v1.${service}/${method}`;
  const module = meta ? meta.python_module : "aimass.v1.xxx_pb2";
  const type = meta ? meta.request.split(".").pop() : `${method}Request`;
  const call = `client.${GROUPS[service] || snake(service)}.${snake(method)}(request)`;
  const python = [
    "import json, os",
    "from google.protobuf import json_format",
    "from aimass.client import Client",
    `from ${module.split(".").slice(0, -1).join(".")} import ${module.split(".").pop()}`,
    "",
    `client = Client("${info.gateway}", api_key=os.environ["AIMASS_KEY"])`,
    `request = json_format.ParseDict(json.loads('''${json}'''), ${module.split(".").pop()}.${type}())`,
    streaming ? `for reply in ${call}:\n    print(reply)` : `print(${call})`,
  ].join("\n");
  let curl;
  if (rest && info.rest) {
    const base = info.rest.replace(/\/v1$/, "");
    curl = rest.multipart
      ? `curl ${base}${rest.path} \\\n  -H "authorization: Bearer $AIMASS_KEY" \\\n  ${rest.multipart}`
      : `curl ${base}${rest.path} \\\n  -H "authorization: Bearer $AIMASS_KEY" -H "content-type: application/json" \\\n  -d '${shorten(rest.body)}'`;
  } else {
    const kind = streaming ? "stream" : "rpc";
    curl = `curl ${location.origin}/api/${kind}/${service}/${method} \\\n  -H "authorization: Bearer $AIMASS_KEY" -H "content-type: application/json" \\\n  -d '${json}'`;
  }
  return { grpcurl, python, curl };
}

// A <details> with the three samples, for under a result.
export function samplesPanel(service, method, body, rest) {
  const all = samples(service, method, body, rest);
  return el(
    "details",
    { class: "samples" },
    el("summary", {}, "The same call from your code: grpcurl, Python, curl"),
    ...Object.entries(all).map(([name, text]) =>
      el("div", { class: "sample" }, el("h4", {}, name), el("pre", {}, el("code", { "data-sample": name }, text))),
    ),
  );
}
