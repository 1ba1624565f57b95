// recmerge dashboard: loads each page's server-rendered part, submits forms to the REST API and shows
// its errors at the fields they name. The token lives in sessionStorage only (gone with the tab) and is
// sent as a Bearer header on every call, reads included, since the server may close reads too.
"use strict";

const TOKEN_KEY = "recmerge.token";
const token = () => sessionStorage.getItem(TOKEN_KEY) || "";

function api(path, options = {}) {
  const headers = new Headers(options.headers || {});
  if (token()) headers.set("Authorization", `Bearer ${token()}`);
  return fetch(path, { ...options, headers });
}

// A refusal as {text, fields}: the API's one-line `detail` and, when fields are at fault, their list (under
// `errors`, or under `detail` itself as FastAPI's own validation errors come).
async function problem(response) {
  let body = null;
  try {
    body = await response.json();
  } catch {
    return { text: `${response.status} ${response.statusText}`, fields: null };
  }
  const list = [body.errors, body.detail].find((x) => Array.isArray(x) && x.length) || null;
  const text = typeof body.detail === "string" ? body.detail : `${response.status} ${response.statusText}`;
  return { text, fields: list };
}

async function detail(response) {
  return (await problem(response)).text;
}

// --- parts -------------------------------------------------------------------------------------------
let refreshTimer = null;

async function loadPart() {
  const main = document.getElementById("part");
  try {
    await renderPart(main);
  } finally {
    // Counts finished reloads, so a script (the browser tests) can wait until the forms it is about to fill
    // are the new ones and not those a reload is replacing.
    main.dataset.loads = String(Number(main.dataset.loads || 0) + 1);
  }
}

async function renderPart(main) {
  const partUrl = main.dataset.part + window.location.search;
  const response = await api(partUrl);
  if (response.status === 401) {
    main.innerHTML = "";
    const p = document.createElement("p");
    p.className = "form-error";
    p.textContent = `${await detail(response)} — enter the token above.`;
    main.append(p);
    return;
  }
  if (!response.ok) {
    main.innerHTML = "";
    const p = document.createElement("p");
    p.className = "form-error";
    p.textContent = String(await detail(response));
    main.append(p);
    return;
  }
  const focused = document.activeElement && document.activeElement.id;
  main.innerHTML = await response.text();  // rendered by the server's autoescaping templates
  wire(main);
  if (focused && document.getElementById(focused)) document.getElementById(focused).focus();
  const live = main.querySelector("[data-refresh]");
  clearTimeout(refreshTimer);
  if (live) refreshTimer = setTimeout(loadPart, Number(live.dataset.refresh));
}

function wire(root) {
  root.querySelectorAll("img[data-src]").forEach(loadImage);
  root.querySelectorAll("a[data-download]").forEach((a) => a.addEventListener("click", download));
  root.querySelectorAll("form.api-form").forEach((form) => form.addEventListener("submit", submitForm));
  root.querySelectorAll("button[data-cancel]").forEach((b) => b.addEventListener("click", cancelJob));
  const merge = root.querySelector("#merge-form");
  if (merge) wireMerge(merge);
  const rec = root.querySelector("#recommend-form");
  if (rec) wireRecommend(rec);
}

// Images are fetched with the token, then shown from memory: an <img src> cannot carry a header.
async function loadImage(img) {
  const note = img.parentElement.querySelector(".loading");
  const response = await api(img.dataset.src);
  if (!response.ok) {
    if (note) note.textContent = `Not drawn: ${await detail(response)}`;
    return;
  }
  img.src = URL.createObjectURL(await response.blob());
  img.addEventListener("load", () => note && note.remove(), { once: true });
}

async function download(event) {
  event.preventDefault();
  const a = event.currentTarget;
  const response = await api(a.getAttribute("href"));
  if (!response.ok) return;
  const link = document.createElement("a");
  link.href = URL.createObjectURL(await response.blob());
  link.download = a.dataset.download;
  link.click();
}

// --- errors at the fields ------------------------------------------------------------------------------
function clearErrors(form) {
  form.querySelectorAll(".field-error, .form-error").forEach((e) => {
    e.hidden = true;
    e.textContent = "";
  });
  form.querySelectorAll(".invalid").forEach((e) => e.classList.remove("invalid"));
}

// The field an error belongs to: its location ("fisher.n"), else the nearest enclosing field ("fisher"),
// else a field named at the start of the message ("model_ids: model ... not found").
function fieldFor(form, loc, msg) {
  for (let parts = loc.slice(); parts.length; parts.pop()) {
    const f = form.querySelector(`[data-field="${CSS.escape(parts.join("."))}"]`);
    if (f) return f;
  }
  const named = /^(?:Value error, )?([a-z_.]+)(?::| has | lists )/.exec(msg || "");
  return named ? form.querySelector(`[data-field="${CSS.escape(named[1])}"]`) : null;
}

function showError(form, loc, msg) {
  const field = fieldFor(form, loc, msg);
  const slot = field ? field.querySelector(":scope > .field-error") : form.querySelector(".form-error");
  if (field) field.classList.add("invalid");
  slot.textContent = slot.textContent ? `${slot.textContent} ${msg}` : msg;
  slot.hidden = false;
}

function showErrors(form, { text, fields }) {
  if (fields) {
    for (const e of fields) {
      const loc = (e.loc || []).filter((p) => p !== "body").map(String);
      showError(form, loc, e.msg);
    }
  } else {
    showError(form, [], text);
  }
  const first = form.querySelector(".invalid input, .invalid select");
  if (first) first.focus();
}

// --- forms ---------------------------------------------------------------------------------------------
function numberOrNull(value) {
  return value === "" || value == null ? null : Number(value);
}

function mergeBody(form) {
  const data = new FormData(form);
  const body = { method: data.get("method"), model_ids: data.getAll("model_ids"),
                 evaluate: form.querySelector("[name=evaluate]").checked,
                 finetune_epochs: numberOrNull(data.get("finetune_epochs")) ?? 0 };
  const weights = (data.get("weights") || "").trim();
  if (weights) body.weights = weights.split(/[\s,]+/).filter(Boolean).map(Number);
  if (data.get("base_model_id")) body.base_model_id = data.get("base_model_id");
  if (data.get("name")) body.name = data.get("name");
  const options = (data.get("options") || "").trim();
  if (options) {
    try {
      body.options = JSON.parse(options);
    } catch {
      return { error: { loc: ["options"], msg: "not a JSON object" } };
    }
  }
  if (!form.querySelector("#fisher-settings").hidden) {
    body.fisher = { sampling: data.get("fisher.sampling"), computation: data.get("fisher.computation"),
                    seed: numberOrNull(data.get("fisher.seed")) ?? 0 };
    for (const key of ["n", "max_users"]) {
      const v = numberOrNull(data.get(`fisher.${key}`));
      if (v !== null) body.fisher[key] = v;
    }
  }
  return { body };
}

async function submitForm(event) {
  event.preventDefault();
  const form = event.currentTarget;
  clearErrors(form);
  let init;
  if (form.dataset.encoding === "multipart") {
    const data = new FormData(form);
    for (const [k, v] of [...data.entries()]) if (v === "") data.delete(k);  // unset, not empty
    init = { method: "POST", body: data };
  } else {
    const { body, error } = mergeBody(form);
    if (error) return showError(form, error.loc, error.msg);
    init = { method: "POST", body: JSON.stringify(body), headers: { "Content-Type": "application/json" } };
  }
  const button = form.querySelector("button[type=submit]");
  button.disabled = true;
  try {
    const response = await api(form.dataset.endpoint, init);
    if (!response.ok) return showErrors(form, await problem(response));
    const created = await response.json();
    window.location.assign(form.dataset.next.replace("{id}", encodeURIComponent(created.id)));
  } finally {
    button.disabled = false;
  }
}

// "always", "never", or {option: value}: the method uses it only with that option (e.g. combine: fisher).
function usedWith(rule, options) {
  if (rule === "always" || rule === "never") return rule === "always";
  return Object.entries(rule).every(([k, v]) => options[k] === v);
}

function wireMerge(form) {
  const method = form.querySelector("[name=method]");
  const options = form.querySelector("[name=options]");
  const fisher = form.querySelector("#fisher-settings");
  const base = form.querySelector("[data-field=base_model_id]");
  const help = form.querySelector("#m-options-help");
  const sync = () => {
    const chosen = method.selectedOptions[0].dataset;
    let given = {};
    try { given = JSON.parse(options.value || "{}") || {}; } catch { /* the submit reports bad JSON */ }
    fisher.hidden = !usedWith(JSON.parse(chosen.fisher), given);
    base.classList.toggle("unused", !usedWith(JSON.parse(chosen.base), given));
    help.replaceChildren(...JSON.parse(chosen.options).map((text) => {
      const li = document.createElement("li");
      li.textContent = text;
      return li;
    }));
  };
  method.addEventListener("change", sync);
  options.addEventListener("input", sync);
  sync();
}

async function cancelJob(event) {
  const button = event.currentTarget;
  button.disabled = true;
  const response = await api(button.dataset.cancel, { method: "DELETE" });
  if (!response.ok) {
    const slot = button.parentElement.querySelector(".form-error");
    slot.textContent = String(await detail(response));
    slot.hidden = false;
    button.disabled = false;
    return;
  }
  loadPart();
}

// --- recommend playground ------------------------------------------------------------------------------
function wireRecommend(form) {
  const wanted = new URLSearchParams(window.location.search).get("model");
  if (wanted) form.querySelector("[name=model]").value = wanted;
  const sync = () => {
    const byUser = form.querySelector("[name=who]:checked").value === "user";
    form.querySelector("[name=user]").disabled = !byUser;
    form.querySelector("[name=items]").disabled = byUser;
  };
  form.querySelectorAll("[name=who]").forEach((r) => r.addEventListener("change", sync));
  form.addEventListener("submit", async (event) => {
    event.preventDefault();
    clearErrors(form);
    const data = new FormData(form);
    const model = data.get("model");
    const k = Number(data.get("k") || 10);
    let response;
    if (data.get("who") === "user") {
      const user = (data.get("user") || "").trim();
      if (!user) return showError(form, ["user"], "give a user id");
      const q = new URLSearchParams({ model, k });
      response = await api(`/recommend/${encodeURIComponent(user)}?${q}`);
    } else {
      const items = (data.get("items") || "").split(/[\s,]+/).filter(Boolean);
      response = await api("/recommend", { method: "POST", headers: { "Content-Type": "application/json" },
                                           body: JSON.stringify({ model, items, k }) });
    }
    if (!response.ok) return showErrors(form, await problem(response));
    showRecommendations(form, await response.json());
  });
  sync();
}

function showRecommendations(form, result) {
  const table = form.querySelector("#recommendations");
  const tbody = table.querySelector("tbody");
  tbody.replaceChildren();
  result.items.forEach((item, i) => {
    const tr = document.createElement("tr");
    for (const [text, numeric] of [[i + 1, true], [item.item, false], [item.title ?? "–", false],
                                   [item.score.toFixed(3), true]]) {
      const td = document.createElement("td");
      td.textContent = String(text);
      if (numeric) td.className = "num";
      tr.append(td);
    }
    tbody.append(tr);
  });
  table.querySelector("caption").textContent =
    `Top ${result.items.length} for ${result.user ? `user ${result.user}` : "the typed history"}`;
  table.hidden = false;
}

// --- token -----------------------------------------------------------------------------------------------
function wireToken() {
  const form = document.getElementById("token-form");
  const input = document.getElementById("token-input");
  const state = document.getElementById("token-state");
  const show = () => { state.textContent = token() ? "token set for this tab" : ""; };
  form.addEventListener("submit", (event) => {
    event.preventDefault();
    if (input.value) sessionStorage.setItem(TOKEN_KEY, input.value);
    else sessionStorage.removeItem(TOKEN_KEY);
    input.value = "";
    show();
    loadPart();
  });
  show();
}

document.addEventListener("DOMContentLoaded", () => {
  wireToken();
  loadPart();
});
