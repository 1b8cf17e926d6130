// Data: upload a dataset (with the upload's progress), its validation report and class balance, the tenant's
// datasets (and those shared with it), one described in full, shared read-only with other tenants, or deleted.
import { rpc, session, uploadDataset } from "../api.js";
import { bytes, el, field, showError, table, toast } from "../ui.js";
import { busy, classBalance, clearError, enumText, number, validationReport, when } from "../lifecycle/common.js";

const TASKS = [
  ["TRAINING_TASK_TEXT_CLASSIFICATION", "Text classification"],
  ["TRAINING_TASK_IMAGE_CLASSIFICATION", "Image classification"],
];
const FORMATS = [
  ["", "Detect from the file"],
  ["DATASET_FORMAT_CSV", "CSV"],
  ["DATASET_FORMAT_JSONL", "JSONL"],
  ["DATASET_FORMAT_IMAGE_FOLDERS_ZIP", "ZIP of image folders"],
];

function options(pairs, selected) {
  return pairs.map(([value, text]) => el("option", { value, selected: value === selected }, text));
}

function nameFromFile(file) {
  const base = file.name.replace(/\.[^.]*$/, "").toLowerCase().replace(/[^a-z0-9._-]+/g, "-").replace(/^[^a-z0-9]+/, "");
  return base.slice(0, 63) || "dataset";
}

export const page = {
  async render(root) {
    const mine = session.whoami.tenant_id;
    let selected = null; // {name, owner}

    // --- Upload ---
    const file = el("input", { type: "file", accept: ".csv,.jsonl,.json,.zip,text/csv,application/zip", required: true });
    const name = el("input", { type: "text", required: true, pattern: "[a-z0-9][a-z0-9._\\-]{0,62}", spellcheck: "false", autocomplete: "off" });
    const task = el("select", {}, options(TASKS, TASKS[0][0]));
    const format = el("select", {}, options(FORMATS, ""));
    const textColumn = el("input", { type: "text", placeholder: "text", spellcheck: "false", autocomplete: "off" });
    const labelColumn = el("input", { type: "text", placeholder: "label", spellcheck: "false", autocomplete: "off" });
    const progress = el("progress", { max: "100", value: "0", "aria-label": "Upload progress" });
    const progressText = el("span", { class: "hint", "aria-live": "polite" }, "");
    const progressRow = el("div", { class: "upload-progress", hidden: true }, progress, progressText);
    const submit = el("button", { type: "submit" }, "Upload");
    const result = el("div", { class: "upload-result", "aria-live": "polite" });
    file.addEventListener("change", () => {
      const chosen = file.files && file.files[0];
      if (!chosen) return;
      if (!name.value) name.value = nameFromFile(chosen);
      if (/\.zip$/i.test(chosen.name)) task.value = "TRAINING_TASK_IMAGE_CLASSIFICATION";
    });
    const form = el(
      "form",
      { class: "card", "aria-labelledby": "upload-heading" },
      el("h2", { id: "upload-heading" }, "Upload a dataset"),
      el("p", { class: "hint" }, "Rows with problems are dropped and reported; the same bytes uploaded again are the same version."),
      el(
        "div",
        { class: "form-grid" },
        field("File", file, "CSV or JSONL with a text and a label column, or a ZIP of images in one folder per label."),
        field("Dataset name", name, "1-63 characters: lowercase letters, digits, '.', '_' or '-'."),
        field("Task", task, "Text: a text and a label per row. Images: a ZIP with one folder per label."),
        field("Format", format),
        field("Text column (optional)", textColumn, "Default: text."),
        field("Label column (optional)", labelColumn, "Default: label."),
      ),
      el("div", { class: "row" }, submit),
      progressRow,
      result,
    );
    form.addEventListener("submit", async (event) => {
      event.preventDefault();
      const chosen = file.files && file.files[0];
      clearError(form);
      if (!chosen) {
        showError(form, "Choose a file to upload.");
        return;
      }
      progressRow.hidden = false;
      progress.value = 0;
      progressText.textContent = `Uploading ${bytes(chosen.size)}…`;
      result.replaceChildren();
      await busy(submit, form, async () => {
        submit.textContent = "Uploading…";
        const params = {
          name: name.value.trim(),
          task: task.value,
          format: format.value,
          text_column: textColumn.value.trim(),
          label_column: labelColumn.value.trim(),
        };
        try {
          const answer = await uploadDataset(chosen, params, (sent, total) => {
            const pct = total ? Math.round((sent / total) * 100) : 0;
            progress.value = pct;
            progressText.textContent = pct >= 100 ? "Uploaded; validating…" : `Uploading: ${pct} % of ${bytes(total)}`;
          });
          progress.value = 100;
          progressText.textContent = answer.already_existed
            ? `Done: these bytes were uploaded before (version ${answer.version.version}); nothing new was stored.`
            : `Done: version ${answer.version.version} of ${answer.dataset.name}, ${number(answer.version.rows)} rows kept.`;
          progressRow.classList.add("done");
          result.replaceChildren(
            el("h3", {}, `${answer.dataset.name} · version ${answer.version.version}`),
            el("div", { class: "two-col" }, validationReport(answer.report), classBalance(answer.report.classes)),
            el("p", {}, el("a", { href: `#/train/new/${encodeURIComponent(answer.dataset.name)}` }, "Train a model on it →")),
          );
          toast(`Uploaded ${answer.dataset.name}`);
          await refresh();
        } catch (error) {
          progressText.textContent = "The upload failed.";
          throw error;
        }
      });
    });

    // --- List and detail ---
    const listBox = el("div", { class: "table-scroll" });
    const listCard = el(
      "section",
      { class: "card", "aria-labelledby": "datasets-heading" },
      el("div", { class: "row spread" }, el("h2", { id: "datasets-heading" }, "Datasets"), el("button", { type: "button", class: "quiet", onclick: () => refresh() }, "Refresh")),
      listBox,
    );
    const detail = el("section", { class: "card", "aria-labelledby": "dataset-detail-heading", hidden: true });

    async function refresh() {
      clearError(listCard);
      try {
        const { datasets } = await rpc("DatasetService", "ListDatasets", {});
        if (!datasets.length) {
          listBox.replaceChildren(el("p", { class: "hint", "data-testid": "no-datasets" }, "No datasets yet: upload one above."));
          return;
        }
        listBox.replaceChildren(
          table(
            ["Name", "Owner", "Task", "Versions", "Rows (newest)", "Shared with", ""],
            datasets.map((d) => {
              const newest = d.versions[d.versions.length - 1] || {};
              return [
                d.name,
                d.owner === mine ? `${d.owner} (you)` : d.owner,
                enumText(d.task, "TRAINING_TASK_"),
                String(d.versions.length),
                number(newest.rows),
                d.shared_with.join(", ") || "–",
                el("button", { type: "button", class: "quiet", "aria-label": `Describe ${d.name}`, onclick: () => describe(d.name, d.owner, "") }, "Describe"),
              ];
            }),
            "Your datasets and those shared with you",
          ),
        );
      } catch (error) {
        showError(listCard, error);
      }
    }

    async function describe(dsName, owner, version) {
      selected = { name: dsName, owner };
      detail.hidden = false;
      detail.replaceChildren(el("h2", { id: "dataset-detail-heading" }, `Dataset ${dsName}`), el("p", { class: "hint" }, "Loading…"));
      try {
        const answer = await rpc("DatasetService", "DescribeDataset", {
          dataset: { name: dsName, owner, version },
          preview_rows: 10,
        });
        renderDetail(answer);
      } catch (error) {
        detail.replaceChildren(el("h2", { id: "dataset-detail-heading" }, `Dataset ${dsName}`));
        showError(detail, error);
      }
      detail.scrollIntoView({ block: "nearest" });
    }

    function renderDetail(answer) {
      const d = answer.dataset;
      const v = answer.version;
      const owned = d.owner === mine;
      const versionSelect = el(
        "select",
        {},
        d.versions.map((x) => el("option", { value: x.version, selected: x.version === v.version }, `${x.version} · ${number(x.rows)} rows · ${when(x.created_unix_ms)}`)),
      );
      versionSelect.addEventListener("change", () => describe(d.name, d.owner, versionSelect.value));
      const parts = [
        el("h2", { id: "dataset-detail-heading" }, `Dataset ${d.name}`),
        el(
          "dl",
          { class: "facts" },
          el("dt", {}, "Owner"), el("dd", {}, d.owner),
          el("dt", {}, "Task"), el("dd", {}, enumText(d.task, "TRAINING_TASK_")),
          el("dt", {}, "Format"), el("dd", {}, enumText(v.format, "DATASET_FORMAT_")),
          el("dt", {}, "Size"), el("dd", {}, bytes(v.size_bytes)),
          el("dt", {}, "SHA-256"), el("dd", {}, el("code", {}, v.sha256)),
        ),
        field("Version", versionSelect),
        el("div", { class: "two-col" }, validationReport(answer.report), classBalance(v.classes)),
        table(["Text", "Label"], answer.preview.map((p) => [p.text, p.label]), `Preview: the first ${answer.preview.length} rows`),
        el("p", {}, el("a", { href: `#/train/new/${encodeURIComponent(d.name)}/${encodeURIComponent(d.owner)}` }, "Train a model on it →")),
      ];
      if (owned) parts.push(shareBox(d), deleteBox(d, v));
      else parts.push(el("p", { class: "hint" }, `Shared with you read-only by ${d.owner}.`));
      detail.replaceChildren(...parts);
    }

    function shareBox(d) {
      const tenant = el("input", { type: "text", required: true, spellcheck: "false", autocomplete: "off" });
      const share = el("button", { type: "submit" }, "Share read-only");
      const box = el(
        "form",
        { class: "subcard", "aria-labelledby": "share-heading" },
        el("h3", { id: "share-heading" }, "Sharing"),
        el("p", {}, d.shared_with.length ? `Shared read-only with: ${d.shared_with.join(", ")}.` : "Not shared with any other tenant."),
        el("div", { class: "row align-end" }, field("Tenant", tenant, "They may see it and train on it; never change or delete it."), share),
        d.shared_with.length
          ? el(
              "div",
              { class: "row" },
              d.shared_with.map((t) =>
                el("button", {
                  type: "button",
                  class: "quiet",
                  onclick: async (event) => {
                    await busy(event.currentTarget, box, async () => {
                      await rpc("DatasetService", "ShareDataset", { name: d.name, tenant: t, revoke: true });
                      toast(`${d.name} is no longer shared with ${t}`);
                      await refresh();
                      await describe(d.name, d.owner, "");
                    });
                  },
                }, `Stop sharing with ${t}`),
              ),
            )
          : null,
      );
      box.addEventListener("submit", async (event) => {
        event.preventDefault();
        clearError(box);
        await busy(share, box, async () => {
          await rpc("DatasetService", "ShareDataset", { name: d.name, tenant: tenant.value.trim() });
          toast(`${d.name} is shared with ${tenant.value.trim()}`);
          await refresh();
          await describe(d.name, d.owner, "");
        });
      });
      return box;
    }

    function deleteBox(d, v) {
      const box = el("div", { class: "subcard" }, el("h3", {}, "Delete"));
      const one = el("button", { type: "button", class: "danger" }, `Delete version ${v.version}`);
      const all = el("button", { type: "button", class: "danger" }, "Delete every version");
      const remove = async (button, version) => {
        const what = version ? `version ${version} of ${d.name}` : `every version of ${d.name}`;
        if (!window.confirm(`Delete ${what}? Models already trained on it keep working.`)) return;
        await busy(button, box, async () => {
          const answer = await rpc("DatasetService", "DeleteDataset", { dataset: { name: d.name, version } });
          toast(`Deleted ${answer.deleted_versions.length} version(s), ${bytes(answer.freed_bytes)} freed`);
          selected = null;
          detail.hidden = true;
          detail.replaceChildren();
          await refresh();
        });
      };
      one.addEventListener("click", () => remove(one, v.version));
      all.addEventListener("click", () => remove(all, ""));
      box.append(el("div", { class: "row" }, one, all));
      return box;
    }

    root.append(el("h1", {}, "Data"), form, listCard, detail);
    await refresh();
    return () => {
      selected = null;
    };
  },
};
