// The console's shell: sign-in (WhoAmI with the pasted key), the section navigation (only the sections the key's
// scopes allow), and a hash router that loads each page module from ./pages/<id>.js.
import { ApiError, getJson, hasScope, rpc, session, setKey } from "./api.js";
import { el, showError } from "./ui.js";

// id, title, the scope a key needs (tenants:admin holds them all); the page modules export `page.render`.
export const SECTIONS = [
  { id: "scenarios", title: "Scenarios", scope: "infer" },
  { id: "data", title: "Data", scope: "models:train" },
  { id: "train", title: "Train", scope: "models:train" },
  { id: "models", title: "Models", scope: "infer" },
  { id: "cluster", title: "Cluster", scope: "infer" },
  { id: "keys", title: "Keys", scope: "keys:admin" },
];

let cleanup = null;
let routes = 0;

async function signIn(key) {
  setKey(key);
  session.whoami = await rpc("AdminService", "WhoAmI", {});
  if (!session.info) session.info = await getJson("/api/info");
  if (!session.services) {
    const listed = await getJson("/api/services");
    session.services = new Map(listed.methods.map((m) => [`${m.service.split(".").pop()}/${m.method}`, m]));
  }
}

function showSignIn(error) {
  document.getElementById("nav").hidden = true;
  document.getElementById("who").hidden = true;
  document.getElementById("page").hidden = true;
  const box = document.getElementById("sign-in");
  box.hidden = false;
  const message = document.getElementById("sign-in-error");
  message.hidden = !error;
  message.textContent = error || "";
  document.getElementById("api-key").focus();
}

function renderNav() {
  const nav = document.getElementById("nav");
  nav.replaceChildren(
    el(
      "ul",
      {},
      SECTIONS.filter((s) => hasScope(s.scope)).map((s) =>
        el("li", {}, el("a", { href: `#/${s.id}`, "data-section": s.id }, s.title)),
      ),
    ),
  );
  nav.hidden = false;
  const who = session.whoami;
  document.getElementById("who-text").textContent = `${who.tenant_id} · key ${who.key_id} · ${who.scopes.join(", ")}`;
  document.getElementById("who").hidden = false;
}

async function route() {
  if (!session.whoami) return;
  const [id, ...rest] = location.hash.replace(/^#\/?/, "").split("/");
  const section = SECTIONS.find((s) => s.id === id) || SECTIONS[0];
  document.querySelectorAll("#nav a").forEach((a) => {
    if (a.dataset.section === section.id) a.setAttribute("aria-current", "page");
    else a.removeAttribute("aria-current");
  });
  if (cleanup) {
    try {
      cleanup();
    } catch (_) {
      /* a page's own teardown must not block the next */
    }
    cleanup = null;
  }
  // Each route renders into a view of its own: when the address changes again while a page still loads, the stale
  // page goes on filling a view no longer on screen, and its cleanup runs as soon as its render returns.
  const mine = ++routes;
  const view = el("div", { class: "view" });
  const page = document.getElementById("page");
  page.hidden = false;
  page.replaceChildren(view);
  document.title = `${section.title} · aimass console`;
  if (!hasScope(section.scope)) {
    view.append(
      el("h1", {}, section.title),
      el("p", { class: "error", role: "alert" }, `This key lacks the ${section.scope} scope this section needs.`),
    );
    return;
  }
  try {
    const module = await import(`./pages/${section.id}.js`);
    const teardown = mine === routes ? (await module.page.render(view, { args: rest })) || null : null;
    if (mine !== routes) {
      if (teardown) teardown();
      return;
    }
    cleanup = teardown;
  } catch (error) {
    if (mine === routes) showError(view, error);
  }
  document.getElementById("main").focus({ preventScroll: true });
}

async function start() {
  document.getElementById("sign-in-form").addEventListener("submit", async (event) => {
    event.preventDefault();
    const input = document.getElementById("api-key");
    try {
      await signIn(input.value.trim());
      input.value = "";
      document.getElementById("sign-in").hidden = true;
      renderNav();
      await route();
    } catch (error) {
      setKey("");
      session.whoami = null;
      showSignIn(error instanceof ApiError && error.status === 401 ? `Not signed in: ${error.message}` : String(error.message || error));
    }
  });
  document.getElementById("sign-out").addEventListener("click", () => {
    setKey("");
    session.whoami = null;
    if (cleanup) cleanup();
    cleanup = null;
    showSignIn("");
  });
  window.addEventListener("hashchange", route);
  if (session.key) {
    try {
      await signIn(session.key);
      renderNav();
      await route();
      return;
    } catch (_) {
      setKey("");
      session.whoami = null;
    }
  }
  showSignIn("");
}

start();
