// What every scenario view shares: the frame (title, what it does, which model and method, the form, a Run button,
// a live result region, the code samples of the last call), input helpers (lines, files as base64) and teardown.
import { el, samplesPanel, showError } from "../ui.js";

// "a\n\n b \n" -> ["a", "b"]: one text per non-empty line.
export function lines(text) {
  return text
    .split("\n")
    .map((line) => line.trim())
    .filter(Boolean);
}

// An ArrayBuffer (or Uint8Array) as base64, in slices (String.fromCharCode has an argument limit).
export function toBase64(buffer) {
  const data = buffer instanceof Uint8Array ? buffer : new Uint8Array(buffer);
  let binary = "";
  for (let i = 0; i < data.length; i += 0x8000) binary += String.fromCharCode(...data.subarray(i, i + 0x8000));
  return btoa(binary);
}

export function fromBase64(text) {
  const binary = atob(text || "");
  const out = new Uint8Array(binary.length);
  for (let i = 0; i < binary.length; i++) out[i] = binary.charCodeAt(i);
  return out;
}

export function percent(score) {
  return `${(Number(score || 0) * 100).toFixed(1)}%`;
}

// A horizontal bar for a 0..1 score (a <meter>: accessible, styled in console.css).
export function scoreBar(score, label) {
  return el("meter", { min: "0", max: "1", value: String(Math.max(0, Math.min(1, Number(score || 0)))), "aria-label": label || "score" });
}

// Things a view holds that must be released when the user leaves: abort controllers, object URLs, media streams,
// audio contexts. `scope.signal()` gives a fresh AbortSignal (aborting the previous run's).
export class Scope {
  constructor() {
    this.urls = [];
    this.closers = [];
    this.controller = null;
  }

  signal() {
    if (this.controller) this.controller.abort();
    this.controller = new AbortController();
    return this.controller.signal;
  }

  url(blob) {
    const url = URL.createObjectURL(blob);
    this.urls.push(url);
    return url;
  }

  onClose(fn) {
    this.closers.push(fn);
  }

  close() {
    if (this.controller) this.controller.abort();
    for (const fn of this.closers.splice(0)) {
      try {
        fn();
      } catch (_) {
        /* keep releasing the rest */
      }
    }
    for (const url of this.urls.splice(0)) URL.revokeObjectURL(url);
  }
}

// The view of one scenario. spec: {title, what, uses ("NlpService/Sentiment · vader"), controls: [nodes],
// runLabel, extraButtons: [nodes], run: async (ctx) => void}. ctx: {result (the live region), signal, scope,
// show(...nodes) (replaces the result), samples(service, method, body, rest) (the code under the result)}.
// Returns {form, result, run (calls spec.run as the Run button does), runButton, scope}.
export function scenarioView(root, spec) {
  const scope = new Scope();
  const result = el("div", { class: "result-body" });
  const region = el(
    "section",
    { class: "card scenario-result", "aria-live": "polite", "aria-label": "Result", "data-state": "idle" },
    el("h2", {}, "Result"),
    result,
  );
  const samplesSlot = el("div", { class: "samples-slot" });
  const runButton = el("button", { type: "submit", class: "run" }, spec.runLabel || "Run");
  const form = el(
    "form",
    { class: "card scenario-form", novalidate: true },
    ...spec.controls,
    el("div", { class: "row" }, runButton, ...(spec.extraButtons || [])),
  );
  result.append(el("p", { class: "hint" }, spec.idle || "Fill in the form and press Run."));

  const ctx = {
    result,
    scope,
    signal: null,
    show(...nodes) {
      result.replaceChildren(...nodes.flat().filter(Boolean));
    },
    samples(service, method, body, rest) {
      samplesSlot.replaceChildren(samplesPanel(service, method, body, rest));
    },
    busy(on) {
      runButton.disabled = on;
      region.setAttribute("aria-busy", on ? "true" : "false");
    },
  };

  async function run() {
    if (runButton.disabled) return;
    ctx.signal = scope.signal();
    ctx.busy(true);
    region.dataset.state = "running";
    result.querySelectorAll(":scope > .error").forEach((node) => node.remove());
    if (!spec.keepResult) result.replaceChildren(el("p", { class: "hint working" }, "Working…"));
    try {
      await spec.run(ctx);
      region.dataset.state = "done";
    } catch (error) {
      if (error && error.name === "AbortError" && spec.onAbort) {
        spec.onAbort(ctx);
        region.dataset.state = "stopped";
      } else {
        result.querySelectorAll(":scope > .working").forEach((node) => node.remove());
        showError(result, error && error.name === "AbortError" ? new Error("Stopped.") : error);
        region.dataset.state = "error";
      }
    } finally {
      ctx.busy(false);
    }
  }

  form.addEventListener("submit", (event) => {
    event.preventDefault();
    run();
  });

  root.append(
    el("p", { class: "crumbs" }, el("a", { href: "#/scenarios" }, "← All scenarios")),
    el("h1", {}, spec.title),
    el("p", { class: "lead" }, spec.what),
    el("p", {}, el("span", { class: "tag" }, spec.uses)),
    el("div", { class: "scenario" }, form, el("div", { class: "scenario-out" }, region, samplesSlot)),
  );
  return { form, result, region, run, runButton, scope, ctx };
}

// A user-facing input problem (shown like a refused call).
export function invalid(message) {
  const error = new Error(message);
  error.code = "invalid_input";
  return error;
}

// An image file input whose choice is previewed in a .media-stage (the photo the results draw over).
// onPick(stage) is called when a file is chosen. Returns {input, stage, img, file()}.
export function imagePicker(scope, onPick) {
  const input = el("input", { type: "file", accept: "image/jpeg,image/png,image/webp", name: "image" });
  const img = el("img", { alt: "" });
  const stage = el("div", { class: "media-stage" }, img);
  input.addEventListener("change", () => {
    const file = input.files && input.files[0];
    if (!file) return;
    stage.querySelectorAll("canvas.overlay").forEach((node) => node.remove());
    img.src = scope.url(file);
    img.alt = `The chosen photo: ${file.name}`;
    if (onPick) onPick(stage);
  });
  return {
    input,
    stage,
    img,
    file() {
      return input.files && input.files[0];
    },
  };
}

// Resolves once the <img> has its pixels (or at once when it already has them).
export function loaded(img) {
  if (img.complete && img.naturalWidth) return Promise.resolve();
  return new Promise((resolve) => {
    img.addEventListener("load", resolve, { once: true });
    img.addEventListener("error", resolve, { once: true });
  });
}

// The image as VisionService's Image message ({data: base64, mime_type}).
export async function imageMessage(file) {
  if (!file) throw invalid("Choose a photo first (JPEG, PNG or WebP).");
  return { data: toBase64(await file.arrayBuffer()), mime_type: file.type || "" };
}

// A canvas over the shown image, in the image's own pixels (CSS scales it with the image).
export function overlay(stage, width, height) {
  stage.querySelectorAll("canvas.overlay").forEach((node) => node.remove());
  const canvas = el("canvas", { class: "overlay", "aria-hidden": "true" });
  canvas.width = Math.max(1, Math.round(width));
  canvas.height = Math.max(1, Math.round(height));
  stage.append(canvas);
  const g = canvas.getContext("2d");
  g.lineWidth = Math.max(2, Math.round(Math.max(width, height) / 250));
  g.font = `${Math.max(12, Math.round(Math.max(width, height) / 40))}px system-ui, sans-serif`;
  return { canvas, g };
}
