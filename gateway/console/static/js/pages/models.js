// Models: the catalogue (the mesh's models and the tenant's own), each model's replicas and where they are loaded
// (device, memory, state), and, for keys with models:admin only, loading and unloading.
import { hasScope, rpc } from "../api.js";
import { bytes, el, showError, table, toast } from "../ui.js";
import { busy, clearError, enumText } from "../lifecycle/common.js";

function device(info) {
  if (!info || !info.kind || info.kind === "DEVICE_KIND_UNSPECIFIED") return "–";
  const kind = enumText(info.kind, "DEVICE_KIND_").toUpperCase();
  const name = info.name ? ` (${info.name})` : "";
  return kind === "CPU" ? `CPU${name}` : `GPU ${info.index}${name}`;
}

export const page = {
  async render(root, { args }) {
    const controller = new AbortController();
    const admin = hasScope("models:admin");
    const listBox = el("div", { class: "table-scroll" });
    const listCard = el(
      "section",
      { class: "card", "aria-labelledby": "catalogue-heading" },
      el("div", { class: "row spread" }, el("h2", { id: "catalogue-heading" }, "Catalogue"), el("button", { type: "button", class: "quiet", onclick: () => refresh() }, "Refresh")),
      listBox,
    );
    const detail = el("section", { class: "card", "aria-labelledby": "model-heading", hidden: true });

    async function refresh() {
      clearError(listCard);
      try {
        const [all, loaded] = await Promise.all([
          rpc("ModelService", "ListModels", {}, { signal: controller.signal }),
          rpc("ModelService", "ListModels", { loaded_only: true }, { signal: controller.signal }),
        ]);
        const warm = new Set(loaded.models.map((m) => m.name));
        listBox.replaceChildren(
          table(
            ["Model", "Modality", "Versions", "Default version", "Loaded", "Owner", "Methods"],
            all.models.map((m) => [
              el("a", { href: `#/models/${encodeURIComponent(m.name)}`, "data-model": m.name }, m.name),
              enumText(m.modality, "MODALITY_"),
              m.versions.map((v) => v.version).join(", "),
              m.default_version || "–",
              warm.has(m.name) ? el("span", { class: "ok" }, "yes") : "no",
              m.owner || "the mesh",
              m.methods.map((x) => x.split(".").pop()).join(", "),
            ]),
            "Every model the mesh knows (and your own)",
          ),
        );
      } catch (error) {
        if (error.name !== "AbortError") showError(listCard, error);
      }
    }

    async function describe(name) {
      detail.hidden = false;
      detail.replaceChildren(el("h2", { id: "model-heading" }, name), el("p", { class: "hint" }, "Loading…"));
      try {
        const { model } = await rpc("ModelService", "DescribeModel", { model: { name } }, { signal: controller.signal });
        renderDetail(model);
      } catch (error) {
        if (error.name === "AbortError") return;
        detail.replaceChildren(el("h2", { id: "model-heading" }, name));
        showError(detail, error);
      }
    }

    function renderDetail(m) {
      const parts = [
        el("h2", { id: "model-heading" }, m.name),
        m.description ? el("p", {}, m.description) : null,
        table(
          ["Version", "Footprint", "Measured on", "Context length"],
          m.versions.map((v) => [
            v.version + (v.version === m.default_version ? " (default)" : ""),
            bytes(v.footprint_bytes),
            v.footprint_measured ? enumText(v.footprint_device_kind, "DEVICE_KIND_").toUpperCase() : "estimated",
            v.context_length ? String(v.context_length) : "–",
          ]),
          "Versions",
        ),
      ];
      if (m.custom && m.custom.name) {
        const d = m.custom.deployment || {};
        parts.push(
          el("p", {}, `Your own model (${m.owner}); default version ${d.default_version || "none"}` + (d.canary_version ? `, canary version ${d.canary_version} at ${d.canary_percent} %` : "") + ". Every replica of its service serves it once deployed: manage it on the ", el("a", { href: "#/train" }, "Train"), " page."),
        );
      }
      const replicas = m.replicas || [];
      const columns = ["Replica", "Node", "Version", "Device", "Memory", "State", "Loaded"];
      if (admin) columns.push("");
      parts.push(
        replicas.length
          ? el(
              "div",
              { class: "table-scroll" },
              table(
                columns,
                replicas.map((r) => {
                  const row = [
                    r.instance_id,
                    r.node_id,
                    r.version,
                    device(r.device),
                    `${bytes(r.memory_bytes)}` + (Number(r.device && r.device.memory_total_bytes) ? ` (device: ${bytes(r.device.memory_used_bytes)} of ${bytes(r.device.memory_total_bytes)} used)` : ""),
                    enumText(r.state, "SERVING_STATE_"),
                    r.loaded ? el("span", { class: "ok" }, "loaded") : "not loaded",
                  ];
                  if (admin) {
                    row.push(
                      r.loaded
                        ? el("button", { type: "button", class: "quiet admin-action", "aria-label": `Unload ${m.name} from ${r.instance_id}`, onclick: (e) => unload(e.currentTarget, m.name, { instance_id: r.instance_id }) }, "Unload here")
                        : el("button", { type: "button", class: "quiet admin-action", "aria-label": `Load ${m.name} on ${r.instance_id}`, onclick: (e) => load(e.currentTarget, m.name, { instance_id: r.instance_id }) }, "Load here"),
                    );
                  }
                  return row;
                }),
                "Where it is loaded",
              ),
            )
          : el("p", { class: "hint" }, m.owner ? "Served by every replica of its service once deployed." : "Not loaded on any replica."),
      );
      if (admin && !m.owner) {
        const loadAny = el("button", { type: "button", class: "admin-action" }, "Load (the scheduler places it)");
        const unloadAll = el("button", { type: "button", class: "danger admin-action" }, "Unload everywhere");
        loadAny.addEventListener("click", () => load(loadAny, m.name, {}));
        unloadAll.addEventListener("click", () => unload(unloadAll, m.name, {}));
        parts.push(el("div", { class: "row" }, loadAny, unloadAll));
      }
      detail.replaceChildren(...parts.filter(Boolean));
    }

    async function load(button, name, target) {
      await busy(button, detail, async () => {
        button.textContent = "Loading…";
        const answer = await rpc("ModelService", "LoadModel", { model: { name }, target });
        const r = answer.replica;
        toast(answer.already_loaded ? `${name} was already loaded on ${r.instance_id}` : `${name} loaded on ${r.instance_id} (${device(r.device)})` + (answer.evicted.length ? `; evicted ${answer.evicted.map((e) => e.name).join(", ")}` : ""));
        await Promise.all([describe(name), refresh()]);
      });
    }

    async function unload(button, name, target) {
      const where = target.instance_id ? `from ${target.instance_id}` : "from every replica";
      if (!window.confirm(`Unload ${name} ${where}? Requests for it then wait for a load.`)) return;
      await busy(button, detail, async () => {
        button.textContent = "Unloading…";
        const answer = await rpc("ModelService", "UnloadModel", { model: { name }, target });
        toast(`${name} unloaded from ${answer.unloaded.length} replica(s), ${bytes(answer.freed_bytes)} freed`);
        await Promise.all([describe(name), refresh()]);
      });
    }

    root.append(
      ...[
        el("h1", {}, "Models"),
        admin ? null : el("p", { class: "hint" }, "Loading and unloading models needs the models:admin scope."),
        listCard,
        detail,
      ].filter(Boolean),
    );
    const tasks = [refresh()];
    if (args && args[0]) tasks.push(describe(decodeURIComponent(args[0])));
    await Promise.all(tasks);
    return () => controller.abort();
  },
};
