// The photo scenarios (VisionService): what is in it, faces, and text (OCR). The photo is sent as base64 in
// `images: [{data, mime_type}]`; boxes are drawn on a canvas over the photo in the image's own pixels.
import { rpc } from "../api.js";
import { el, field, table } from "../ui.js";
import { imageMessage, imagePicker, loaded, overlay, percent, scenarioView, scoreBar } from "./common.js";

function photoView(root, spec) {
  let view = null;
  const picker = imagePicker({ url: (blob) => view.scope.url(blob) }, (stage) =>
    view.ctx.show(stage, el("p", { class: "hint" }, "Press Run to send this photo.")),
  );
  view = scenarioView(root, {
    ...spec,
    idle: "Choose a photo, then press Run.",
    controls: [field("Photo (JPEG, PNG or WebP)", picker.input, spec.hint), ...(spec.controls || [])],
    run: (ctx) => spec.run(ctx, picker),
  });
  return view;
}

export function classify(root, { model } = {}) {
  const topK = el("input", { type: "number", name: "top_k", min: "1", max: "20", value: "5" });
  return photoView(root, {
    title: model ? `Classify with ${model.name}` : "What is in this photo?",
    what: model
      ? `Sorts a photo into the classes your model ${model.name} was trained on.`
      : "Names what a photo shows, from 1,000 everyday things, animals and objects (ImageNet), most likely first.",
    uses: `VisionService/Classify · ${model ? model.name : "efficientnet-lite0"}`,
    controls: [field("How many labels", topK)],
    async run(ctx, picker) {
      const body = { images: [await imageMessage(picker.file())], top_k: Number(topK.value) || 5 };
      if (model) body.model = { name: model.name };
      const reply = await rpc("VisionService", "Classify", body, { signal: ctx.signal });
      const result = reply.results[0];
      const rows = result.labels.map((l) => [l.label, el("span", {}, scoreBar(l.score, l.label), " ", percent(l.score))]);
      ctx.show(
        el(
          "div",
          { class: "photo-result" },
          picker.stage,
          el(
            "div",
            {},
            el("p", { class: "headline" }, result.labels.length ? `Most likely: ${result.labels[0].label}` : "No label."),
            table(["Label", "Probability"], rows, `${result.width} × ${result.height} px, by ${reply.model.name}`),
          ),
        ),
      );
      const form = `-F image=@photo.jpg -F top_k=${body.top_k}` + (model ? ` -F model=${model.name}` : "");
      ctx.samples("VisionService", "Classify", body, { path: "/v1/aimass/vision/classify", multipart: form });
    },
  });
}

export function faces(root) {
  return photoView(root, {
    title: "Find faces",
    what: "Finds the faces in a photo and draws a box around each, with how sure the model is.",
    uses: "VisionService/DetectFaces · mtcnn",
    async run(ctx, picker) {
      const body = { images: [await imageMessage(picker.file())] };
      const reply = await rpc("VisionService", "DetectFaces", body, { signal: ctx.signal });
      const result = reply.results[0];
      await loaded(picker.img);
      const { g } = overlay(picker.stage, result.width, result.height);
      result.faces.forEach((face, i) => {
        const b = face.box;
        g.strokeStyle = "#ffd400";
        g.strokeRect(b.x, b.y, b.width, b.height);
        g.fillStyle = "#ffd400";
        g.fillText(`${i + 1}`, b.x + 4, Math.max(b.y - 6, 14));
        g.fillStyle = "#ff4d4d";
        for (const mark of face.landmarks) g.fillRect(mark.point.x - 2, mark.point.y - 2, 5, 5);
      });
      const n = result.faces.length;
      ctx.show(
        el(
          "div",
          { class: "photo-result" },
          picker.stage,
          el(
            "div",
            {},
            el("p", { class: "headline face-count", "data-count": String(n) }, `${n} ${n === 1 ? "face" : "faces"} found`),
            n
              ? table(
                  ["#", "Box (x, y, width, height)", "Confidence"],
                  result.faces.map((f, i) => [
                    `${i + 1}`,
                    [f.box.x, f.box.y, f.box.width, f.box.height].map((v) => Math.round(v)).join(", "),
                    percent(f.score),
                  ]),
                  `By ${reply.model.name}`,
                )
              : null,
          ),
        ),
      );
      ctx.samples("VisionService", "DetectFaces", body, { path: "/v1/aimass/vision/faces", multipart: "-F image=@photo.jpg" });
    },
  });
}

export function readText(root) {
  return photoView(root, {
    title: "Read the text in a photo",
    what: "Finds lines of text in a photo, a scan or a screenshot, and reads them (OCR).",
    uses: "VisionService/ReadText · pp-ocr",
    async run(ctx, picker) {
      const body = { images: [await imageMessage(picker.file())] };
      const reply = await rpc("VisionService", "ReadText", body, { signal: ctx.signal });
      const result = reply.results[0];
      await loaded(picker.img);
      const { g } = overlay(picker.stage, result.width, result.height);
      g.strokeStyle = "#00c853";
      for (const line of result.lines) {
        const poly = line.polygon.length ? line.polygon : corners(line.box);
        g.beginPath();
        poly.forEach((p, i) => (i ? g.lineTo(p.x, p.y) : g.moveTo(p.x, p.y)));
        g.closePath();
        g.stroke();
      }
      ctx.show(
        el(
          "div",
          { class: "photo-result" },
          picker.stage,
          el(
            "div",
            {},
            result.lines.length
              ? el("pre", { class: "read-text" }, result.text)
              : el("p", { class: "headline" }, "No text found."),
            result.lines.length
              ? table(
                  ["Line", "Confidence"],
                  result.lines.map((l) => [l.text, percent(l.confidence)]),
                  `${result.lines.length} lines read by ${reply.model.name}`,
                )
              : null,
          ),
        ),
      );
      ctx.samples("VisionService", "ReadText", body, { path: "/v1/aimass/vision/ocr", multipart: "-F image=@photo.png" });
    },
  });
}

function corners(b) {
  return [
    { x: b.x, y: b.y },
    { x: b.x + b.width, y: b.y },
    { x: b.x + b.width, y: b.y + b.height },
    { x: b.x, y: b.y + b.height },
  ];
}
