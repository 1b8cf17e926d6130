// The text scenarios (NlpService): sentiment, entities, the embedding map and zero-shot labels.
import { rpc } from "../api.js";
import { cosine, pca2, scatter } from "../charts.js";
import { el, field, table } from "../ui.js";
import { invalid, lines, percent, scenarioView, scoreBar } from "./common.js";

function textsArea(value, rows = 6) {
  return el("textarea", { name: "texts", rows: String(rows), spellcheck: "false" }, value);
}

function needTexts(area, most = 64) {
  const texts = lines(area.value);
  if (!texts.length) throw invalid("Write at least one text (one per line).");
  if (texts.length > most) throw invalid(`At most ${most} texts at once (there are ${texts.length}).`);
  return texts;
}

export function sentiment(root) {
  const area = textsArea(
    "I love this, it works perfectly!\nThe delivery was late and the box was damaged.\nIt arrived on Tuesday.",
  );
  return scenarioView(root, {
    title: "How do customers feel?",
    what: "Paste reviews, messages or comments, one per line: each gets a feeling (positive, negative or neutral) and a score from -1 to 1.",
    uses: "NlpService/Sentiment · vader",
    controls: [field("Texts, one per line", area)],
    async run(ctx) {
      const body = { texts: needTexts(area) };
      const reply = await rpc("NlpService", "Sentiment", body, { signal: ctx.signal });
      const rows = reply.results.map((r, i) => [
        body.texts[i],
        el("span", { class: `sentiment sentiment-${r.label}` }, r.label),
        el("span", { class: "score" }, Number(r.compound).toFixed(3)),
      ]);
      ctx.show(table(["Text", "Feeling", "Score (-1 … 1)"], rows, `Sentiment by ${reply.model.name}`));
      ctx.samples("NlpService", "Sentiment", body, { path: "/v1/aimass/sentiment", body: { input: body.texts } });
    },
  });
}

// The text with its entities marked (offsets are code points, as Python counts them).
function highlighted(text, entities) {
  const chars = Array.from(text);
  const out = [];
  let at = 0;
  for (const e of [...entities].sort((a, b) => a.start_char - b.start_char)) {
    if (e.start_char < at) continue;
    out.push(chars.slice(at, e.start_char).join(""));
    out.push(
      el(
        "mark",
        { class: `entity entity-${e.label}`, title: e.label },
        chars.slice(e.start_char, e.end_char).join(""),
        el("span", { class: "entity-label" }, e.label),
      ),
    );
    at = e.end_char;
  }
  out.push(chars.slice(at).join(""));
  return el("p", { class: "entities-text" }, ...out);
}

export function entities(root) {
  const area = textsArea(
    "Barack Obama visited Paris with executives from Apple and Airbus in June 2015.\nAngela Merkel spoke in Berlin.",
    4,
  );
  return scenarioView(root, {
    title: "Find people, places and companies",
    what: "Marks the names in your text: people, places, organisations, dates, amounts. One text per line.",
    uses: "NlpService/Entities · en_core_web_sm (spaCy)",
    controls: [field("Texts, one per line", area)],
    async run(ctx) {
      const body = { texts: needTexts(area) };
      const reply = await rpc("NlpService", "Entities", body, { signal: ctx.signal });
      const rows = [];
      const marked = reply.documents.map((doc, i) => {
        for (const e of doc.entities) rows.push([e.text, e.label, `${i + 1}`, `${e.start_char}–${e.end_char}`]);
        return highlighted(body.texts[i], doc.entities);
      });
      ctx.show(
        el("div", { class: "entities" }, marked),
        rows.length
          ? table(["Entity", "Type", "Line", "Characters"], rows, `${rows.length} entities found by ${reply.model.name}`)
          : el("p", {}, "No entities found."),
      );
      ctx.samples("NlpService", "Entities", body, { path: "/v1/aimass/entities", body: { input: body.texts } });
    },
  });
}

export function embeddings(root) {
  const area = textsArea(
    [
      "The cat sat on the mat.",
      "A kitten is sleeping on the rug.",
      "Dogs love playing fetch in the park.",
      "The stock market fell sharply today.",
      "Shares dropped as investors sold.",
      "Interest rates will rise next month.",
    ].join("\n"),
    7,
  );
  return scenarioView(root, {
    title: "Group similar texts",
    what: "Turns each text into a vector of meaning and draws them on a map: texts that mean similar things land close together. The map is a projection of the vectors (PCA) computed in your browser.",
    uses: "NlpService/Embed · all-MiniLM-L6-v2 (normalized)",
    controls: [field("Texts, one per line (2 or more)", area)],
    async run(ctx) {
      const body = { texts: needTexts(area), normalize: true };
      if (body.texts.length < 2) throw invalid("Give at least two texts to compare.");
      const reply = await rpc("NlpService", "Embed", body, { signal: ctx.signal });
      const vectors = reply.embeddings.map((e) => e.values);
      const map = scatter(pca2(vectors), body.texts, { title: "Texts by meaning (2-D projection)" });
      const nearest = vectors.map((v, i) => {
        let best = -1;
        let score = -Infinity;
        vectors.forEach((w, j) => {
          if (j === i) return;
          const s = cosine(v, w);
          if (s > score) [best, score] = [j, s];
        });
        return [body.texts[i], body.texts[best], score.toFixed(3)];
      });
      ctx.show(
        el("p", {}, `${vectors.length} texts as ${reply.dimensions}-dimensional vectors, drawn in 2-D:`),
        map,
        table(["Text", "Most similar text", "Cosine similarity"], nearest, "Nearest neighbours"),
      );
      ctx.samples("NlpService", "Embed", body, {
        path: "/v1/embeddings",
        body: { model: reply.model.name || "all-MiniLM-L6-v2", input: body.texts },
      });
    },
  });
}

export function zeroShot(root) {
  const area = textsArea(
    "Book me a flight to Rome\nMy invoice shows the wrong amount\nThe app crashes when I open settings",
    4,
  );
  const labels = el("input", { type: "text", name: "labels", value: "travel, billing, bug report" });
  const multi = el("input", { type: "checkbox", name: "multi_label" });
  return scenarioView(root, {
    title: "Sort texts into my labels",
    what: "Give your own labels (no training needed): each text is scored against every label and sorted under the best one.",
    uses: "NlpService/Classify (zero-shot) · all-MiniLM-L6-v2",
    controls: [
      field("Texts, one per line", area),
      field("Labels, separated by commas", labels, "For example: travel, billing, bug report"),
      el("div", { class: "check" }, multi, el("label", { for: (multi.id = "zs-multi") }, "A text may fit several labels (score each on its own)")),
    ],
    async run(ctx) {
      const names = labels.value
        .split(",")
        .map((l) => l.trim())
        .filter(Boolean);
      if (names.length < 2 && !multi.checked) throw invalid("Give at least two labels, separated by commas.");
      const body = { texts: needTexts(area), labels: names, multi_label: multi.checked };
      const reply = await rpc("NlpService", "Classify", body, { signal: ctx.signal });
      ctx.show(classificationTable(body.texts, reply));
      ctx.samples("NlpService", "Classify", body, {
        path: "/v1/aimass/classify",
        body: { input: body.texts, labels: names, multi_label: body.multi_label },
      });
    },
  });
}

// Texts with their best label and every score (shared with the custom text models).
export function classificationTable(texts, reply) {
  const rows = reply.results.map((r, i) => {
    const scores = [...r.scores].sort((a, b) => b.score - a.score);
    const best = scores[0] || { label: "", score: 0 };
    return [
      texts[i],
      el("strong", { class: "best-label" }, best.label),
      el(
        "ul",
        { class: "scores" },
        scores.map((s) => el("li", {}, el("span", { class: "score-name" }, s.label), scoreBar(s.score, s.label), percent(s.score))),
      ),
    ];
  });
  return table(["Text", "Label", "Scores"], rows, `Labels by ${reply.model.name}`);
}
