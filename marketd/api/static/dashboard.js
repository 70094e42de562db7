// marketd dashboard: live tickers, chart, health, ingest rates, the selected symbol's order
// book. Read-only, no framework.
// Data is written with textContent only (never parsed as HTML); the CSP forbids inline
// script and eval. Endpoints: docs/streaming.md.
"use strict";

const HISTORY = 900;          // live points kept per symbol for the chart
const STATS_EVERY_MS = 2000;
const KLINES_EVERY_MS = 30000;
const STALE_MS = 10000;
const BOOK_DEPTH = 10;        // levels per side in the order-book panel

const state = {
  rows: new Map(),            // symbol -> {tr, cells, last}
  history: new Map(),         // symbol -> [[t_ms, price], ...]
  klines: new Map(),          // symbol -> [[open_ms, close], ...] or null (unavailable)
  selected: null,
  tickers: null,
  health: null,
  prevStats: null,
  window: [],                 // recent stats samples for "last minute" deltas
  klineNote: "",
  klinesAvailable: null,      // from /api/v1/dashboard/stats: is warm storage configured?
  books: null,                // symbols with an order book (from the stats), null: not known yet
  book: null,                 // {symbol, source, retry} of the open book stream
};

function el(tag, cls, text) {
  const node = document.createElement(tag);
  if (cls) node.className = cls;
  if (text !== undefined) node.textContent = text;
  return node;
}

function trimDecimal(text) {
  if (typeof text !== "string") return "—";
  if (text.indexOf(".") < 0) return text;
  const trimmed = text.replace(/0+$/, "").replace(/\.$/, "");
  return trimmed === "" || trimmed === "-" ? "0" : trimmed;
}

function compact(text) {
  const value = Number(text);
  if (!isFinite(value)) return "—";
  const units = [[1e12, "T"], [1e9, "B"], [1e6, "M"], [1e3, "k"]];
  for (const [size, unit] of units) {
    if (Math.abs(value) >= size) return (value / size).toFixed(2) + unit;
  }
  return value.toFixed(2);
}

function ageText(ms) {
  if (ms === null || ms === undefined || !isFinite(ms)) return "—";
  if (ms < 1000) return Math.max(0, ms) + " ms";
  if (ms < 60000) return (ms / 1000).toFixed(1) + " s";
  return Math.round(ms / 60000) + " min";
}

function sinceText(ms) {
  if (!ms) return "";
  return "since " + new Date(ms).toLocaleTimeString();
}

// -- connection state ---------------------------------------------------------------------

const streams = { tickers: "connecting", health: "connecting" };

function showConnection() {
  const conn = document.getElementById("conn");
  const text = document.getElementById("conn-text");
  const values = Object.values(streams);
  let stateName = "live";
  if (values.includes("down")) stateName = "down";
  else if (values.includes("connecting")) stateName = "connecting";
  conn.dataset.state = stateName;
  text.textContent = stateName === "live" ? "live" :
    stateName === "down" ? "disconnected — retrying" : "connecting…";
}

function banner(message) {
  const node = document.getElementById("banner");
  node.hidden = !message;
  node.textContent = message || "";
}

// An EventSource retries by itself after a dropped connection, but gives up for good on an
// error status (503 while the daemon starts or is full); then we open a new one ourselves.
function openStream(name, url, handlers) {
  let source = null;
  let retry = null;
  function connect() {
    retry = null;
    source = new EventSource(url);
    source.onopen = () => { streams[name] = "live"; showConnection(); };
    source.onerror = () => {
      streams[name] = source.readyState === EventSource.CLOSED ? "down" : "connecting";
      if (name === "tickers") markAllStale();
      showConnection();
      if (source.readyState === EventSource.CLOSED && retry === null) {
        streams[name] = "down";
        showConnection();
        retry = setTimeout(connect, 2000);
      }
    };
    for (const [event, handler] of Object.entries(handlers)) {
      source.addEventListener(event, (message) => {
        streams[name] = "live";
        showConnection();
        handler(JSON.parse(message.data));
      });
    }
  }
  connect();
}

// -- tickers ------------------------------------------------------------------------------

function ensureRow(symbol) {
  let row = state.rows.get(symbol);
  if (row) return row;
  const tr = el("tr");
  tr.dataset.symbol = symbol;
  const cells = {
    sym: el("td", "sym", symbol),
    price: el("td", "num price", "—"),
    change: el("td", "num change", "—"),
    volume: el("td", "num volume", "—"),
    age: el("td", "num age", "—"),
  };
  for (const cell of Object.values(cells)) tr.appendChild(cell);
  tr.addEventListener("click", () => select(symbol));
  document.querySelector("#tickers tbody").appendChild(tr);
  row = { tr, cells, last: null, eventTime: null, flashTimer: null };
  state.rows.set(symbol, row);
  return row;
}

function applyTicker(t) {
  const row = ensureRow(t.symbol);
  const previous = row.last;
  row.tr.classList.remove("missing");
  row.cells.price.textContent = trimDecimal(t.last_price);
  const pct = Math.round(Number(t.price_change_pct) * 100) / 100;
  row.cells.change.textContent = isFinite(pct) ? (pct > 0 ? "+" : "") + (pct === 0 ? 0 : pct).toFixed(2) + " %" : "—";
  row.cells.change.className = "num change " + (pct > 0 ? "pos" : pct < 0 ? "neg" : "");
  row.cells.volume.textContent = compact(t.volume);
  row.eventTime = t.event_time;
  row.tr.dataset.eventTime = String(t.event_time);
  row.tr.dataset.price = t.last_price;
  row.last = t.last_price;
  if (previous !== null && previous !== t.last_price) {
    const up = Number(t.last_price) >= Number(previous);
    row.tr.classList.remove("flash-up", "flash-down");
    void row.tr.offsetWidth;  // restart the transition
    row.tr.classList.add(up ? "flash-up" : "flash-down");
    clearTimeout(row.flashTimer);
    row.flashTimer = setTimeout(() => row.tr.classList.remove("flash-up", "flash-down"), 700);
  }
  const points = state.history.get(t.symbol) || [];
  const price = Number(t.last_price);
  if (isFinite(price) && t.event_time) {
    if (!points.length || points[points.length - 1][0] < t.event_time) points.push([t.event_time, price]);
    if (points.length > HISTORY) points.splice(0, points.length - HISTORY);
  }
  state.history.set(t.symbol, points);
  refreshAge(row);
  countRows();
  if (state.selected === null) select(t.symbol);
  else if (state.selected === t.symbol) drawChart();
}

function refreshAge(row) {
  if (!row.eventTime) return;
  const age = Date.now() - row.eventTime;
  row.cells.age.textContent = ageText(age);
  row.tr.classList.toggle("stale", age > STALE_MS);
}

function markAllStale() {
  for (const row of state.rows.values()) row.tr.classList.add("stale");
}

function onSnapshot(body) {
  for (const t of body.tickers) applyTicker(t);
  for (const symbol of body.missing) {
    const row = ensureRow(symbol);
    if (row.last === null) {
      row.tr.classList.add("missing");
      row.cells.price.textContent = "no data";
    }
  }
  countRows();
  banner("");
}

function countRows() {
  let withData = 0;
  for (const row of state.rows.values()) if (row.last !== null) withData++;
  const without = state.rows.size - withData;
  document.getElementById("ticker-count").textContent =
    withData + " live" + (without ? " · " + without + " without data" : "");
}

function onStatus(body) {
  banner(body.redis ? "" : "Redis is unavailable: prices may be stale (" + body.detail + ")");
}

// -- chart --------------------------------------------------------------------------------

function select(symbol) {
  state.selected = symbol;
  for (const [name, row] of state.rows) row.tr.classList.toggle("selected", name === symbol);
  document.getElementById("chart-symbol").textContent = symbol;
  loadKlines(symbol);
  drawChart();
  followBook();
}

// -- order book ---------------------------------------------------------------------------

function closeBook() {
  const current = state.book;
  state.book = null;
  if (!current) return;
  if (current.retry !== null) clearTimeout(current.retry);
  if (current.source) current.source.close();
}

// The panel follows the selected symbol's book stream: hidden when this daemon keeps no
// books, "no order book" for a symbol without one.
function followBook() {
  const panel = document.getElementById("book");
  const symbol = state.selected;
  if (state.books === null || state.books.length === 0 || symbol === null) {
    closeBook();
    panel.hidden = true;
    return;
  }
  panel.hidden = false;
  document.getElementById("book-symbol").textContent = symbol;
  if (!state.books.includes(symbol)) {
    closeBook();
    renderBook(symbol, null, "no order book is kept for " + symbol);
    return;
  }
  if (state.book && state.book.symbol === symbol) return;
  closeBook();
  renderBook(symbol, null, "connecting…");
  openBook(symbol);
}

function openBook(symbol) {
  const entry = { symbol: symbol, source: null, retry: null };
  state.book = entry;
  const url = "/api/v1/stream/book/" + encodeURIComponent(symbol) + "?depth=" + BOOK_DEPTH;
  const source = new EventSource(url);
  entry.source = source;
  const live = () => state.book === entry;
  source.addEventListener("snapshot", (message) => {
    if (!live()) return;
    const body = JSON.parse(message.data);
    renderBook(symbol, body.book, body.book ? "" : "no book stored yet");
  });
  source.addEventListener("book", (message) => {
    if (live()) renderBook(symbol, JSON.parse(message.data), "");
  });
  source.addEventListener("status", (message) => {
    const body = JSON.parse(message.data);
    if (live() && !body.redis) document.getElementById("book-note").textContent = "Redis unavailable";
  });
  source.onerror = () => {
    if (!live()) return;
    document.getElementById("book-note").textContent = "reconnecting…";
    // EventSource gives up on an error status (503 while full or starting): retry ourselves.
    if (source.readyState === EventSource.CLOSED && entry.retry === null) {
      entry.retry = setTimeout(() => { if (live()) { state.book = null; followBook(); } }, 2000);
    }
  };
}

function fillSide(tbody, levels, side) {
  const rows = [];
  for (const level of levels) {
    const tr = el("tr");
    const price = el("td", "num " + side, trimDecimal(level[0]));
    const qty = el("td", "num", trimDecimal(level[1]));
    if (side === "bid") tr.append(qty, price); else tr.append(price, qty);
    rows.push(tr);
  }
  tbody.replaceChildren(...rows);
}

function renderBook(symbol, book, note) {
  const badge = document.getElementById("book-badge");
  const body = document.getElementById("book-body");
  const empty = document.getElementById("book-empty");
  const bids = document.querySelector("#book-bids tbody");
  const asks = document.querySelector("#book-asks tbody");
  if (!book) {
    badge.dataset.sync = "none";
    badge.textContent = "";
    body.hidden = true;
    empty.hidden = false;
    empty.textContent = note;
    document.getElementById("book-note").textContent = "";
    fillSide(bids, [], "bid");
    fillSide(asks, [], "ask");
    return;
  }
  body.hidden = false;
  empty.hidden = true;
  badge.dataset.sync = book.in_sync ? "true" : "false";
  badge.textContent = book.in_sync ? "in sync" : "out of sync: " + (book.reason || "unknown");
  body.dataset.sync = book.in_sync ? "true" : "false";
  fillSide(bids, book.bids || [], "bid");
  fillSide(asks, book.asks || [], "ask");
  document.getElementById("book-note").textContent =
    note || "update " + String(book.last_update_id) + " · " + ageText(book.age_ms) + " old";
}

async function loadKlines(symbol) {
  if (state.klinesAvailable !== true) {
    state.klineNote = state.klinesAvailable === false ? "no klines: analytics storage not configured" : "";
    return;
  }
  try {
    const response = await fetch("/api/v1/market/" + encodeURIComponent(symbol) + "/klines?interval=1m&limit=120");
    if (!response.ok) {
      state.klines.set(symbol, null);
      state.klineNote = response.status === 404 ? "klines: no analytics API" : "klines unavailable (" + response.status + ")";
    } else {
      const body = await response.json();
      const bars = body.klines.map((k) => [k.open_time, Number(k.close)]).filter((p) => isFinite(p[1]));
      state.klines.set(symbol, bars);
      state.klineNote = bars.length ? bars.length + " one-minute klines" : "no klines yet";
    }
  } catch (err) {
    state.klines.set(symbol, null);
    state.klineNote = "klines unavailable";
  }
  if (state.selected === symbol) drawChart();
}

function drawChart() {
  const canvas = document.getElementById("chart");
  const ratio = window.devicePixelRatio || 1;
  const width = canvas.clientWidth, height = canvas.clientHeight;
  if (canvas.width !== Math.round(width * ratio)) {
    canvas.width = Math.round(width * ratio);
    canvas.height = Math.round(height * ratio);
  }
  const ctx = canvas.getContext("2d");
  ctx.setTransform(ratio, 0, 0, ratio, 0, 0);
  ctx.clearRect(0, 0, width, height);
  const symbol = state.selected;
  const live = (symbol && state.history.get(symbol)) || [];
  const bars = (symbol && state.klines.get(symbol)) || [];
  const note = document.getElementById("chart-note");
  note.textContent = live.length + " live points" + (state.klineNote ? " · " + state.klineNote : "");
  const all = live.concat(bars);
  const pad = { l: 8, r: 78, t: 12, b: 22 };
  ctx.font = "11px system-ui, sans-serif";
  if (all.length < 1) {
    ctx.fillStyle = "#8592ad";
    ctx.fillText("waiting for data…", width / 2 - 48, height / 2);
    return;
  }
  let t0 = Math.min(...all.map((p) => p[0])), t1 = Math.max(...all.map((p) => p[0]));
  let lo = Math.min(...all.map((p) => p[1])), hi = Math.max(...all.map((p) => p[1]));
  if (t1 - t0 < 60000) t0 = t1 - 60000;
  if (hi === lo) { hi += Math.abs(hi) * 0.0005 || 1; lo -= Math.abs(lo) * 0.0005 || 1; }
  const span = hi - lo; hi += span * 0.08; lo -= span * 0.08;
  const x = (t) => pad.l + (t - t0) / (t1 - t0 || 1) * (width - pad.l - pad.r);
  const y = (v) => pad.t + (hi - v) / (hi - lo) * (height - pad.t - pad.b);
  ctx.strokeStyle = "#1f2a44"; ctx.fillStyle = "#8592ad"; ctx.lineWidth = 1;
  for (let i = 0; i <= 4; i++) {
    const v = lo + (hi - lo) * i / 4, yy = Math.round(y(v)) + 0.5;
    ctx.beginPath(); ctx.moveTo(pad.l, yy); ctx.lineTo(width - pad.r, yy); ctx.stroke();
    ctx.fillText(v.toPrecision(7), width - pad.r + 6, yy + 4);
  }
  for (let i = 0; i <= 3; i++) {
    const t = t0 + (t1 - t0) * i / 3;
    ctx.fillText(new Date(t).toLocaleTimeString(), Math.min(x(t), width - pad.r - 50), height - 6);
  }
  function line(points, color, widthPx, step) {
    if (!points.length) return;
    ctx.strokeStyle = color; ctx.lineWidth = widthPx; ctx.beginPath();
    points.forEach((p, i) => {
      if (i === 0) ctx.moveTo(x(p[0]), y(p[1]));
      else { if (step) ctx.lineTo(x(p[0]), y(points[i - 1][1])); ctx.lineTo(x(p[0]), y(p[1])); }
    });
    ctx.stroke();
  }
  line(bars, "#a78bfa", 1.5, true);
  line(live, "#60a5fa", 2, false);
  if (live.length) {
    const last = live[live.length - 1];
    ctx.fillStyle = "#60a5fa";
    ctx.beginPath(); ctx.arc(x(last[0]), y(last[1]), 3.5, 0, Math.PI * 2); ctx.fill();
  }
}

// -- health -------------------------------------------------------------------------------

function reasonOf(record) {
  return record.reason || record.detail || (record.healthy ? "ok" : "unhealthy");
}

function onHealth(body) {
  const list = document.getElementById("health");
  const items = Object.entries(body.components).map(([name, record]) => [name, record]);
  items.push(["push stream", { healthy: body.stream.redis, detail: body.stream.detail,
    since_ms: body.stream.since_ms, extra: body.stream.clients + (body.stream.clients === 1 ? " client" : " clients") }]);
  list.replaceChildren();
  let bad = 0;
  for (const [name, record] of items) {
    const li = el("li");
    const healthy = record.healthy === true;
    if (!healthy) bad++;
    li.dataset.component = name;
    li.dataset.healthy = String(healthy);
    li.appendChild(el("span", "dot"));
    li.appendChild(el("span", "name", name));
    const reason = el("span", "reason", reasonOf(record));
    reason.title = reasonOf(record);
    li.appendChild(reason);
    const since = record.since_ms || record.since || null;
    li.appendChild(el("span", "since", record.extra ? record.extra : sinceText(since)));
    list.appendChild(li);
  }
  for (const [name, dep] of Object.entries(body.dependencies || {})) {
    const li = el("li", "dep");
    li.dataset.dependency = name;
    li.dataset.healthy = String(dep.up === true);
    li.appendChild(el("span", "dot"));
    li.appendChild(el("span", "name", name));
    const reason = el("span", "reason", dep.reason || (dep.up ? "reachable" : "unreachable"));
    reason.title = reason.textContent;
    li.appendChild(reason);
    li.appendChild(el("span", "since", dep.since ? sinceText(Date.parse(dep.since)) : ""));
    list.appendChild(li);
  }
  document.getElementById("health-note").textContent = bad ? bad + " unhealthy" : "all healthy";
}

// -- ingest stats -------------------------------------------------------------------------

function total(series, name, filter) {
  const values = series[name];
  if (!values) return null;
  let sum = 0;
  for (const [labels, value] of Object.entries(values)) if (!filter || filter(labels)) sum += value;
  return sum;
}

function kv(dl, rows) {
  dl.replaceChildren();
  for (const [key, value] of rows) {
    dl.appendChild(el("dt", null, key));
    dl.appendChild(el("dd", null, value));
  }
}

function onStats(body) {
  const now = body.now_ms;
  const books = Array.isArray(body.books) ? body.books : [];
  if (state.books === null || state.books.join(",") !== books.join(",")) {
    state.books = books;
    followBook();
  }
  if (state.klinesAvailable !== body.klines) {
    state.klinesAvailable = body.klines;
    if (state.selected) loadKlines(state.selected);
  }
  state.window.push(body);
  while (state.window.length > 1 && now - state.window[0].now_ms > 60000) state.window.shift();
  const prev = state.prevStats;
  state.prevStats = body;
  const s = body.series;
  const rate = (name, filter) => {
    const cur = total(s, name, filter);
    if (cur === null) return "—";
    if (!prev) return "…";
    const before = total(prev.series, name, filter) || 0;
    const seconds = (now - prev.now_ms) / 1000;
    return seconds > 0 ? ((cur - before) / seconds).toFixed(1) + " /s" : "…";
  };
  const ingest = document.getElementById("ingest");
  if (!body.components.includes("ingest")) {
    document.getElementById("ingest-note").textContent = "not running in this process";
  } else {
    document.getElementById("ingest-note").textContent = "this process";
  }
  kv(ingest, [
    ["trades decoded", rate("decode_records", (l) => l.includes("kind=trade"))],
    ["tickers decoded", rate("decode_records", (l) => l.includes("kind=ticker"))],
    ["klines decoded", rate("decode_records", (l) => l.includes("kind=kline"))],
    ["records to Kafka", rate("kafka_produced")],
    ["WebSocket reconnects", String(total(s, "ws_reconnects") ?? "—")],
    ["ticker consumer lag", String(total(s, "tickers_consumer_lag") ?? "—")],
    ["stream clients", String(total(s, "stream_clients") ?? 0)],
  ]);
  const first = state.window[0];
  const recent = (name, filter) => {
    const cur = total(s, name, filter);
    if (cur === null) return "—";
    const before = total(first.series, name, filter) || 0;
    return String(cur) + " · +" + String(cur - before);
  };
  kv(document.getElementById("gaps"), [
    ["gaps found", recent("gaps")],
    ["gaps repaired", recent("gaps", (l) => l.includes("repaired=true") || l.includes("repaired=yes"))],
    ["backfill requests", recent("backfill_requests")],
    ["backfill failures", recent("backfill_requests", (l) => !l.includes("outcome=ok") && !l.includes("outcome=done"))],
    ["records backfilled", recent("backfill_records")],
    ["slow stream clients dropped", recent("stream_dropped_clients")],
  ]);
}

async function pollStats() {
  try {
    const response = await fetch("/api/v1/dashboard/stats", { cache: "no-store" });
    if (response.ok) onStats(await response.json());
  } catch (err) {
    // the daemon is restarting: the streams show the disconnected state
  }
}

// -- start ---------------------------------------------------------------------------------

function start() {
  openStream("tickers", "/api/v1/stream/tickers", {
    snapshot: onSnapshot, ticker: applyTicker, status: onStatus,
  });
  openStream("health", "/api/v1/stream/health", { health: onHealth });
  pollStats();
  setInterval(pollStats, STATS_EVERY_MS);
  setInterval(() => { for (const row of state.rows.values()) refreshAge(row); }, 500);
  setInterval(() => { if (state.selected) loadKlines(state.selected); }, KLINES_EVERY_MS);
  window.addEventListener("resize", drawChart);
}

document.addEventListener("DOMContentLoaded", start);
