// Cluster: the mesh live (ClusterService.WatchCluster): each device's memory and utilisation over the last ~60
// snapshots, replicas with their models' state and queues, each service's traffic, and tenants' usage against their
// limits. The stream is cancelled when the page is left; it reconnects after the gateway ends it (its deadline).
import { stream } from "../api.js";
import { bytes, el, showError, table } from "../ui.js";
import { History, lineChart } from "../linechart.js";
import { bar, clearError, enumText, number } from "../lifecycle/common.js";

const INTERVAL_MS = 2000;
const SAMPLES = 60;

function deviceLabel(device) {
  const info = device.info || {};
  const kind = enumText(info.kind, "DEVICE_KIND_").toUpperCase() || "?";
  return `${device.device_id}${info.name ? ` · ${info.name}` : ""}${kind === "GPU" ? "" : ` (${kind})`}`;
}

export const page = {
  async render(root) {
    const controller = new AbortController();
    const history = new History(SAMPLES);
    const charts = new Map(); // device_id -> {card, chart, figures}
    const status = el("p", { class: "hint", "data-testid": "cluster-status", "aria-live": "polite" }, "Connecting…");
    const devicesBox = el("div", { class: "device-grid" });
    const replicasBox = el("div", { class: "table-scroll" });
    const servicesBox = el("div", { class: "table-scroll" });
    const tenantsBox = el("div", {});
    const head = el("section", { class: "card" }, status);
    root.append(
      el("h1", {}, "Cluster"),
      head,
      el("section", { class: "card", "aria-labelledby": "devices-heading" }, el("h2", { id: "devices-heading" }, "Devices"), devicesBox),
      el("section", { class: "card", "aria-labelledby": "replicas-heading" }, el("h2", { id: "replicas-heading" }, "Replicas"), replicasBox),
      el("section", { class: "card", "aria-labelledby": "services-heading" }, el("h2", { id: "services-heading" }, "Services"), servicesBox),
      el("section", { class: "card", "aria-labelledby": "tenants-heading" }, el("h2", { id: "tenants-heading" }, "Tenants: usage against limits"), tenantsBox),
    );

    function showDevices(cluster) {
      const seen = new Set();
      const t = Number(cluster.generated_unix_ms) / 1000;
      for (const node of cluster.nodes) {
        for (const device of node.devices) {
          const info = device.info || {};
          const total = Number(info.memory_total_bytes || 0);
          const used = Number(info.memory_used_bytes || 0);
          const samples = history.push(device.device_id, { t, memory: total ? (used / total) * 100 : 0, util: Number(info.utilization_percent || 0) });
          seen.add(device.device_id);
          let entry = charts.get(device.device_id);
          if (!entry) {
            const chart = lineChart({ title: `${device.device_id}: memory and utilisation, %`, xLabel: "seconds", yMin: 0, yMax: 100, format: (v) => `${v.toFixed(0)}%`, height: 170 });
            const figures = el("p", { class: "device-figures", "data-testid": "device-memory" });
            const title = el("h3", {});
            const card = el("article", { class: "device-card subcard", "data-device": device.device_id }, title, figures, chart.node);
            entry = { card, chart, figures, title };
            charts.set(device.device_id, entry);
            devicesBox.append(card);
          }
          entry.title.textContent = deviceLabel(device);
          const extra = [
            `memory ${bytes(used)} of ${bytes(total)} used (${total ? ((used / total) * 100).toFixed(0) : 0} %)`,
            `utilisation ${Number(info.utilization_percent || 0).toFixed(0)} %`,
            Number(info.temperature_celsius) ? `${Number(info.temperature_celsius).toFixed(0)} °C` : "",
            Number(info.power_watts) ? `${Number(info.power_watts).toFixed(0)} W` : "",
            node.node_id ? `node ${node.node_id}` : "",
          ].filter(Boolean);
          entry.figures.textContent = extra.join(" · ");
          const t0 = samples[0].t;
          entry.chart.update([
            { name: "memory used %", points: samples.map((s) => [s.t - t0, s.memory]) },
            { name: "utilisation %", points: samples.map((s) => [s.t - t0, s.util]) },
          ]);
          if (device.processes && device.processes.length) {
            const list = entry.card.querySelector(".processes") || el("div", { class: "processes" });
            list.replaceChildren(table(["Process", "Replica", "Memory"], device.processes.map((p) => [p.process_name || (Number(p.pid) ? `pid ${p.pid}` : "–"), p.instance_id || "foreign", bytes(p.used_bytes)]), "Processes on the device"));
            entry.card.append(list);
          }
        }
      }
      for (const [id, entry] of charts) {
        if (!seen.has(id)) {
          entry.card.remove();
          charts.delete(id);
        }
      }
      if (!charts.size) devicesBox.replaceChildren(el("p", { class: "hint" }, "No node has reported its devices yet."));
      else devicesBox.querySelectorAll(":scope > p.hint").forEach((n) => n.remove());
    }

    function showReplicas(cluster) {
      if (!cluster.replicas.length) {
        replicasBox.replaceChildren(el("p", { class: "hint" }, "No replica reports its load."));
        return;
      }
      const rows = [];
      for (const r of cluster.replicas) {
        const models = r.models.length ? r.models : [null];
        models.forEach((m, i) => {
          rows.push([
            i === 0 ? el("strong", {}, r.instance_id) : "",
            i === 0 ? enumText(r.state, "SERVING_STATE_") : "",
            i === 0 ? r.node_id : "",
            m ? `${m.model.name}${m.model.version ? ` v${m.model.version}` : ""}` : "–",
            m ? (m.loaded ? el("span", { class: "ok" }, "loaded") : "not loaded") : "",
            m ? m.device_id : "",
            m ? bytes(m.memory_bytes) : "",
            m ? `${m.queue_depth} / ${m.queue_capacity}` : "",
            m ? String(m.in_flight) : "",
            m ? Number(m.requests_per_second).toFixed(2) : "",
          ]);
        });
      }
      replicasBox.replaceChildren(
        table(["Replica", "State", "Node", "Model", "Loaded", "Device", "Memory", "Queue", "In flight", "Requests/s"], rows, `${cluster.replicas.length} replica(s) and their models`),
      );
    }

    function showServices(cluster) {
      servicesBox.replaceChildren(
        table(
          ["Service", "Requests/s", "Errors/s", "p50 ms", "p99 ms", "In flight", "Healthy replicas"],
          cluster.services.map((s) => [
            s.service.replace(/^aimass\.v1\./, ""),
            Number(s.requests_per_second).toFixed(2),
            Number(s.errors_per_second).toFixed(2),
            Number(s.p50_latency_ms).toFixed(1),
            Number(s.p99_latency_ms).toFixed(1),
            String(s.in_flight),
            String(s.healthy_replicas),
          ]),
          `Traffic over the last ${Math.round(Number(cluster.traffic_window_seconds))} s at this gateway`,
        ),
      );
    }

    function showTenants(cluster) {
      const gateways = Math.max(1, Number(cluster.gateways || 1));
      tenantsBox.replaceChildren(
        ...cluster.tenants.map((t) => {
          const l = t.limits || {};
          return el(
            "article",
            { class: "subcard tenant-usage", "data-tenant": t.tenant_id },
            el("h3", {}, t.tenant_id),
            bar("Requests/s", t.requests_per_second, Number(l.requests_per_second) / gateways, (n) => number(n, 2)),
            bar("In flight", t.in_flight, Math.floor(Number(l.max_concurrent) / gateways)),
            bar("LLM tokens this minute", t.llm_tokens_last_minute, l.llm_tokens_per_minute),
            bar("LLM tokens today", t.llm_tokens_today, l.llm_tokens_per_day),
            el("p", { class: "hint" }, `Max priority ${enumText(l.max_priority, "PRIORITY_")} · weight ${number(l.weight, 2)}` + (gateways > 1 ? ` · rates shown per gateway (${gateways} gateways)` : "")),
          );
        }),
      );
      if (!cluster.tenants.length) tenantsBox.replaceChildren(el("p", { class: "hint" }, "No tenant to show."));
    }

    function show({ cluster }) {
      if (!head.isConnected) {
        // The page was replaced without its cleanup being called: stop watching.
        controller.abort();
        return;
      }
      clearError(head);
      status.textContent =
        `Live · snapshot at ${new Date(Number(cluster.generated_unix_ms)).toLocaleTimeString()} · ${cluster.gateways} gateway(s)` +
        (cluster.stale ? ` · STALE: the scheduler's view is from ${new Date(Number(cluster.view_generated_unix_ms)).toLocaleTimeString()}` : "");
      status.classList.toggle("error", Boolean(cluster.stale));
      showDevices(cluster);
      showReplicas(cluster);
      showServices(cluster);
      showTenants(cluster);
    }

    // Watch until the page is left; reconnect (after a pause) when the gateway ends the stream or it fails.
    (async () => {
      let failures = 0;
      while (!controller.signal.aborted) {
        try {
          await stream("ClusterService", "WatchCluster", { interval_ms: INTERVAL_MS }, (m) => {
            failures = 0;
            show(m);
          }, { signal: controller.signal });
        } catch (error) {
          if (controller.signal.aborted || error.name === "AbortError") return;
          failures += 1;
          showError(head, error);
          status.textContent = "Disconnected; trying again…";
        }
        if (controller.signal.aborted) return;
        await new Promise((resolve) => setTimeout(resolve, Math.min(30000, 1000 * 2 ** failures)));
      }
    })();
    return () => controller.abort();
  },
};
