// Train: start a job on a dataset (defaults for everything but the dataset), watch it live (progress, stage, a loss
// curve), its evaluation (metrics, confusion matrix); the tenant's jobs (cancel one still running); then each of
// the tenant's models with its versions: deploy (as the default or a canary share), promote, roll back, and
// download a version's edge export.
import { download, rpc, session, stream } from "../api.js";
import { bytes, el, field, showError, table, toast } from "../ui.js";
import { lineChart } from "../linechart.js";
import { busy, clearError, enumText, evaluationView, number, percent, when } from "../lifecycle/common.js";

const BASE_MODELS = [
  ["", "Default for the dataset's task"],
  ["all-MiniLM-L6-v2", "all-MiniLM-L6-v2 (text)"],
  ["efficientnet-lite0", "efficientnet-lite0 (images)"],
];
const FINISHED = new Set(["JOB_STATE_SUCCEEDED", "JOB_STATE_FAILED", "JOB_STATE_CANCELLED"]);
const EXPORT_FORMATS = [["EXPORT_FORMAT_ONNX", "ONNX (model.onnx, preprocessing, labels, example script)"]];

function jobState(job) {
  return enumText(job.state, "JOB_STATE_");
}

export const page = {
  async render(root, { args }) {
    const controller = new AbortController();
    let watching = null; // the AbortController of the job being watched

    // ---------- Start a job ----------
    const dataset = el("select", { required: true });
    const baseModel = el("select", {}, BASE_MODELS.map(([v, t]) => el("option", { value: v }, t)));
    const modelName = el("input", { type: "text", spellcheck: "false", autocomplete: "off", pattern: "[a-z0-9][a-z0-9._\\-]{0,62}" });
    const epochs = el("input", { type: "number", min: "1", max: "500", step: "1", inputmode: "numeric" });
    const learningRate = el("input", { type: "number", min: "0", max: "1", step: "any" });
    const seed = el("input", { type: "number", min: "0", step: "1", inputmode: "numeric" });
    const start = el("button", { type: "submit" }, "Start training");
    const startForm = el(
      "form",
      { class: "card", "aria-labelledby": "start-heading" },
      el("h2", { id: "start-heading" }, "Start a training job"),
      el(
        "div",
        { class: "form-grid" },
        field("Dataset", dataset),
        field("Base model", baseModel, "The frozen backbone the new model's head is trained on."),
        field("Model name", modelName, "The model this job adds a version to. Default: the dataset's name."),
      ),
      el(
        "details",
        { class: "advanced" },
        el("summary", {}, "Hyperparameters (optional)"),
        el(
          "div",
          { class: "form-grid" },
          field("Epochs", epochs, "1-500; default 60 (text) or 40 (images)."),
          field("Learning rate", learningRate, "(0, 1]; default 0.01."),
          field("Seed", seed, "The same seed, data and code give the same model."),
        ),
      ),
      el("div", { class: "row" }, start),
    );
    dataset.addEventListener("change", () => {
      modelName.placeholder = dataset.selectedOptions[0] ? dataset.selectedOptions[0].dataset.name || "" : "";
    });
    startForm.addEventListener("submit", async (event) => {
      event.preventDefault();
      clearError(startForm);
      const chosen = dataset.selectedOptions[0];
      if (!chosen || !chosen.value) {
        showError(startForm, "Choose a dataset (upload one on the Data page).");
        return;
      }
      const hyper = {};
      if (epochs.value) hyper.epochs = Number(epochs.value);
      if (learningRate.value) hyper.learning_rate = Number(learningRate.value);
      if (seed.value) hyper.seed = String(seed.value);
      await busy(start, startForm, async () => {
        start.textContent = "Starting…";
        const { job } = await rpc("TrainingService", "StartTraining", {
          dataset: { name: chosen.dataset.name, owner: chosen.dataset.owner },
          base_model: baseModel.value,
          model_name: modelName.value.trim(),
          hyperparameters: hyper,
        });
        toast(`Job ${job.job_id} queued`);
        history.replaceState(null, "", `#/train/job/${job.job_id}`);
        watch(job.job_id);
        refreshJobs();
      });
    });

    async function loadDatasets(preferred, preferredOwner) {
      const { datasets } = await rpc("DatasetService", "ListDatasets", {}, { signal: controller.signal });
      if (!datasets.length) {
        dataset.replaceChildren(el("option", { value: "" }, "No datasets: upload one on the Data page"));
        return;
      }
      dataset.replaceChildren(
        ...datasets.map((d) => {
          const option = el(
            "option",
            { value: `${d.owner}/${d.name}`, "data-name": d.name, "data-owner": d.owner },
            `${d.name}${d.owner === session.whoami.tenant_id ? "" : ` (shared by ${d.owner})`} · ${enumText(d.task, "TRAINING_TASK_")}`,
          );
          return option;
        }),
      );
      if (preferred) {
        const match = [...dataset.options].find((o) => o.dataset.name === preferred && (!preferredOwner || o.dataset.owner === preferredOwner));
        if (match) dataset.value = match.value;
      }
      dataset.dispatchEvent(new Event("change"));
    }

    // ---------- Watch a job ----------
    const watchCard = el("section", { class: "card", "aria-labelledby": "watch-heading", hidden: true });

    function watch(jobId) {
      if (watching) watching.abort();
      const mine = new AbortController();
      watching = mine;
      controller.signal.addEventListener("abort", () => mine.abort());
      const heading = el("h2", { id: "watch-heading" }, `Job ${jobId}`);
      const status = el("p", { class: "job-status", "data-testid": "job-status", "aria-live": "polite" }, "Connecting…");
      const progress = el("progress", { max: "100", value: "0", "aria-label": "Training progress" });
      const facts = el("p", { class: "hint" });
      const chart = lineChart({ title: "Training loss by epoch", xLabel: "epoch", yLabel: "loss" });
      chart.node.setAttribute("data-testid", "loss-chart");
      const cancel = el("button", { type: "button", class: "danger", hidden: true }, "Cancel job");
      const outcome = el("div", { class: "job-outcome" });
      const losses = [];
      let current = null;
      cancel.addEventListener("click", async () => {
        if (!window.confirm(`Cancel job ${jobId}?`)) return;
        await busy(cancel, watchCard, async () => {
          const { job } = await rpc("TrainingService", "CancelTraining", { job_id: jobId });
          toast(`Job ${jobId} is ${jobState(job)}`);
          refreshJobs();
        });
      });
      watchCard.hidden = false;
      watchCard.replaceChildren(heading, status, progress, facts, el("div", { class: "row" }, cancel), el("h3", {}, "Loss"), chart.node, outcome);

      const show = (job) => {
        current = job;
        const pct = Math.round(Number(job.progress || 0) * 100);
        progress.value = pct;
        const state = jobState(job);
        status.textContent = `${state}${job.stage && !FINISHED.has(job.state) ? ` · ${job.stage}` : ""} · ${pct} %`;
        status.dataset.state = job.state;
        facts.textContent = [
          `model ${job.model_name}${job.model_version ? ` version ${job.model_version}` : ""}`,
          `dataset ${job.dataset.owner}/${job.dataset.name}@${job.dataset.version}`,
          `base ${job.base_model}`,
          job.epochs ? `epoch ${job.epoch} of ${job.epochs}` : "",
          Number(job.loss) ? `loss ${Number(job.loss).toFixed(4)}` : "",
          Number(job.eta_seconds) > 0 && !FINISHED.has(job.state) ? `about ${Math.ceil(job.eta_seconds)} s left` : "",
          job.attempt > 1 ? `attempt ${job.attempt}` : "",
        ].filter(Boolean).join(" · ");
        // The job carries every epoch's loss so far (its updates come at most every so often, so the last-epoch
        // figure alone would skip epochs); a job recorded before that field existed still draws what it reports.
        const curve = (job.epoch_losses || []).map((loss, i) => [i + 1, Number(loss)]);
        if (curve.length) {
          losses.splice(0, losses.length, ...curve);
          chart.update([{ name: "training loss", points: losses }]);
        } else if (job.epoch > 0 && Number.isFinite(Number(job.loss)) && Number(job.loss) > 0) {
          const last = losses[losses.length - 1];
          if (last && last[0] === job.epoch) last[1] = Number(job.loss);
          else losses.push([job.epoch, Number(job.loss)]);
          chart.update([{ name: "training loss", points: losses }]);
        }
        cancel.hidden = FINISHED.has(job.state);
        if (job.state === "JOB_STATE_FAILED") {
          outcome.replaceChildren(el("p", { class: "error", role: "alert" }, `The job failed: ${job.error || "no reason given"}`));
        } else if (job.state === "JOB_STATE_SUCCEEDED") {
          outcome.replaceChildren(
            el("p", { class: "ok" }, `Done: ${job.model_name} version ${job.model_version}.`),
            evaluationView(job.evaluation),
          );
        } else if (job.state === "JOB_STATE_CANCELLED") {
          outcome.replaceChildren(el("p", {}, "The job was cancelled."));
        }
      };

      stream("TrainingService", "WatchTraining", { job_id: jobId }, (m) => show(m.job), { signal: mine.signal })
        .then(() => {
          if (current && current.state === "JOB_STATE_SUCCEEDED") {
            refreshJobs();
            refreshModels(current.model_name);
          }
        })
        .catch((error) => {
          if (error.name !== "AbortError") showError(watchCard, error);
        });
    }

    // ---------- Jobs ----------
    const jobsBox = el("div", { class: "table-scroll" });
    const jobsCard = el(
      "section",
      { class: "card", "aria-labelledby": "jobs-heading" },
      el("div", { class: "row spread" }, el("h2", { id: "jobs-heading" }, "Training jobs"), el("button", { type: "button", class: "quiet", onclick: () => refreshJobs() }, "Refresh")),
      jobsBox,
    );

    async function refreshJobs() {
      clearError(jobsCard);
      try {
        const { jobs } = await rpc("TrainingService", "ListTrainingJobs", { limit: 50 }, { signal: controller.signal });
        if (!jobs.length) {
          jobsBox.replaceChildren(el("p", { class: "hint" }, "No training jobs yet."));
          return;
        }
        jobsBox.replaceChildren(
          table(
            ["Job", "Model", "Dataset", "State", "Progress", "Accuracy", "Created", ""],
            jobs.map((job) => [
              el("code", {}, job.job_id),
              `${job.model_name}${job.model_version ? ` v${job.model_version}` : ""}`,
              `${job.dataset.name}@${job.dataset.version}`,
              jobState(job),
              `${Math.round(Number(job.progress) * 100)} %`,
              job.state === "JOB_STATE_SUCCEEDED" ? percent(job.evaluation.accuracy) : "–",
              when(job.created_unix_ms),
              el(
                "div",
                { class: "row" },
                el("a", { href: `#/train/job/${job.job_id}`, class: "button quiet", "aria-label": `Watch job ${job.job_id}` }, FINISHED.has(job.state) ? "Open" : "Watch"),
                FINISHED.has(job.state)
                  ? null
                  : el("button", {
                      type: "button",
                      class: "danger",
                      "aria-label": `Cancel job ${job.job_id}`,
                      onclick: async (event) => {
                        if (!window.confirm(`Cancel job ${job.job_id}?`)) return;
                        await busy(event.currentTarget, jobsCard, async () => {
                          await rpc("TrainingService", "CancelTraining", { job_id: job.job_id });
                          toast(`Job ${job.job_id} cancelled`);
                          await refreshJobs();
                        });
                      },
                    }, "Cancel"),
              ),
            ]),
            "Your jobs, newest first",
          ),
        );
      } catch (error) {
        if (error.name !== "AbortError") showError(jobsCard, error);
      }
    }

    // ---------- Models: versions, deployment, export ----------
    const modelsBox = el("div", {});
    const modelsCard = el(
      "section",
      { class: "card", "aria-labelledby": "models-heading" },
      el("div", { class: "row spread" }, el("h2", { id: "models-heading" }, "Your models: versions and deployment"), el("button", { type: "button", class: "quiet", onclick: () => refreshModels() }, "Refresh")),
      modelsBox,
    );

    async function refreshModels(focus) {
      clearError(modelsCard);
      try {
        const { models } = await rpc("DeploymentService", "ListCustomModels", {}, { signal: controller.signal });
        if (!models.length) {
          modelsBox.replaceChildren(el("p", { class: "hint" }, "No models yet: a job that succeeds adds a version."));
          return;
        }
        modelsBox.replaceChildren(...models.map((m) => modelView(m)));
        if (focus) {
          const target = modelsBox.querySelector(`[data-model="${CSS.escape(focus)}"]`);
          if (target) target.scrollIntoView({ block: "nearest" });
        }
      } catch (error) {
        if (error.name !== "AbortError") showError(modelsCard, error);
      }
    }

    function modelView(m) {
      const d = m.deployment || {};
      const box = el("article", { class: "subcard model-card", "data-model": m.name, "aria-labelledby": `model-${m.name}` });
      const versions = m.versions || [];
      const newest = versions[versions.length - 1];
      const version = el(
        "select",
        {},
        [...versions].reverse().map((v) => el("option", { value: v.version }, `version ${v.version} · ${enumText(v.state, "VERSION_STATE_")}`)),
      );
      if (newest) version.value = newest.version;
      const canary = el("input", { type: "range", min: "0", max: "99", step: "1", value: "0" });
      const canaryValue = el("output", { for: "", class: "range-value" }, "0 %");
      const canaryHint = el("p", { class: "hint" });
      const explain = () => {
        const pct = Number(canary.value);
        canaryValue.textContent = `${pct} %`;
        canary.setAttribute("aria-valuetext", `${pct} percent`);
        canaryHint.textContent =
          pct === 0 || !d.default_version
            ? "0 %: the version becomes the default (all unnamed requests)."
            : `The version serves ${pct} % of requests as the canary; the default (version ${d.default_version}) the rest.`;
      };
      canary.addEventListener("input", explain);
      const deploy = el("button", { type: "button" }, "Deploy");
      const promote = el("button", { type: "button", class: "quiet", disabled: !d.canary_version }, "Promote canary");
      const rollback = el("button", { type: "button", class: "quiet", disabled: !d.canary_version && !d.previous_version }, "Roll back");
      const format = el("select", {}, EXPORT_FORMATS.map(([v, t]) => el("option", { value: v }, t)));
      const exportButton = el("button", { type: "button", class: "quiet" }, "Download edge export");
      const after = async (answer, what) => {
        toast(`${m.name}: ${what} (${answer.replicas_applied} replica(s) applied)`);
        await refreshModels(m.name);
      };
      deploy.addEventListener("click", () =>
        busy(deploy, box, async () => {
          deploy.textContent = "Deploying…";
          const answer = await rpc("DeploymentService", "DeployModel", {
            model: { name: m.name, version: version.value },
            canary_percent: Number(canary.value),
          });
          await after(answer, `version ${version.value} deployed`);
        }),
      );
      promote.addEventListener("click", () =>
        busy(promote, box, async () => {
          const answer = await rpc("DeploymentService", "PromoteModel", { model: { name: m.name } });
          await after(answer, `version ${answer.model.deployment.default_version} is the default`);
        }),
      );
      rollback.addEventListener("click", () =>
        busy(rollback, box, async () => {
          if (!window.confirm(d.canary_version ? `Drop the canary (version ${d.canary_version}) of ${m.name}?` : `Return ${m.name}'s default to version ${d.previous_version}?`)) return;
          const answer = await rpc("DeploymentService", "RollbackModel", { model: { name: m.name } });
          await after(answer, `rolled back; the default is version ${answer.model.deployment.default_version}`);
        }),
      );
      exportButton.addEventListener("click", () =>
        busy(exportButton, box, async () => {
          exportButton.textContent = "Exporting…";
          const size = await download("/api/export", { model: { name: m.name, version: version.value }, format: format.value }, `${m.name}-v${version.value}.zip`);
          toast(`Downloaded ${m.name} version ${version.value} (${bytes(size)})`);
        }),
      );
      explain();
      const deployment = d.default_version
        ? `Default: version ${d.default_version}` +
          (d.canary_version ? ` · canary: version ${d.canary_version} at ${d.canary_percent} %` : "") +
          (d.previous_version ? ` · previous default: version ${d.previous_version}` : "")
        : "Not deployed.";
      box.append(
        el("h3", { id: `model-${m.name}` }, m.name),
        el("p", { class: "deployment", "data-testid": "deployment" }, `${deployment} · served by ${m.method}`),
        table(
          ["Version", "State", "Accuracy", "Macro F1", "Dataset", "Base model", "Created"],
          versions.map((v) => [
            v.version,
            el("span", { class: `state state-${enumText(v.state, "VERSION_STATE_")}` }, enumText(v.state, "VERSION_STATE_")),
            percent(v.evaluation && v.evaluation.accuracy),
            Number((v.evaluation && v.evaluation.macro_f1) || 0).toFixed(3),
            `${v.dataset.owner}/${v.dataset.name}@${v.dataset.version}`,
            v.base_model,
            when(v.created_unix_ms),
          ]),
          "Versions",
        ),
        el(
          "div",
          { class: "form-grid" },
          field("Version", version),
          el("div", { class: "field" }, el("label", { for: canary.id || (canary.id = `canary-${m.name}`) }, "Canary percent"), el("div", { class: "row" }, canary, canaryValue), canaryHint),
        ),
        el("div", { class: "row" }, deploy, promote, rollback),
        el("div", { class: "row align-end export-row" }, field("Export format", format), exportButton),
      );
      canaryValue.setAttribute("for", canary.id);
      return box;
    }

    root.append(el("h1", {}, "Train"), startForm, watchCard, jobsCard, modelsCard);
    const [kind, first, second] = args || [];
    await Promise.all([
      loadDatasets(kind === "new" ? decodeURIComponent(first || "") : "", kind === "new" ? decodeURIComponent(second || "") : "").catch((error) => {
        if (error.name !== "AbortError") showError(startForm, error);
      }),
      refreshJobs(),
      refreshModels(),
    ]);
    if (!startForm.isConnected) {
      // Left while loading: the router may never call this page's cleanup.
      controller.abort();
      return null;
    }
    if (kind === "job" && first) watch(decodeURIComponent(first));
    return () => controller.abort();
  },
};
