// The dashboard's only script: search as you type, the feature-number forms, the token, and job progress.
// Text from the server always goes in through textContent, never innerHTML.
"use strict";

const TOKEN_KEY = "interp_token";
const POLL_MS = 1000;

function el(tag, attrs, ...children) {
  const e = document.createElement(tag);
  for (const [k, v] of Object.entries(attrs || {})) e.setAttribute(k, v);
  for (const c of children) e.append(c);
  return e;
}

function featureHref(sae, idx) {
  return "/ui/saes/" + encodeURIComponent(sae) + "/features/" + idx;
}

async function api(method, path, body) {
  const headers = {};
  const token = sessionStorage.getItem(TOKEN_KEY);
  if (token) headers["Authorization"] = "Bearer " + token;
  if (body !== undefined) headers["Content-Type"] = "application/json";
  const r = await fetch(path, {method, headers, body: body === undefined ? undefined : JSON.stringify(body)});
  const data = await r.json().catch(() => ({detail: r.statusText}));
  if (!r.ok) throw new Error(r.status + ": " + (data.detail || r.statusText));
  return data;
}

// ---------------------------------------------------------------- search as you type
function searchBox() {
  const q = document.getElementById("q"), out = document.getElementById("results");
  if (!q) return;
  let timer = null, seq = 0;
  q.addEventListener("input", () => {
    clearTimeout(timer);
    timer = setTimeout(async () => {
      const text = q.value.trim(), mine = ++seq;
      if (!text) { out.replaceChildren(); return; }
      try {
        const page = await api("GET", "/features?limit=20&q=" + encodeURIComponent(text));
        if (mine !== seq) return;  // a later keystroke's answer wins
        out.replaceChildren(...page.items.map(hit));
        if (!page.items.length) out.append(el("p", {class: "muted"}, "no match"));
      } catch (err) {
        if (mine === seq) out.replaceChildren(el("p", {class: "error"}, err.message));
      }
    }, 150);
  });
}

function hit(h) {
  const scores = Object.entries(h.scores || {}).map(([s, v]) => el("span", {class: "score"}, s + " " + v.toFixed(3)));
  return el("a", {class: "hit", href: featureHref(h.sae, h.index)},
            el("span", {class: "where"}, h.sae + " #" + h.index), h.label, ...scores);
}

function gotoForms() {
  for (const f of document.querySelectorAll("form.goto")) {
    f.addEventListener("submit", (ev) => {
      ev.preventDefault();
      location.href = featureHref(f.dataset.sae, f.elements.idx.value);
    });
  }
}

// ---------------------------------------------------------------- token
function loginForm() {
  const f = document.getElementById("login");
  if (!f) return;
  const saved = document.getElementById("saved");
  const show = () => { saved.textContent = sessionStorage.getItem(TOKEN_KEY) ? "a token is saved" : "no token saved"; };
  f.addEventListener("submit", (ev) => {
    ev.preventDefault();
    const t = f.elements.token.value.trim();
    sessionStorage.setItem(TOKEN_KEY, t);
    // reads from pages a link opens go by cookie; writes only ever by the Authorization header
    document.cookie = TOKEN_KEY + "=" + encodeURIComponent(t) + "; path=/; SameSite=Strict";
    f.reset(); show();
  });
  document.getElementById("logout").addEventListener("click", () => {
    sessionStorage.removeItem(TOKEN_KEY);
    document.cookie = TOKEN_KEY + "=; path=/; max-age=0; SameSite=Strict";
    show();
  });
  show();
}

// ---------------------------------------------------------------- jobs with live progress
function jobCard(id, atEnd) {
  const old = document.getElementById("job-" + id);
  if (old) old.remove();
  const box = el("div", {class: "job", id: "job-" + id});
  const list = document.getElementById("jobs");
  if (atEnd) list.append(box); else list.prepend(box);
  const tick = async () => {
    let j;
    try { j = await api("GET", "/jobs/" + id); } catch (err) {
      box.replaceChildren(el("p", {class: "error"}, "job " + id + ": " + err.message));
      return;
    }
    const finished = j.n_done + j.n_failed, pct = j.n_items ? 100 * finished / j.n_items : 100;
    const bar = el("div", {class: "bar"}, el("div", {style: "width:" + pct.toFixed(1) + "%"}));
    const fails = Object.entries(j.failures || {}).map(([r, n]) => r + " " + n).join(", ");
    const line = `job ${j.job_id} · ${j.sae} · ${j.state} · ${finished}/${j.n_items} (${j.n_failed} failed)` +
                 ` · ${j.tokens} tokens` + (fails ? " · " + fails : "") + (j.reason ? " · " + j.reason : "");
    const kids = [el("span", {class: "state"}, line), bar];
    const active = j.state === "queued" || j.state === "running";
    if (active) {
      const cancel = el("button", {}, "cancel");
      cancel.addEventListener("click", () => api("POST", "/jobs/" + id + "/cancel").catch(showJobError));
      kids.push(cancel);
    }
    box.replaceChildren(...kids);
    if (active) setTimeout(tick, POLL_MS);
  };
  tick();
}

function showJobError(err) {
  document.getElementById("joberror").textContent = err.message;
}

function jobsPage() {
  const form = document.getElementById("newjob");
  if (!form) return;
  form.addEventListener("submit", async (ev) => {
    ev.preventDefault();
    const e = form.elements;
    const body = {sae: e.sae.value, explainer: e.explainer.value, unlabeled: e.unlabeled.checked,
                  scorers: e.scorers.value.split(",").map((s) => s.trim()).filter(Boolean)};
    if (e.features.value.trim()) body.features = e.features.value.trim();
    showJobError({message: ""});
    try { jobCard((await api("POST", "/jobs", body)).job_id); } catch (err) { showJobError(err); }
  });
  document.getElementById("watch").addEventListener("submit", (ev) => {
    ev.preventDefault();
    jobCard(ev.target.elements.id.value);
  });
  api("GET", "/jobs?limit=20").then((page) => {
    for (const j of page.items) jobCard(j.job_id, true);
    const id = new URLSearchParams(location.search).get("id");
    if (id) jobCard(id);
  }).catch(showJobError);
}

searchBox();
gotoForms();
loginForm();
jobsPage();
