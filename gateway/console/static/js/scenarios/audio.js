// The speech scenarios (SpeechService): transcribe a file or a microphone recording (encoded here as a 16-bit PCM
// WAV: the service reads WAV, FLAC and OGG, not MediaRecorder's WebM), and read text aloud as it streams (PCM16
// chunks scheduled on Web Audio as they arrive, and the whole kept as a WAV at the end).
import { rpc, stream } from "../api.js";
import { bytes, el, field, showError, table } from "../ui.js";
import { fromBase64, invalid, scenarioView, toBase64 } from "./common.js";

// Mono float samples (-1..1) as a 16-bit PCM WAV file.
export function wavFile(samples, rate) {
  const pcm = floatToPcm16(samples);
  return wavFromPcm(new Uint8Array(pcm.buffer), rate);
}

function floatToPcm16(samples) {
  const out = new Int16Array(samples.length);
  for (let i = 0; i < samples.length; i++) {
    const s = Math.max(-1, Math.min(1, samples[i]));
    out[i] = s < 0 ? s * 0x8000 : s * 0x7fff;
  }
  return out;
}

// Raw PCM16 little-endian mono bytes with a RIFF/WAVE header in front.
export function wavFromPcm(pcm, rate) {
  const header = new DataView(new ArrayBuffer(44));
  const text = (at, s) => [...s].forEach((c, i) => header.setUint8(at + i, c.charCodeAt(0)));
  text(0, "RIFF");
  header.setUint32(4, 36 + pcm.length, true);
  text(8, "WAVE");
  text(12, "fmt ");
  header.setUint32(16, 16, true);
  header.setUint16(20, 1, true); // PCM
  header.setUint16(22, 1, true); // mono
  header.setUint32(24, rate, true);
  header.setUint32(28, rate * 2, true);
  header.setUint16(32, 2, true);
  header.setUint16(34, 16, true);
  text(36, "data");
  header.setUint32(40, pcm.length, true);
  return new Blob([header.buffer, pcm], { type: "audio/wav" });
}

// The microphone, captured as float samples until stop(): {stop(): Promise<{blob, seconds}>, cancel()}.
async function startRecording() {
  if (!navigator.mediaDevices || !navigator.mediaDevices.getUserMedia) {
    throw invalid("This browser gives no microphone here (it needs https or 127.0.0.1).");
  }
  const media = await navigator.mediaDevices.getUserMedia({ audio: { channelCount: 1, echoCancellation: false } });
  let context;
  try {
    context = new AudioContext({ sampleRate: 16000 });
  } catch (_) {
    context = new AudioContext();
  }
  const chunks = [];
  let release;
  try {
    const source = context.createMediaStreamSource(media);
    if (context.audioWorklet) {
      await context.audioWorklet.addModule(new URL("./recorder-worklet.js", import.meta.url));
      const node = new AudioWorkletNode(context, "aimass-capture");
      node.port.onmessage = (event) => chunks.push(event.data);
      source.connect(node);
      release = () => node.disconnect();
    } else {
      throw invalid("This browser lacks AudioWorklet: upload a WAV file instead.");
    }
  } catch (error) {
    media.getTracks().forEach((t) => t.stop());
    context.close();
    throw error;
  }
  const cancel = () => {
    release();
    media.getTracks().forEach((t) => t.stop());
    if (context.state !== "closed") context.close();
  };
  return {
    started: performance.now(),
    cancel,
    async stop() {
      const rate = context.sampleRate;
      cancel();
      const length = chunks.reduce((n, c) => n + c.length, 0);
      const all = new Float32Array(length);
      let at = 0;
      for (const c of chunks) {
        all.set(c, at);
        at += c.length;
      }
      return { blob: wavFile(all, rate), seconds: length / rate };
    },
  };
}

export function transcribe(root) {
  const file = el("input", { type: "file", name: "audio", accept: "audio/wav,audio/x-wav,audio/flac,audio/ogg,.wav,.flac,.ogg" });
  const language = el(
    "select",
    { name: "language" },
    el("option", { value: "" }, "Detect it"),
    ...[
      ["en", "English"],
      ["de", "German"],
      ["fr", "French"],
      ["es", "Spanish"],
      ["it", "Italian"],
    ].map(([v, t]) => el("option", { value: v }, t)),
  );
  const record = el("button", { type: "button", class: "quiet record" }, "Record from the microphone");
  const status = el("p", { class: "hint rec-status", role: "status" });
  let chosen = null; // {blob, name}
  let recording = null;
  let timer = 0;
  let view = null;

  file.addEventListener("change", () => {
    const f = file.files && file.files[0];
    if (f) {
      chosen = { blob: f, name: f.name };
      status.textContent = `Chosen: ${f.name} (${bytes(f.size)}).`;
    }
  });

  async function toggleRecording() {
    if (recording) {
      const rec = recording;
      recording = null;
      clearInterval(timer);
      record.textContent = "Record from the microphone";
      record.classList.remove("recording");
      const { blob, seconds } = await rec.stop();
      chosen = { blob, name: "recording.wav" };
      status.textContent = `Recorded ${seconds.toFixed(1)} s (${bytes(blob.size)} WAV); sending it.`;
      view.run();
      return;
    }
    try {
      recording = await startRecording();
    } catch (error) {
      recording = null;
      view.ctx.show();
      showError(view.result, error);
      return;
    }
    record.textContent = "Stop and transcribe";
    record.classList.add("recording");
    const tick = () => {
      status.textContent = `Recording… ${((performance.now() - recording.started) / 1000).toFixed(0)} s`;
    };
    tick();
    timer = setInterval(tick, 500);
  }
  record.addEventListener("click", toggleRecording);

  view = scenarioView(root, {
    title: "Transcribe a recording",
    what: "Writes down what is said in a recording: upload an audio file (WAV, FLAC or OGG) or record from your microphone.",
    uses: "SpeechService/Transcribe · whisper-base",
    idle: "Choose a file and press Run, or record from the microphone.",
    controls: [field("Audio file (WAV, FLAC or OGG)", file), field("Spoken language", language), el("div", { class: "row" }, record), status],
    async run(ctx) {
      if (!chosen) throw invalid("Choose an audio file or record from the microphone first.");
      const audio = await chosen.blob.arrayBuffer();
      const body = { audio: toBase64(audio), language: language.value };
      const reply = await rpc("SpeechService", "Transcribe", body, { signal: ctx.signal });
      const player = el("audio", { controls: true, src: ctx.scope.url(chosen.blob), "aria-label": "The audio sent" });
      ctx.show(
        el("p", { class: "transcript", "data-done": "true" }, reply.text.trim() || "(no speech heard)"),
        el(
          "p",
          { class: "hint" },
          `${chosen.name}: ${Number(reply.duration_seconds).toFixed(1)} s, language ${reply.language} ` +
            `(${(Number(reply.language_probability) * 100).toFixed(0)}%), by ${reply.model.name}.`,
        ),
        player,
        reply.segments.length
          ? table(
              ["From", "To", "Text"],
              reply.segments.map((s) => [`${Number(s.start_seconds).toFixed(1)} s`, `${Number(s.end_seconds).toFixed(1)} s`, s.text]),
              "Segments",
            )
          : null,
      );
      const form = `-F file=@${chosen.name} -F model=whisper-base` + (body.language ? ` -F language=${body.language}` : "");
      ctx.samples("SpeechService", "Transcribe", body, { path: "/v1/audio/transcriptions", multipart: form });
    },
  });
  view.scope.onClose(() => {
    clearInterval(timer);
    if (recording) recording.cancel();
  });
  return view;
}

// Plays PCM16 chunks as they arrive: each becomes an AudioBuffer scheduled right after the previous one.
class StreamPlayer {
  constructor(context) {
    this.context = context;
    this.next = 0;
    this.carry = null; // an odd byte left over from the previous chunk
    this.sources = new Set();
  }

  push(data, rate) {
    let chunk = data;
    if (this.carry) {
      chunk = new Uint8Array(data.length + 1);
      chunk[0] = this.carry[0];
      chunk.set(data, 1);
      this.carry = null;
    }
    if (chunk.length % 2) {
      this.carry = chunk.slice(-1);
      chunk = chunk.subarray(0, chunk.length - 1);
    }
    const n = chunk.length / 2;
    if (!n) return;
    const view = new DataView(chunk.buffer, chunk.byteOffset, chunk.length);
    const buffer = this.context.createBuffer(1, n, rate);
    const out = buffer.getChannelData(0);
    for (let i = 0; i < n; i++) out[i] = view.getInt16(i * 2, true) / 0x8000;
    const source = this.context.createBufferSource();
    source.buffer = buffer;
    source.connect(this.context.destination);
    const at = Math.max(this.context.currentTime + 0.05, this.next);
    source.start(at);
    this.next = at + buffer.duration;
    this.sources.add(source);
    source.onended = () => this.sources.delete(source);
  }

  stop() {
    for (const s of this.sources) {
      try {
        s.stop();
      } catch (_) {
        /* already ended */
      }
    }
    this.sources.clear();
  }
}

export function synthesize(root) {
  const text = el(
    "textarea",
    { name: "text", rows: "4" },
    "Hello! This is the aimass mesh reading your text aloud, as it is being synthesized.",
  );
  const voice = el("select", { name: "voice" }, el("option", { value: "" }, "The default voice (flite)"));
  rpc("SpeechService", "ListVoices", { language: "en" })
    .then((reply) => {
      for (const v of reply.voices) {
        voice.append(el("option", { value: `${v.model.name}|${v.voice_id}` }, `${v.display_name} (${v.model.name})`));
      }
    })
    .catch(() => {
      /* the default voice still works; the list is a convenience */
    });
  let player = null;
  let context = null;
  const stop = el("button", { type: "button", class: "quiet", disabled: true }, "Stop");
  let view = null;
  stop.addEventListener("click", () => view.scope.controller && view.scope.controller.abort());

  view = scenarioView(root, {
    title: "Read this aloud",
    what: "Turns text into speech and plays it while it is still being made; the whole recording is yours to download at the end.",
    uses: "SpeechService/Synthesize (streamed) · flite, espeak-ng or kokoro",
    runLabel: "Read aloud",
    extraButtons: [stop],
    controls: [field("Text to read", text), field("Voice", voice)],
    onAbort(ctx) {
      if (player) player.stop();
      const status = ctx.result.querySelector(".tts-status");
      if (status) status.textContent = "Stopped.";
    },
    async run(ctx) {
      const words = text.value.trim();
      if (!words) throw invalid("Write something to read.");
      const [model, voiceId] = voice.value ? voice.value.split("|") : ["", ""];
      const body = { text: words, encoding: "AUDIO_ENCODING_PCM16" };
      if (model) body.model = { name: model };
      if (voiceId) body.voice = voiceId;
      // Made in the click's turn, so the browser lets it play.
      if (!context || context.state === "closed") context = new AudioContext();
      if (context.state === "suspended") context.resume();
      if (player) player.stop();
      player = new StreamPlayer(context);
      const status = el("p", { class: "tts-status", role: "status" }, "Waiting for the first audio…");
      const received = el("span", { class: "tts-bytes", "data-bytes": "0" }, "0 B");
      const chunksSeen = el("span", { class: "tts-chunks" }, "0");
      ctx.show(status, el("p", {}, "Received ", received, " in ", chunksSeen, " chunks."));
      const parts = [];
      let total = 0;
      let rate = 0;
      let chunks = 0;
      let end = null;
      stop.disabled = false;
      try {
        await stream(
          "SpeechService",
          "Synthesize",
          body,
          (message) => {
            if (message.audio) {
              const data = fromBase64(message.audio.data);
              rate = message.audio.sample_rate_hz || rate;
              parts.push(data);
              total += data.length;
              chunks += 1;
              player.push(data, rate);
              status.textContent = `Playing (${rate} Hz)…`;
              status.dataset.playing = "true";
              received.textContent = bytes(total);
              received.dataset.bytes = String(total);
              chunksSeen.textContent = String(chunks);
            } else if (message.end) {
              end = message.end;
            }
          },
          { signal: ctx.signal },
        );
      } finally {
        stop.disabled = true;
      }
      if (!total) throw new Error("The service sent no audio.");
      const pcm = new Uint8Array(total);
      let at = 0;
      for (const p of parts) {
        pcm.set(p, at);
        at += p.length;
      }
      const wav = wavFromPcm(pcm.subarray(0, pcm.length - (pcm.length % 2)), rate);
      const url = ctx.scope.url(wav);
      status.textContent = `Played ${end ? Number(end.duration_seconds).toFixed(1) : (total / 2 / rate).toFixed(1)} s of speech${end && end.model ? ` by ${end.model.name}` : ""}.`;
      ctx.result.append(
        el("audio", { controls: true, src: url, "aria-label": "The whole speech" }),
        el("p", {}, el("a", { href: url, download: "speech.wav", class: "download" }, `Download speech.wav (${bytes(wav.size)})`)),
      );
      ctx.samples("SpeechService", "Synthesize", body, {
        path: "/v1/audio/speech",
        body: { model: model || "flite", input: words, voice: voiceId, response_format: "wav" },
      });
    },
  });
  view.scope.onClose(() => {
    if (player) player.stop();
    if (context && context.state !== "closed") context.close();
  });
  return view;
}
