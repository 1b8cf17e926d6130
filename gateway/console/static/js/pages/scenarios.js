// The Scenarios section: a gallery of ready tasks (#/scenarios), each with its own view (#/scenarios/<id>) where a
// form runs one call and shows the result and the same call as grpcurl, Python and curl. The tenant's own trained
// models get a tile each (#/scenarios/model/<name>).
import { el, showError } from "../ui.js";
import { chat } from "../scenarios/chat.js";
import { customModels, customModelView, isVision } from "../scenarios/custom.js";
import { synthesize, transcribe } from "../scenarios/audio.js";
import { embeddings, entities, sentiment, zeroShot } from "../scenarios/text.js";
import { classify, faces, readText } from "../scenarios/vision.js";

export const SCENARIOS = [
  {
    id: "sentiment",
    title: "How do customers feel?",
    blurb: "Positive, negative or neutral, with a score, for each review or message.",
    uses: "NlpService/Sentiment · vader",
    view: sentiment,
  },
  {
    id: "entities",
    title: "Find people, places and companies",
    blurb: "Highlights the names, places, organisations and dates in a text.",
    uses: "NlpService/Entities · spaCy",
    view: entities,
  },
  {
    id: "embeddings",
    title: "Group similar texts",
    blurb: "A map of your texts where similar meanings sit close together.",
    uses: "NlpService/Embed · MiniLM",
    view: embeddings,
  },
  {
    id: "zero-shot",
    title: "Sort texts into my labels",
    blurb: "Your own labels, no training: each text goes under the label that fits best.",
    uses: "NlpService/Classify · zero-shot",
    view: zeroShot,
  },
  {
    id: "photo",
    title: "What is in this photo?",
    blurb: "Names what a photo shows, from 1,000 everyday things and animals.",
    uses: "VisionService/Classify · EfficientNet",
    view: classify,
  },
  {
    id: "faces",
    title: "Find faces",
    blurb: "Draws a box around every face in a photo and counts them.",
    uses: "VisionService/DetectFaces · MTCNN",
    view: faces,
  },
  {
    id: "ocr",
    title: "Read the text in a photo",
    blurb: "Reads the lines of text in a photo, scan or screenshot (OCR).",
    uses: "VisionService/ReadText · PP-OCR",
    view: readText,
  },
  {
    id: "transcribe",
    title: "Transcribe a recording",
    blurb: "Writes down what is said in an audio file or a microphone recording.",
    uses: "SpeechService/Transcribe · Whisper",
    view: transcribe,
  },
  {
    id: "speak",
    title: "Read this aloud",
    blurb: "Turns text into speech, playing while it is made; download the WAV.",
    uses: "SpeechService/Synthesize · streamed",
    view: synthesize,
  },
  {
    id: "chat",
    title: "Chat",
    blurb: "Talk with a small language model; the reply streams in word by word.",
    uses: "LlmService/Chat · streamed",
    view: chat,
  },
];

function tile(href, title, blurb, uses, extra) {
  return el(
    "a",
    { class: `tile${extra ? ` ${extra}` : ""}`, href },
    el("h2", {}, title),
    el("p", {}, blurb),
    el("span", { class: "tag" }, uses),
  );
}

function gallery(root) {
  const controller = new AbortController();
  const mine = el("div", { class: "grid custom-models", "aria-live": "polite" });
  const mineSection = el(
    "section",
    { class: "my-models", "aria-labelledby": "my-models-title" },
    el("h2", { id: "my-models-title" }, "Your trained models"),
    mine,
  );
  root.append(
    el("h1", {}, "Scenarios"),
    el("p", { class: "lead" }, "Ready-made tasks on the mesh's models: pick one, try it on your own input, then copy the same call for your code."),
    el(
      "nav",
      { "aria-label": "Scenarios" },
      el(
        "ul",
        { class: "grid gallery" },
        SCENARIOS.map((s) => el("li", {}, tile(`#/scenarios/${s.id}`, s.title, s.blurb, s.uses))),
      ),
    ),
    mineSection,
  );
  mineSection.hidden = true;
  customModels(controller.signal)
    .then((models) => {
      if (!models.length) return;
      mine.replaceChildren(
        ...models.map((m) =>
          tile(
            `#/scenarios/model/${encodeURIComponent(m.name)}`,
            `Classify with ${m.name}`,
            m.description || (isVision(m) ? "Your image classifier." : "Your text classifier."),
            isVision(m) ? `VisionService/Classify · ${m.name}` : `NlpService/Classify · ${m.name}`,
            "custom",
          ),
        ),
      );
      mineSection.hidden = false;
    })
    .catch((error) => {
      if (error.name === "AbortError") return;
      mineSection.hidden = false;
      showError(mineSection, error);
    });
  return () => controller.abort();
}

export const page = {
  async render(root, { args }) {
    const [id, ...rest] = args || [];
    if (!id) return gallery(root);
    if (id === "model" && rest.length) {
      const view = await customModelView(root, decodeURIComponent(rest.join("/")));
      return () => view.scope.close();
    }
    const scenario = SCENARIOS.find((s) => s.id === id);
    if (!scenario) {
      root.append(
        el("p", { class: "crumbs" }, el("a", { href: "#/scenarios" }, "← All scenarios")),
        el("h1", {}, "No such scenario"),
        el("p", { class: "error", role: "alert" }, `There is no scenario "${id}".`),
      );
      return null;
    }
    const view = scenario.view(root);
    return () => view.scope.close();
  },
};
