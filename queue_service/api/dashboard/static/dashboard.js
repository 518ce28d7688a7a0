// The dashboard page: polls /dashboard/api/overview every 2 s and /dashboard/api/failures every 10 s.
// Everything is drawn with DOM text nodes, never innerHTML: messages, tags and results are other people's text.
// Throughput and latency come from the workers' cumulative counters: the page keeps the samples it saw and
// charts the differences over a sliding window (nothing is kept once the page is closed).
"use strict";
(() => {
  const OVERVIEW_MS = 2000;
  const FAILURES_MS = 10000;
  const HISTORY_MS = 5 * 60 * 1000;
  const RATE_WINDOW_MS = 10000;
  const RECENT_MINUTES = 5;
  const TOKEN_KEY = "qs-admin-token";
  const SVG = "http://www.w3.org/2000/svg";

  let token = sessionStorage.getItem(TOKEN_KEY) || "";
  // `#token=...` in the address: taken once, then dropped from the address bar and the history.
  const fromHash = new URLSearchParams(location.hash.slice(1)).get("token");
  if (fromHash) {
    token = fromHash;
    sessionStorage.setItem(TOKEN_KEY, token);
    history.replaceState(null, "", location.pathname + location.search);
  }

  const samples = new Map(); // service -> [{t, timings}]
  let knownServices = [];
  let overviewTimer = 0;
  let failuresTimer = 0;

  class Unauthorized extends Error {}

  async function api(path) {
    const headers = token ? { Authorization: "Bearer " + token } : {};
    const answer = await fetch(path, { headers, cache: "no-store" });
    if (answer.status === 401) {
      showLogin(token ? "that token was refused" : "");
      throw new Unauthorized();
    }
    if (!answer.ok) {
      let detail = String(answer.status);
      try { detail = (await answer.json()).detail || detail; } catch (_) { /* not JSON */ }
      const error = new Error(detail);
      error.status = answer.status;
      throw error;
    }
    return answer.json();
  }

  function el(tag, attrs, ...children) {
    const node = document.createElement(tag);
    for (const [key, value] of Object.entries(attrs || {})) {
      if (value === undefined || value === null) continue;
      if (key === "class") node.className = value;
      else if (key.startsWith("data-") || key === "title" || key === "href") node.setAttribute(key, value);
      else node[key] = value;
    }
    for (const child of children) {
      if (child === undefined || child === null) continue;
      node.append(child instanceof Node ? child : String(child));
    }
    return node;
  }

  function svg(tag, attrs) {
    const node = document.createElementNS(SVG, tag);
    for (const [key, value] of Object.entries(attrs || {})) node.setAttribute(key, value);
    return node;
  }

  const $ = (id) => document.getElementById(id);

  function seconds(value) {
    if (value === null || value === undefined || Number.isNaN(value)) return "–";
    if (value < 0.001) return (value * 1e6).toFixed(0) + " µs";
    if (value < 1) return (value * 1000).toFixed(value < 0.01 ? 1 : 0) + " ms";
    if (value < 120) return value.toFixed(value < 10 ? 2 : 1) + " s";
    if (value < 7200) return (value / 60).toFixed(1) + " min";
    return (value / 3600).toFixed(1) + " h";
  }

  const clock = (ms) => (ms ? new Date(ms).toLocaleTimeString() : "–");
  const stamp = (ms) => (ms ? new Date(ms).toLocaleString() : "–");

  // --- access ---------------------------------------------------------------------------

  function showLogin(problem) {
    clearTimeout(overviewTimer);
    clearTimeout(failuresTimer);
    $("main").hidden = true;
    $("login").hidden = false;
    $("login-problem").textContent = problem || "";
    $("updated").textContent = "the dashboard needs the admin token";
  }

  $("login").addEventListener("submit", (event) => {
    event.preventDefault();
    token = $("login-token").value.trim();
    sessionStorage.setItem(TOKEN_KEY, token);
    $("login").hidden = true;
    start();
  });

  // --- charts ---------------------------------------------------------------------------

  function lines(series, second) {
    const width = 300, height = 40;
    const all = series.concat(second || []).filter((v) => v !== null);
    const top = Math.max(...all, 0) || 1;
    const chart = svg("svg", { viewBox: `0 0 ${width} ${height}`, preserveAspectRatio: "none", role: "img" });
    const draw = (values, cls) => {
      if (values.length < 2) return;
      const step = width / (values.length - 1);
      const points = values
        .map((v, i) => (v === null ? null : `${(i * step).toFixed(1)},${(height - 2 - (v / top) * (height - 4)).toFixed(1)}`))
        .filter((p) => p !== null);
      chart.append(svg("polyline", { points: points.join(" "), class: cls || "" }));
    };
    draw(series);
    if (second) draw(second, "second");
    return chart;
  }

  function bars(values, cls) {
    const width = 300, height = 40;
    const top = Math.max(...values, 0) || 1;
    const chart = svg("svg", { viewBox: `0 0 ${width} ${height}`, preserveAspectRatio: "none", role: "img" });
    const step = width / values.length;
    values.forEach((v, i) => {
      const h = v ? Math.max(1.5, (v / top) * (height - 2)) : 0;
      chart.append(svg("rect", { x: (i * step + 1).toFixed(1), y: (height - h).toFixed(1), width: (step - 2).toFixed(1), height: h.toFixed(1), class: cls }));
    });
    return chart;
  }

  function chart(label, value, drawing, field) {
    return el("div", { class: "chart" }, el("div", { class: "label" }, label, el("b", { "data-field": field }, value)), drawing);
  }

  // --- services -------------------------------------------------------------------------

  function remember(service, now) {
    const list = samples.get(service.name) || [];
    if (!list.length || list[list.length - 1].t !== now) list.push({ t: now, timings: service.timings });
    while (list.length && list[0].t < now - HISTORY_MS) list.shift();
    samples.set(service.name, list);
    return list;
  }

  // Per sample: done/s and the mean queue wait and processing over the window that ends there.
  function rates(list) {
    const throughput = [], wait = [], processing = [];
    for (let i = 1; i < list.length; i++) {
      let j = i - 1;
      while (j > 0 && list[i].t - list[j - 1].t <= RATE_WINDOW_MS) j--;
      const a = list[j].timings, b = list[i].timings, dt = (list[i].t - list[j].t) / 1000;
      const done = b.total.count - a.total.count;
      throughput.push(dt > 0 ? Math.max(0, done) / dt : 0);
      const waited = b.queue_wait.count - a.queue_wait.count;
      wait.push(waited > 0 ? (b.queue_wait.sum - a.queue_wait.sum) / waited : null);
      const ran = b.processing.count - a.processing.count;
      processing.push(ran > 0 ? (b.processing.sum - a.processing.sum) / ran : null);
    }
    return { throughput, wait, processing };
  }

  const last = (values) => { for (let i = values.length - 1; i >= 0; i--) if (values[i] !== null) return values[i]; return null; };
  const isRejection = (status) => status === 450 || status === 429;
  const isError = (status) => status >= 500 || status === 408;

  function perMinute(answers, test) {
    return answers.map((minute) =>
      Object.entries(minute.counts).reduce((sum, [field, count]) => sum + (test(Number(field.split(":").pop())) ? count : 0), 0));
  }

  function number(label, value, field, title) {
    return el("div", { title }, el("span", { class: "value", "data-field": field }, value), el("span", { class: "label" }, label));
  }

  function serviceCard(service, now) {
    const series = rates(remember(service, now));
    const rejected = perMinute(service.answers, isRejection);
    const errors = perMinute(service.answers, isError);
    const recent = (values) => values.slice(-RECENT_MINUTES).reduce((a, b) => a + b, 0);
    const throughput = last(series.throughput);
    return el("article", { class: "card", "data-service": service.name },
      el("h3", {}, service.name, el("span", { class: "badge " + service.state, "data-field": "state" }, service.state)),
      service.reasons.length ? el("div", { class: "reasons" }, service.reasons.join("; ")) : null,
      el("div", { class: "numbers" },
        number("waiting", service.waiting, "waiting", `of at most ${service.maxQueueSize} (metadata.rpc.max_queue_size)`),
        number("in flight", service.inFlight, "in-flight", "held by workers now"),
        number("in the sink", service.sink.length, "sink", `results not yet read; at most ${service.sink.maxLength}`),
        number("live workers", service.liveWorkers, "live-workers"),
        number("backlog / worker", service.backlogPerWorker.toFixed(2), "backlog-per-worker", "the scaling signal"),
        number("oldest waiting", seconds(service.oldestAgeSeconds), "oldest", "age of the oldest input item"),
        number(`rejected, ${RECENT_MINUTES} min`, recent(rejected), "rejected", "answers 450 (queue full) and 429 (rate, waits)"),
        number(`errors, ${RECENT_MINUTES} min`, recent(errors), "errors", "answers 5xx and 408"),
        number("last index", service.lastIndex, "last-index")),
      el("div", { class: "charts" },
        chart("done / s", throughput === null ? "–" : throughput.toFixed(throughput < 10 ? 2 : 0), lines(series.throughput), "throughput"),
        chart("queue wait · processing (mean)", `${seconds(last(series.wait))} · ${seconds(last(series.processing))}`,
          lines(series.wait, series.processing), "latency"),
        chart("rejected (450/429) per minute", recent(rejected), bars(rejected, "rejected"), "rejected-chart"),
        chart("errors (5xx/408) per minute", recent(errors), bars(errors, "errors"), "errors-chart")));
  }

  // --- workers --------------------------------------------------------------------------

  function requestButton(service, requestId) {
    if (!requestId) return "–";
    return el("button", { class: "rid", type: "button", title: "look this request up", onclick: () => lookup(service, requestId) }, requestId);
  }

  function workerRows(workers, now) {
    const rows = [];
    for (const worker of workers) {
      const state = worker.live ? "live" : "stale";
      const title = worker.live ? "" : (worker.lapsesAt ? `no heartbeat since ${stamp(worker.lapsesAt)}` : "no heartbeat seen");
      const held = worker.holding.length ? worker.holding : [null];
      for (const item of held) {
        let since = "–";
        if (item) {
          since = item.startedAt ? seconds((now - item.startedAt) / 1000) : `≤ ${seconds((now - item.acceptedAt) / 1000)}`;
        }
        rows.push(el("tr", { class: state, "data-worker": worker.name, "data-state": state },
          el("td", {}, el("code", {}, worker.name)),
          el("td", { class: "state", title }, state),
          el("td", {}, worker.services.join(", ")),
          el("td", { "data-field": "on" }, item ? `${item.service} #${item.index}` : "idle"),
          el("td", {}, item ? requestButton(item.service, item.requestId) : "–"),
          el("td", { class: "num", title: item && !item.startedAt ? "time since the request was accepted (when it started is not known)" : "" }, since),
          el("td", { class: "num" }, item ? item.deliveries : "–")));
      }
    }
    return rows;
  }

  // --- request --------------------------------------------------------------------------

  async function lookup(service, requestId) {
    $("lookup-service").value = service || "";
    $("lookup-id").value = requestId;
    const target = $("request");
    target.replaceChildren(el("p", { class: "muted" }, "looking…"));
    const query = new URLSearchParams({ id: requestId });
    if (service) query.set("service", service);
    try {
      target.replaceChildren(requestView(await api("/dashboard/api/request?" + query)));
    } catch (error) {
      if (error instanceof Unauthorized) return;
      target.replaceChildren(el("p", { class: "bad", "data-field": "request-problem" }, error.message));
    }
  }

  function requestView(found) {
    const status = found.status;
    const facts = [["service", found.service], ["request id", status.requestId], ["state", status.state]];
    if (status.statusCode !== undefined) facts.push(["status code", status.statusCode]);
    if (status.position !== undefined) facts.push(["waiting ahead", status.position]);
    if (found.worker) facts.push(["worker", found.worker]);
    if (status.message) facts.push(["message", status.message]);
    const list = el("dl", { "data-request": status.requestId });
    for (const [name, value] of facts) {
      list.append(el("dt", {}, name), el("dd", { "data-field": name.replace(/ /g, "-") }, value));
    }
    const timeline = el("ol", { "data-field": "timeline" });
    for (const event of found.timeline) {
      timeline.append(el("li", {}, `${event.event}${event.at ? " at " + stamp(event.at) : ""}${event.statusCode !== undefined ? " (" + event.statusCode + ")" : ""}`));
    }
    const parts = [list, el("h4", {}, "timeline"), timeline];
    if (found.result) {
      const r = found.result;
      parts.push(el("h4", {}, `result (${r.size} bytes${r.truncated ? ", first part" : ""})`));
      parts.push(el("pre", { "data-field": "result" }, r.encoding === "utf-8" ? r.preview : `base64: ${r.preview}`));
      parts.push(el("p", { class: "muted" }, el("a", { href: r.link }, "the whole result"), " (needs the service's token)"));
    } else if (status.result === "removed") {
      parts.push(el("p", { class: "muted" }, "the result was read (with auto-delete), deleted or committed"));
    }
    return el("div", {}, ...parts);
  }

  $("lookup").addEventListener("submit", (event) => {
    event.preventDefault();
    lookup($("lookup-service").value, $("lookup-id").value.trim());
  });

  // --- polling --------------------------------------------------------------------------

  function render(data) {
    const names = data.services.map((s) => s.name);
    if (names.join() !== knownServices.join()) {
      knownServices = names;
      $("lookup-service").replaceChildren(el("option", { value: "" }, "any service"), ...names.map((n) => el("option", { value: n }, n)));
    }
    $("services").replaceChildren(...data.services.map((s) => serviceCard(s, data.now)));
    const rows = workerRows(data.workers, data.now);
    $("workers").tBodies[0].replaceChildren(...rows);
    $("workers-none").hidden = rows.length > 0;
    $("updated").textContent = "updated " + clock(data.now);
    $("updated").dataset.at = String(data.now);
  }

  function renderFailures(data) {
    const rows = data.failures.map((f) => el("tr", { "data-request": f.requestId },
      el("td", {}, stamp(f.finishedAt)), el("td", {}, f.service), el("td", {}, requestButton(f.service, f.requestId)),
      el("td", { class: "num", "data-field": "code" }, f.status), el("td", { "data-field": "message" }, f.message || "–")));
    $("failures").tBodies[0].replaceChildren(...rows);
    const scanned = Object.entries(data.scans).map(([name, s]) => `${name}: ${s.failed} of the newest ${s.scanned}`);
    $("failures-scan").textContent = scanned.length ? "failed results among the newest results of each sink — " + scanned.join(", ") : "";
  }

  async function pollOverview() {
    try {
      render(await api("/dashboard/api/overview"));
      $("problem").textContent = "";
    } catch (error) {
      if (error instanceof Unauthorized) return;
      $("problem").textContent = "cannot refresh: " + error.message;
    }
    overviewTimer = setTimeout(pollOverview, OVERVIEW_MS);
  }

  async function pollFailures() {
    try {
      renderFailures(await api("/dashboard/api/failures"));
    } catch (error) {
      if (error instanceof Unauthorized) return;
    }
    failuresTimer = setTimeout(pollFailures, FAILURES_MS);
  }

  function start() {
    $("main").hidden = false;
    pollOverview();
    pollFailures();
  }

  start();
})();
