// Keys: the tenant's API keys (every tenant's with tenants:admin): list, create (the key shown once, never kept),
// revoke; the tenant's limits (changed by tenants:admin only); the audit log (audit:read).
import { hasScope, rpc, session } from "../api.js";
import { el, field, showError, table, toast } from "../ui.js";
import { busy, clearError, enumText, when } from "../lifecycle/common.js";

const ALL_SCOPES = ["infer", "models:train", "models:admin", "keys:admin", "audit:read", "tenants:admin"];
const SCOPE_HINTS = {
  infer: "call models and the catalogue",
  "models:train": "datasets, training, own models",
  "models:admin": "load and unload models",
  "keys:admin": "manage the tenant's keys",
  "audit:read": "read the tenant's audit log",
  "tenants:admin": "every tenant (operator)",
};
const EXPIRY = [
  ["0", "Never"],
  ["3600", "1 hour"],
  ["86400", "1 day"],
  ["604800", "7 days"],
  ["2592000", "30 days"],
  ["7776000", "90 days"],
];
const PRIORITIES = ["PRIORITY_UNSPECIFIED", "PRIORITY_LOW", "PRIORITY_NORMAL", "PRIORITY_HIGH", "PRIORITY_CRITICAL"];

export const page = {
  async render(root) {
    const controller = new AbortController();
    const signal = controller.signal;
    const me = session.whoami;
    const operator = hasScope("tenants:admin");
    const grantable = operator ? ALL_SCOPES : ALL_SCOPES.filter((s) => me.scopes.includes(s));

    // ---------- Create ----------
    const tenant = el("input", { type: "text", value: me.tenant_id, readonly: !operator, spellcheck: "false", autocomplete: "off", list: operator ? "tenant-list" : undefined });
    const tenantList = el("datalist", { id: "tenant-list" });
    const name = el("input", { type: "text", placeholder: "ci, alice's laptop", autocomplete: "off" });
    const expiry = el("select", {}, EXPIRY.map(([v, t]) => el("option", { value: v }, t)));
    const scopeBoxes = grantable.map((scope) => {
      const box = el("input", { type: "checkbox", value: scope, id: `scope-${scope.replace(":", "-")}`, checked: scope === "infer" });
      return { scope, box };
    });
    const scopes = el(
      "fieldset",
      { class: "scopes" },
      el("legend", {}, "Scopes"),
      scopeBoxes.map(({ scope, box }) => el("div", { class: "scope-check" }, box, el("label", { for: box.id }, scope, el("span", { class: "hint" }, ` – ${SCOPE_HINTS[scope]}`)))),
    );
    const create = el("button", { type: "submit" }, "Create key");
    const secretBox = el("div", { class: "secret-box", "aria-live": "polite" });
    const createForm = el(
      "form",
      { class: "card", "aria-labelledby": "create-heading" },
      el("h2", { id: "create-heading" }, "Create a key"),
      el(
        "div",
        { class: "form-grid" },
        field("Tenant", tenant, operator ? "Any tenant (created on first use)." : "Your own tenant."),
        field("Name", name, "A label for people."),
        field("Expires", expiry),
      ),
      tenantList,
      scopes,
      el("p", { class: "hint" }, "A key can grant only scopes its creator holds."),
      el("div", { class: "row" }, create),
      secretBox,
    );
    createForm.addEventListener("submit", async (event) => {
      event.preventDefault();
      clearError(createForm);
      const chosen = scopeBoxes.filter(({ box }) => box.checked).map(({ scope }) => scope);
      if (!chosen.length) {
        showError(createForm, "Choose at least one scope.");
        return;
      }
      await busy(create, createForm, async () => {
        const answer = await rpc("AdminService", "CreateKey", {
          tenant_id: tenant.value.trim() === me.tenant_id ? "" : tenant.value.trim(),
          scopes: chosen,
          name: name.value.trim(),
          expires_in_seconds: expiry.value,
        });
        showSecret(answer);
        name.value = "";
        await refreshKeys();
      });
    });

    // The key itself: in this box only, until the page is left or the box is closed; never stored.
    function showSecret(answer) {
      const code = el("code", { class: "secret", "data-testid": "new-key" }, answer.secret);
      const copy = el("button", { type: "button" }, "Copy");
      const done = el("button", { type: "button", class: "quiet" }, "I have saved it");
      copy.addEventListener("click", async () => {
        try {
          await navigator.clipboard.writeText(answer.secret);
          toast("Copied the key");
        } catch (_) {
          const range = document.createRange();
          range.selectNodeContents(code);
          const selection = window.getSelection();
          selection.removeAllRanges();
          selection.addRange(range);
          toast("Selected: press Ctrl+C (or ⌘C) to copy");
        }
      });
      done.addEventListener("click", () => {
        secretBox.replaceChildren();
        create.focus();
      });
      secretBox.replaceChildren(
        el(
          "div",
          { class: "secret-card", role: "alert" },
          el("h3", {}, `New key ${answer.key.key_id} for ${answer.key.tenant_id}`),
          el("p", { class: "warning" }, "Copy it now: it is shown this once and cannot be shown again (the mesh keeps only its hash)."),
          el("div", { class: "row" }, code, copy, done),
          el("p", { class: "hint" }, `Scopes: ${answer.key.scopes.join(", ")} · expires ${answer.key.expires_unix_ms !== "0" ? when(answer.key.expires_unix_ms) : "never"}`),
        ),
      );
      copy.focus();
    }

    // ---------- List and revoke ----------
    const listTenant = el("select", {}, el("option", { value: "" }, `${me.tenant_id} (yours)`), operator ? el("option", { value: "*" }, "Every tenant") : null);
    const keysBox = el("div", { class: "table-scroll" });
    const keysCard = el(
      "section",
      { class: "card", "aria-labelledby": "keys-heading" },
      el("h2", { id: "keys-heading" }, "Keys"),
      el("div", { class: "row align-end" }, operator ? field("Show keys of", listTenant) : null, el("button", { type: "button", class: "quiet", onclick: () => refreshKeys() }, "Refresh")),
      keysBox,
    );
    listTenant.addEventListener("change", () => refreshKeys());

    async function refreshKeys() {
      clearError(keysCard);
      try {
        const { keys } = await rpc("AdminService", "ListKeys", { tenant_id: listTenant.value }, { signal });
        keysBox.replaceChildren(
          table(
            ["Key id", "Tenant", "Name", "Scopes", "Created", "Expires", "State", "Created by", ""],
            keys.map((k) => [
              el("code", {}, k.key_id),
              k.tenant_id,
              k.name || "–",
              k.scopes.join(", "),
              when(k.created_unix_ms),
              k.expires_unix_ms !== "0" ? when(k.expires_unix_ms) : "never",
              el("span", { class: `state state-${k.state}`, "data-key-state": k.key_id }, k.state),
              k.created_by || "aimass up",
              k.state === "active" && k.key_id !== me.key_id
                ? el("button", { type: "button", class: "danger", "aria-label": `Revoke key ${k.key_id}`, onclick: (e) => revoke(e.currentTarget, k) }, "Revoke")
                : k.key_id === me.key_id
                  ? el("span", { class: "hint" }, "this key")
                  : "",
            ]),
            `${keys.length} key(s)`,
          ),
        );
      } catch (error) {
        if (error.name !== "AbortError") showError(keysCard, error);
      }
    }

    async function revoke(button, key) {
      if (!window.confirm(`Revoke key ${key.key_id}${key.name ? ` (${key.name})` : ""} of ${key.tenant_id}? Calls with it are refused from now on.`)) return;
      await busy(button, keysCard, async () => {
        await rpc("AdminService", "RevokeKey", { key_id: key.key_id });
        toast(`Revoked ${key.key_id}`);
        await refreshKeys();
      });
    }

    // ---------- Tenant limits ----------
    const limitsTenant = el("input", { type: "text", value: me.tenant_id, readonly: !operator, spellcheck: "false", autocomplete: "off", list: operator ? "tenant-list" : undefined });
    const inputs = {
      requests_per_second: el("input", { type: "number", min: "0", step: "any" }),
      max_concurrent: el("input", { type: "number", min: "0", step: "1" }),
      llm_tokens_per_minute: el("input", { type: "number", min: "0", step: "1" }),
      llm_tokens_per_day: el("input", { type: "number", min: "0", step: "1" }),
      max_priority: el("select", {}, PRIORITIES.map((p) => el("option", { value: p }, p === "PRIORITY_UNSPECIFIED" ? "default" : enumText(p, "PRIORITY_")))),
      weight: el("input", { type: "number", min: "0", step: "any" }),
    };
    if (!operator) Object.values(inputs).forEach((input) => (input.disabled = true));
    const effective = el("p", { class: "hint", "data-testid": "effective-limits" });
    const save = el("button", { type: "submit", hidden: !operator }, "Save limits");
    const load = el("button", { type: "button", class: "quiet" }, "Show");
    const limitsForm = el(
      "form",
      { class: "card", "aria-labelledby": "limits-heading" },
      el("h2", { id: "limits-heading" }, "Tenant limits"),
      el("p", { class: "hint" }, operator ? "0 means unlimited (for max priority and weight: the configured default)." : "Set by the mesh's operator (tenants:admin); 0 means unlimited."),
      el("div", { class: "row align-end" }, field("Tenant", limitsTenant), load),
      el(
        "div",
        { class: "form-grid" },
        field("Requests per second", inputs.requests_per_second),
        field("Max concurrent requests", inputs.max_concurrent),
        field("LLM tokens per minute", inputs.llm_tokens_per_minute),
        field("LLM tokens per day", inputs.llm_tokens_per_day),
        field("Max priority", inputs.max_priority),
        field("Fair-share weight", inputs.weight),
      ),
      effective,
      el("div", { class: "row" }, save),
    );
    function showTenant(t) {
      const l = t.limits || {};
      for (const [key, input] of Object.entries(inputs)) input.value = key === "max_priority" ? l.max_priority || "PRIORITY_UNSPECIFIED" : String(l[key] ?? 0);
      const e = t.effective || {};
      const lim = (v) => (Number(v) ? String(v) : "unlimited");
      effective.textContent = `In effect for ${t.tenant_id}: ${lim(e.requests_per_second)} requests/s, ${lim(e.max_concurrent)} concurrent, ${lim(e.llm_tokens_per_minute)} LLM tokens/min, ${lim(e.llm_tokens_per_day)} LLM tokens/day, max priority ${enumText(e.max_priority, "PRIORITY_")}, weight ${e.weight}.`;
    }
    async function loadTenant() {
      clearError(limitsForm);
      const id = limitsTenant.value.trim();
      await busy(load, limitsForm, async () => {
        const { tenant: t } = await rpc("AdminService", "GetTenant", { tenant_id: id === me.tenant_id ? "" : id }, { signal });
        showTenant(t);
      });
    }
    load.addEventListener("click", loadTenant);
    limitsForm.addEventListener("submit", async (event) => {
      event.preventDefault();
      clearError(limitsForm);
      await busy(save, limitsForm, async () => {
        const body = { tenant_id: limitsTenant.value.trim() };
        for (const [key, input] of Object.entries(inputs)) {
          if (key === "max_priority") body[key] = input.value;
          else if (input.value !== "") body[key] = ["max_concurrent"].includes(key) ? Number(input.value) : key.startsWith("llm_") ? String(Math.trunc(Number(input.value))) : Number(input.value);
        }
        const { tenant: t } = await rpc("AdminService", "SetTenant", body);
        showTenant(t);
        toast(`Saved ${t.tenant_id}'s limits`);
      });
    });

    // ---------- Audit ----------
    let auditCard = null;
    const auditBox = el("div", { class: "table-scroll" });
    const prefix = el("input", { type: "text", placeholder: "keys. or auth.refused", spellcheck: "false", autocomplete: "off" });
    const auditTenant = el("select", {}, el("option", { value: "" }, `${me.tenant_id} (yours)`), operator ? el("option", { value: "*" }, "Every tenant") : null);
    const auditLimit = el("input", { type: "number", min: "1", max: "10000", value: "100" });
    const refreshAudit = async () => {
      clearError(auditCard);
      try {
        const { events } = await rpc("AdminService", "ListAuditEvents", { action_prefix: prefix.value.trim(), tenant_id: auditTenant.value, limit: Number(auditLimit.value) || 100 }, { signal });
        auditBox.replaceChildren(
          events.length
            ? table(
                ["When", "Action", "Outcome", "Tenant", "Key", "Target", "Detail", "Peer", "Count"],
                events.map((e) => [when(e.at_unix_ms), e.action, el("span", { class: e.outcome === "ok" ? "ok" : "error" }, e.outcome), e.tenant_id, e.key_id, e.target, e.detail, e.peer, String(e.count || 1)]),
                `${events.length} event(s), newest first`,
              )
            : el("p", { class: "hint" }, "No event matches."),
        );
      } catch (error) {
        if (error.name !== "AbortError") showError(auditCard, error);
      }
    };
    if (hasScope("audit:read")) {
      const filter = el("button", { type: "submit" }, "Filter");
      auditCard = el(
        "form",
        { class: "card", "aria-labelledby": "audit-heading" },
        el("h2", { id: "audit-heading" }, "Audit log"),
        el("div", { class: "row align-end" }, field("Action prefix", prefix), operator ? field("Tenant", auditTenant) : null, field("At most", auditLimit), filter),
        auditBox,
      );
      auditCard.addEventListener("submit", (event) => {
        event.preventDefault();
        busy(filter, auditCard, refreshAudit);
      });
    } else {
      auditCard = el("section", { class: "card" }, el("h2", {}, "Audit log"), el("p", { class: "hint" }, "Reading the audit log needs the audit:read scope."));
    }

    root.append(el("h1", {}, "Keys"), createForm, keysCard, limitsForm, auditCard);
    const tasks = [refreshKeys(), loadTenant()];
    if (hasScope("audit:read")) tasks.push(refreshAudit());
    if (operator) {
      tasks.push(
        rpc("AdminService", "ListTenants", {}, { signal })
          .then(({ tenants }) => tenantList.replaceChildren(...tenants.map((t) => el("option", { value: t.tenant_id }))))
          .catch(() => {}),
      );
    }
    await Promise.all(tasks);
    return () => controller.abort();
  },
};
