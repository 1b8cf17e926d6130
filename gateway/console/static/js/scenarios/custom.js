// The tenant's own trained models (ModelService/ListModels: those with an owner): a "Classify with <name>" view each,
// NlpService/Classify for a text model (its own labels) or VisionService/Classify for an image model.
import { hasScope, rpc } from "../api.js";
import { el, field } from "../ui.js";
import { invalid, lines, scenarioView } from "./common.js";
import { classificationTable } from "./text.js";
import { classify as classifyPhoto } from "./vision.js";

// The caller's own models, or [] for a key that cannot see them (no models:train scope).
export async function customModels(signal) {
  if (!hasScope("models:train")) return [];
  const reply = await rpc("ModelService", "ListModels", {}, { signal });
  return reply.models.filter((m) => m.owner || m.custom);
}

export function isVision(model) {
  return model.modality === "MODALITY_VISION" || (model.services || []).includes("aimass.v1.VisionService");
}

function textModel(root, model) {
  const area = el("textarea", { name: "texts", rows: "6" }, "");
  return scenarioView(root, {
    title: `Classify with ${model.name}`,
    what: `Sorts texts into the labels your model ${model.name} was trained on. One text per line.`,
    uses: `NlpService/Classify · ${model.name} (your model)`,
    controls: [field("Texts, one per line", area)],
    async run(ctx) {
      const texts = lines(area.value);
      if (!texts.length) throw invalid("Write at least one text (one per line).");
      const body = { model: { name: model.name }, texts };
      const reply = await rpc("NlpService", "Classify", body, { signal: ctx.signal });
      ctx.show(classificationTable(texts, reply));
      ctx.samples("NlpService", "Classify", body, { path: "/v1/aimass/classify", body: { model: model.name, input: texts } });
    },
  });
}

// The view for the model named `name` (looked up, so a stale link says so plainly).
export async function customModelView(root, name) {
  const found = (await customModels()).find((m) => m.name === name);
  if (!found) throw invalid(`You have no model named "${name}" (or this key cannot use trained models).`);
  return isVision(found) ? classifyPhoto(root, { model: found }) : textModel(root, found);
}
