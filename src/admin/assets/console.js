// qrgate console: live POS table and event feed over SSE, and the sale
// page's cancel and refund buttons. Uses only the admin API.
"use strict";
// Only a login session has a CSRF token; without a token there is none.
const csrfMeta = document.querySelector('meta[name="csrf-token"]');
const csrf = csrfMeta ? csrfMeta.content : "";
// A session that ended (idle, logged out elsewhere): back to the login form.
const ended = r => { if (r.status === 401) { location.assign("/"); return true; } return false; };
const tz = document.querySelector('meta[name="timezone"]').content;
const main = document.querySelector("main");
// Times are written one way everywhere, as the server writes them:
// "2026-12-03 14:05:09" in the console's zone (named once per page).
const stamp = new Intl.DateTimeFormat("sv-SE", {timeZone: tz, year: "numeric", month: "2-digit", day: "2-digit", hour: "2-digit", minute: "2-digit", second: "2-digit", hourCycle: "h23"});
const fmt = ms => ms ? stamp.format(new Date(ms)) : "";
const devices = {online: "online", offline: "offline", never_seen: "never seen", no_presence: "no presence reported"};
const age = s => s < 60 ? s + " s" : s < 3600 ? Math.floor(s / 60) + " min" : Math.floor(s / 3600) + " h";
function el(tag, text, cls) { const e = document.createElement(tag); if (text !== undefined) e.textContent = text; if (cls) e.className = cls; return e; }

async function refreshPos() {
  const r = await fetch("/api/pos", {credentials: "same-origin"});
  if (ended(r) || !r.ok) return;
  const data = await r.json();
  for (const k of ["pending", "paid_undelivered", "refund_due"]) document.getElementById("count-" + k).textContent = data.counts[k];
  document.getElementById("mp-banner").hidden = data.mercadopago !== "token_refused";
  const body = document.querySelector("#pos tbody");
  body.replaceChildren();
  const sel = document.getElementById("feed-pos");
  for (const p of data.pos) {
    const tr = el("tr"); tr.id = "pos-" + p.id; tr.dataset.pos = p.id;
    const name = el("td"); const link = el("a", p.id); link.href = "/pos/" + encodeURIComponent(p.id); name.append(link);
    tr.append(name, el("td", p.kind + (p.mode === "attended" ? " (attended)" : "")));
    const device = el("td", (devices[p.device] || p.device) + (p.since ? " since " + fmt(p.since) : ""), p.device === "online" ? "" : "offline");
    device.dataset.device = p.device;
    tr.append(device);
    const s = p.sale;
    const state = s ? (s.attention || s.state) : "idle";
    const td = el("td", "", "state " + state);
    if (s) { const a = el("a", state); a.href = "/sales/" + s.external_reference; td.append(a); } else td.textContent = "idle";
    td.dataset.state = state;
    tr.append(td, el("td", s && s.amount ? s.amount + " " + s.currency : ""), el("td", s ? age(s.age_secs) : ""));
    const r = p.last_rejection;
    const rej = el("td", r ? r.code + " at " + fmt(r.at) : "", r ? "rejection" : "");
    if (r) rej.title = r.message;
    tr.append(rej);
    body.append(tr);
    if (![...sel.options].some(o => o.value === p.id)) { const o = el("option", p.id); o.value = p.id; sel.append(o); }
  }
  const owing = document.querySelector("#owing tbody");
  owing.replaceChildren();
  for (const s of data.owing || []) {
    const tr = el("tr"); tr.dataset.reference = s.external_reference;
    const td = el("td"); const a = el("a", s.external_reference); a.href = "/sales/" + s.external_reference; td.append(a);
    tr.append(td, el("td", s.pos), el("td", s.state, "state " + s.state), el("td", s.owed + " " + s.currency), el("td", age(s.age_secs)));
    owing.append(tr);
  }
}

let pending = null;
function soon() { if (!pending) pending = setTimeout(() => { pending = null; refreshPos(); }, 200); }

function feed(ev) {
  const list = document.getElementById("feed");
  const li = el("li", fmt(ev.at) + "  " + ev.pos + "  " + ev.kind + ": " + ev.detail);
  li.dataset.pos = ev.pos;
  const f = document.getElementById("feed-pos").value;
  if (f && f !== ev.pos) li.hidden = true;
  list.prepend(li);
  while (list.children.length > 200) list.lastChild.remove();
}

function live(onEvent) {
  const src = new EventSource("/api/events");
  const mark = document.getElementById("live");
  src.onopen = () => { if (mark) { mark.textContent = "live"; mark.className = "on"; } };
  src.onerror = () => {
    if (mark) { mark.textContent = "reconnecting"; mark.className = "off"; }
    // The stream closes when the session ends: find out which it was.
    fetch("/api/pos", {credentials: "same-origin"}).then(ended, () => {});
  };
  src.onmessage = m => onEvent(JSON.parse(m.data));
  src.addEventListener("lagged", () => onEvent(null));
}

async function act(path, body) {
  const out = document.getElementById("action-result");
  const headers = {"Content-Type": "application/json", "Idempotency-Key": crypto.randomUUID ? crypto.randomUUID() : String(Date.now()) + Math.random()};
  if (csrf) headers["X-CSRF-Token"] = csrf;
  const r = await fetch(path, {method: "POST", credentials: "same-origin", headers, body: body ? JSON.stringify(body) : ""});
  if (ended(r)) return;
  const data = await r.json().catch(() => ({}));
  out.textContent = r.ok ? "Done." : (data.message || ("failed: " + r.status));
  out.className = r.ok ? "" : "error";
  if (r.ok) setTimeout(() => location.reload(), 300);
}

if (main.dataset.page === "index") {
  document.getElementById("feed-pos").onchange = e => {
    for (const li of document.getElementById("feed").children) li.hidden = !!e.target.value && li.dataset.pos !== e.target.value;
  };
  refreshPos();
  live(ev => { if (ev) feed(ev); soon(); });
} else if (main.dataset.page === "sale") {
  const ref = main.dataset.reference;
  const cancel = document.getElementById("cancel");
  // Mercado Pago showed a served sale to a phone: its customer may be paying.
  const warn = c => c.dataset.served === "true" ? "Mercado Pago already showed this sale to a customer, who may be paying it right now. A payment after the cancel is owed back. " : "";
  if (cancel) cancel.onclick = () => { if (confirm(warn(cancel) + "Cancel sale " + ref + "?")) act("/api/sales/" + ref + "/cancel"); };
  const owed = document.getElementById("refund-owed");
  if (owed) owed.onclick = () => {
    if (confirm("Refund the " + owed.dataset.owed + " sale " + ref + " owes to the customer?")) act("/api/sales/" + ref + "/refund", null);
  };
  const form = document.getElementById("refund-form");
  if (form) form.onsubmit = e => {
    e.preventDefault();
    const amount = document.getElementById("refund-amount").value.trim();
    // With money owed, an empty body refunds that: what was kept needs an amount.
    if (!amount && form.dataset.owed === "true") return;
    const what = amount ? amount : "all that is left";
    if (confirm("Refund " + what + " of sale " + ref + " to the customer?")) act("/api/sales/" + ref + "/refund", amount ? {amount} : null);
  };
  live(ev => { if (ev && ev.external_reference === ref) setTimeout(() => location.reload(), 300); });
} else if (main.dataset.page === "pos") {
  live(ev => { if (ev && ev.pos === main.dataset.pos) setTimeout(() => location.reload(), 300); });
}
