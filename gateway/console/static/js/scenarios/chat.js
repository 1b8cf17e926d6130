// The chat scenario (LlmService/Chat through /api/stream): tokens appear as they are generated, Stop aborts the
// call (which frees the model's slot on the replica), and the conversation keeps its turns.
import { stream } from "../api.js";
import { el, field } from "../ui.js";
import { invalid, scenarioView } from "./common.js";

const ROLE_NAMES = { CHAT_ROLE_USER: "You", CHAT_ROLE_ASSISTANT: "Assistant", CHAT_ROLE_SYSTEM: "System" };
const REST_ROLES = { CHAT_ROLE_USER: "user", CHAT_ROLE_ASSISTANT: "assistant", CHAT_ROLE_SYSTEM: "system" };

export function chat(root) {
  const system = el("input", { type: "text", name: "system", value: "You are a helpful, concise assistant." });
  const message = el("textarea", { name: "message", rows: "3" }, "Write a short poem about the sea.");
  const maxTokens = el("input", { type: "number", name: "max_tokens", min: "1", max: "1024", value: "128" });
  const stop = el("button", { type: "button", class: "danger stop", disabled: true }, "Stop");
  const clear = el("button", { type: "button", class: "quiet clear" }, "New conversation");
  const turns = []; // {role, content} of finished turns
  const log = el("ol", { class: "chat-log", "aria-label": "Conversation" });
  let current = null; // the reply being streamed: {node, text}
  let view = null;

  function turn(role, text, extra) {
    const body = el("div", { class: "chat-text" }, text);
    const node = el("li", { class: `chat-turn ${REST_ROLES[role]}${extra ? ` ${extra}` : ""}` }, el("span", { class: "chat-who" }, ROLE_NAMES[role]), body);
    log.append(node);
    return { node, body };
  }

  stop.addEventListener("click", () => view.scope.controller && view.scope.controller.abort());
  clear.addEventListener("click", () => {
    if (view.scope.controller) view.scope.controller.abort();
    turns.length = 0;
    log.replaceChildren();
    view.ctx.show(log, el("p", { class: "hint" }, "A new conversation: write a message and press Send."));
  });

  function finish(status) {
    if (!current) return;
    const text = current.body.textContent;
    current.node.dataset.state = status;
    if (status === "stopped") {
      current.node.classList.add("stopped");
      current.node.append(el("p", { class: "chat-note" }, "Stopped: the reply was cut short."));
    }
    // A stopped reply still joins the conversation (the model sees what it said so far).
    if (text) turns.push({ role: "CHAT_ROLE_ASSISTANT", content: text });
    current = null;
  }

  view = scenarioView(root, {
    title: "Chat",
    what: "Talk with a small language model. The reply appears word by word as it is written; Stop cuts it short.",
    uses: "LlmService/Chat (streamed) · smollm2-135m-instruct",
    runLabel: "Send",
    keepResult: true,
    extraButtons: [stop, clear],
    idle: "Write a message and press Send.",
    controls: [
      field("System prompt (how the assistant behaves)", system),
      field("Your message", message),
      field("Longest reply, in tokens", maxTokens),
    ],
    onAbort() {
      finish("stopped");
    },
    async run(ctx) {
      const text = message.value.trim();
      if (!text) throw invalid("Write a message first.");
      if (!log.isConnected) ctx.show(log);
      ctx.result.querySelectorAll(":scope > .hint").forEach((n) => n.remove());
      turns.push({ role: "CHAT_ROLE_USER", content: text });
      turn("CHAT_ROLE_USER", text);
      message.value = "";
      const messages = [...(system.value.trim() ? [{ role: "CHAT_ROLE_SYSTEM", content: system.value.trim() }] : []), ...turns];
      const body = { messages, sampling: { max_tokens: Math.max(1, Number(maxTokens.value) || 128) } };
      current = turn("CHAT_ROLE_ASSISTANT", "", "streaming");
      current.node.dataset.state = "streaming";
      const reply = current;
      stop.disabled = false;
      let finishReason = "";
      try {
        await stream(
          "LlmService",
          "Chat",
          body,
          (m) => {
            if (m.delta) reply.body.append(m.delta);
            if (m.finish_reason && m.finish_reason !== "FINISH_REASON_UNSPECIFIED") finishReason = m.finish_reason;
          },
          { signal: ctx.signal },
        );
        reply.node.classList.remove("streaming");
        if (finishReason === "FINISH_REASON_LENGTH") {
          reply.node.append(el("p", { class: "chat-note" }, "The reply reached the token limit."));
        }
        finish("done");
      } catch (error) {
        reply.node.classList.remove("streaming");
        if (error.name !== "AbortError") {
          // The failed turn leaves the conversation (the message stays on screen to copy).
          reply.node.remove();
          current = null;
          turns.pop();
        }
        throw error;
      } finally {
        stop.disabled = true;
        message.focus();
      }
      ctx.samples("LlmService", "Chat", body, {
        path: "/v1/chat/completions",
        body: {
          model: "smollm2-135m-instruct",
          messages: messages.map((m) => ({ role: REST_ROLES[m.role], content: m.content })),
          max_tokens: body.sampling.max_tokens,
          stream: true,
        },
      });
    },
  });
  view.ctx.show(log, el("p", { class: "hint" }, "Write a message and press Send."));
  return view;
}
