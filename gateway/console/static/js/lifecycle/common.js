// What the lifecycle pages (Data, Train, Models, Cluster, Keys) share: enum names made readable, times, bars,
// a dataset's validation report, a job's evaluation, and a button that shows it is busy while its call runs.
import { el, showError, table } from "../ui.js";

// "JOB_STATE_RUNNING" -> "running"; "TRAINING_TASK_TEXT_CLASSIFICATION" -> "text classification".
export function enumText(value, prefix) {
  const text = String(value || "");
  return (prefix && text.startsWith(prefix) ? text.slice(prefix.length) : text).toLowerCase().replace(/_/g, " ");
}

export function when(ms) {
  const value = Number(ms || 0);
  if (!value) return "–";
  return new Date(value).toLocaleString();
}

export function percent(value, digits = 1) {
  return `${(Number(value || 0) * 100).toFixed(digits)} %`;
}

export function number(value, digits = 0) {
  const n = Number(value || 0);
  return n.toLocaleString(undefined, { maximumFractionDigits: digits, minimumFractionDigits: 0 });
}

// A horizontal bar (a <meter>-like div with text): value of max, labelled. max 0: "unlimited".
export function bar(label, value, max, format = number) {
  const v = Number(value || 0);
  const m = Number(max || 0);
  const fill = el("span", { class: "bar-fill" });
  const ratio = m > 0 ? Math.min(v / m, 1) : 0;
  fill.style.width = `${(ratio * 100).toFixed(1)}%`;
  if (m > 0 && v / m >= 0.9) fill.classList.add("bar-high");
  const text = m > 0 ? `${format(v)} of ${format(m)}` : `${format(v)} (unlimited)`;
  return el(
    "div",
    { class: "bar-row", role: "group", "aria-label": `${label}: ${text}` },
    el("span", { class: "bar-label" }, label),
    el("span", { class: "bar-track" }, fill),
    el("span", { class: "bar-value" }, text),
  );
}

// Class balance: one bar per label, scaled to the largest class.
export function classBalance(classes, caption = "Class balance") {
  const list = classes || [];
  const most = Math.max(1, ...list.map((c) => Number(c.count || 0)));
  return el(
    "div",
    { class: "class-balance", "data-testid": "class-balance" },
    el("h3", {}, caption),
    list.length ? list.map((c) => {
      const row = bar(c.label, c.count, most, (n) => number(n));
      row.querySelector(".bar-value").textContent = `${number(c.count)} rows`;
      return row;
    }) : el("p", { class: "hint" }, "No classes."),
  );
}

// A dataset's ValidationReport: counts, warnings, issues by kind and the first issues row by row.
export function validationReport(report) {
  const r = report || {};
  const counts = Object.entries(r.issue_counts || {});
  const issues = r.issues || [];
  return el(
    "div",
    { class: "validation-report", "data-testid": "validation-report" },
    el("h3", {}, "Validation report"),
    el(
      "p",
      {},
      `${number(r.rows_read)} rows read, ${number(r.rows_kept)} kept, ${number(r.rows_dropped)} dropped.`,
    ),
    (r.warnings || []).map((w) => el("p", { class: "warning" }, `Warning: ${w}`)),
    counts.length
      ? table(["Issue", "Rows"], counts.map(([kind, n]) => [kind, number(n)]), "Issues by kind")
      : el("p", { class: "ok" }, "No row has a problem."),
    issues.length
      ? table(
          ["Line / file", "Kind", "Detail"],
          issues.map((i) => [i.path || (Number(i.line) ? `line ${i.line}` : "whole file"), i.kind, i.detail]),
          issues.length >= 100 ? "Row issues (the first 100)" : "Row issues",
        )
      : null,
  );
}

// A job's Evaluation: the headline metrics, per-class metrics and the confusion matrix with labelled axes.
export function evaluationView(evaluation) {
  const e = evaluation || {};
  const labels = e.labels || [];
  const confusion = (e.confusion || []).map(Number);
  const delta = (v) => (Number(v) >= 0 ? "+" : "") + (Number(v) * 100).toFixed(1) + " pts";
  const headline = [
    ["Accuracy", percent(e.accuracy)],
    ["Macro F1", Number(e.macro_f1 || 0).toFixed(3)],
    ["Training rows", number(e.train_rows)],
    ["Held-out rows", number(e.eval_rows)],
  ];
  if (e.previous_version) {
    headline.push([`Accuracy vs version ${e.previous_version}`, delta(e.accuracy_delta)]);
    headline.push([`Macro F1 vs version ${e.previous_version}`, delta(e.macro_f1_delta)]);
  }
  const matrix = el(
    "table",
    { class: "confusion", "data-testid": "confusion-matrix" },
    el("caption", {}, "Confusion matrix: rows are the true label, columns the predicted label"),
    el(
      "thead",
      {},
      el("tr", {}, el("td", { class: "corner" }), el("th", { scope: "colgroup", colspan: String(labels.length) }, "Predicted label")),
      el("tr", {}, el("th", { scope: "col" }, "True label ↓"), labels.map((l) => el("th", { scope: "col" }, l))),
    ),
    el(
      "tbody",
      {},
      labels.map((label, i) =>
        el(
          "tr",
          {},
          el("th", { scope: "row" }, label),
          labels.map((_, j) => {
            const n = confusion[i * labels.length + j] || 0;
            return el("td", { class: i === j ? "diagonal" : n ? "miss" : "" }, String(n));
          }),
        ),
      ),
    ),
  );
  return el(
    "div",
    { class: "evaluation", "data-testid": "evaluation" },
    el("h3", {}, "Evaluation on the held-out split"),
    table(["Metric", "Value"], headline, "Metrics"),
    table(
      ["Label", "Precision", "Recall", "F1", "Support"],
      (e.per_class || []).map((c) => [c.label, Number(c.precision).toFixed(3), Number(c.recall).toFixed(3), Number(c.f1).toFixed(3), number(c.support)]),
      "Per class",
    ),
    el("div", { class: "table-scroll" }, matrix),
  );
}

// Runs fn while `button` shows it is busy; errors go to `where` (showError) and are not rethrown.
export async function busy(button, where, fn) {
  const label = button.textContent;
  button.disabled = true;
  button.setAttribute("aria-busy", "true");
  try {
    return await fn();
  } catch (error) {
    if (error && error.name === "AbortError") return undefined;
    showError(where, error);
    return undefined;
  } finally {
    button.disabled = false;
    button.removeAttribute("aria-busy");
    button.textContent = label;
  }
}

export function clearError(where) {
  where.querySelectorAll(":scope > .error").forEach((node) => node.remove());
}
