// The iotpipe dashboard: reads the query API of the server that serves it
// and draws with its own SVG code. No dependencies, no build step.
//
// - api(): every request, with the bearer token once the API asked for one.
// - overview: the chosen fleet's device count, rates from successive
//   /metrics scrapes, rejections, stream lag.
// - series: fleet (typed: the API lists devices one fleet at a time) ->
//   device -> metric pickers, windows at a resolution,
//   drawn as an average line over a min-max band, and listed in a table.
"use strict";

(() => {
  const REFRESH_MS = 5000;
  const TOKEN_KEY = "iotpipe.token";
  const MINUTE = 60_000;
  const HOUR = 60 * MINUTE;
  const DAY = 24 * HOUR;
  /** Each resolution with the range it shows: about 150-300 windows. */
  const RANGES = {
    "1m": { ms: MINUTE, span: 3 * HOUR },
    "5m": { ms: 5 * MINUTE, span: DAY },
    "1h": { ms: HOUR, span: 7 * DAY },
    "1d": { ms: DAY, span: 180 * DAY },
  };
  /** Most devices listed for the overview; more shows as "N+". */
  const DEVICE_SCAN_MAX = 10_000;

  const $ = (id) => document.getElementById(id);
  const SVG_NS = "http://www.w3.org/2000/svg";

  const state = {
    fleet: null,
    device: null,
    metric: null,
    res: "1m",
    /** The previous /metrics scrape, for rates. */
    lastScrape: null,
    busy: false,
    /** A refresh was asked for while one ran: run again when it ends. */
    again: false,
    /** The windows last loaded, to redraw on resize without a request. */
    data: null,
    /** What is on screen, for hover. */
    plotted: null,
    /** Where the pointer rests over the chart, so a redraw keeps the hover. */
    pointerX: null,
  };

  // ---- API access -------------------------------------------------------

  class AuthError extends Error {}

  class ApiError extends Error {
    constructor(status, detail) {
      super(`the API answered ${status}: ${detail}`);
      this.status = status;
    }
  }

  function token() {
    return sessionStorage.getItem(TOKEN_KEY);
  }

  async function api(path, asText = false) {
    const headers = { Accept: asText ? "text/plain" : "application/json" };
    const t = token();
    if (t) headers.Authorization = `Bearer ${t}`;
    const resp = await fetch(path, { headers, cache: "no-store" });
    if (resp.status === 401) {
      askForToken(t ? "That token was refused; enter another." : "This API needs a token.");
      throw new AuthError("a token is needed");
    }
    if (!resp.ok) {
      let detail = resp.statusText;
      try {
        const problem = await resp.json();
        detail = problem.detail || problem.title || detail;
      } catch (_) {
        // Not a problem document; the status text will do.
      }
      throw new ApiError(resp.status, detail);
    }
    return asText ? resp.text() : resp.json();
  }

  function askForToken(why) {
    $("token-why").textContent = why;
    $("token-form").hidden = false;
    setStatus("Waiting for an API token.", false);
  }

  function setStatus(text, isError) {
    const s = $("status");
    s.textContent = text;
    s.classList.toggle("error", Boolean(isError));
  }

  // ---- Prometheus text --------------------------------------------------

  /** Parses exposition text into name -> [{labels, value}]. */
  function parseMetrics(text) {
    const out = new Map();
    for (const line of text.split("\n")) {
      if (!line || line.startsWith("#")) continue;
      const m = line.match(/^([A-Za-z_:][A-Za-z0-9_:]*)(\{([^}]*)\})?\s+(\S+)/);
      if (!m) continue;
      const labels = {};
      if (m[3]) {
        for (const l of m[3].matchAll(/([A-Za-z_][A-Za-z0-9_]*)="((?:[^"\\]|\\.)*)"/g)) {
          labels[l[1]] = l[2];
        }
      }
      const value = Number(m[4]);
      if (!out.has(m[1])) out.set(m[1], []);
      out.get(m[1]).push({ labels, value });
    }
    return out;
  }

  function total(metrics, name) {
    const series = metrics.get(name);
    return series ? series.reduce((sum, s) => sum + s.value, 0) : null;
  }

  // ---- Formatting -------------------------------------------------------

  const numberFormat = new Intl.NumberFormat("en-US", { maximumSignificantDigits: 6 });
  const intFormat = new Intl.NumberFormat("en-US");
  const rateFormat = new Intl.NumberFormat("en-US", { maximumFractionDigits: 1 });

  function fmt(v) {
    return v === null || v === undefined || Number.isNaN(v) ? "–" : numberFormat.format(v);
  }

  function pad(n) {
    return String(n).padStart(2, "0");
  }

  /** UTC, because windows are aligned to the UTC epoch. */
  function utc(ms, withDate = true) {
    const d = new Date(ms);
    const time = `${pad(d.getUTCHours())}:${pad(d.getUTCMinutes())}`;
    if (!withDate) return time;
    return `${d.getUTCFullYear()}-${pad(d.getUTCMonth() + 1)}-${pad(d.getUTCDate())} ${time}`;
  }

  function utcDay(ms) {
    const d = new Date(ms);
    return `${d.toLocaleString("en-US", { month: "short", timeZone: "UTC" })} ${d.getUTCDate()}`;
  }

  // ---- Overview ---------------------------------------------------------

  /** A fleet's devices up to DEVICE_SCAN_MAX, following the cursor. */
  async function listDevices(fleet) {
    const devices = [];
    let cursor = null;
    do {
      const q = new URLSearchParams({ limit: "1000", fleet });
      if (cursor) q.set("cursor", cursor);
      const page = await api(`/v1/devices?${q}`);
      devices.push(...page.devices);
      cursor = page.next_cursor;
    } while (cursor && devices.length < DEVICE_SCAN_MAX);
    return { devices, more: Boolean(cursor) };
  }

  async function refreshOverview() {
    const [text, stats, listed] = await Promise.all([
      api("/metrics", true),
      api("/v1/stats"),
      // No fleet chosen yet: nothing to list.
      state.fleet ? listDevices(state.fleet) : { devices: [], more: false },
    ]);
    const metrics = parseMetrics(text);
    const now = performance.now();
    const scrape = {
      at: now,
      messages: total(metrics, "iotpipe_mqtt_messages_received_total"),
      readings: total(metrics, "iotpipe_processor_readings_accepted_total"),
    };
    const prev = state.lastScrape;
    if (prev && now > prev.at) {
      const secs = (now - prev.at) / 1000;
      const rate = (a, b) => (a === null || b === null ? "–" : rateFormat.format(Math.max(0, (a - b) / secs)));
      $("message-rate").textContent = rate(scrape.messages, prev.messages);
      $("reading-rate").textContent = rate(scrape.readings, prev.readings);
    }
    state.lastScrape = scrape;

    const fleets = state.fleet ? [state.fleet] : [];
    const plus = listed.more ? "+" : "";
    $("fleet-count").textContent = String(fleets.length);
    $("device-count").textContent = `${intFormat.format(listed.devices.length)}${plus}`;
    $("accepted").textContent = intFormat.format(stats.accepted_readings);
    $("duplicates").textContent = intFormat.format(stats.duplicate_readings);

    const reasons = Object.entries(stats.rejected)
      .filter(([, n]) => n > 0)
      .sort((a, b) => b[1] - a[1]);
    fillRows(
      $("rejections"),
      reasons.map(([reason, n]) => ({ cells: [reason, intFormat.format(n)], data: { reason, count: n } })),
      "No rejections",
    );

    const behind = metrics.get("iotpipe_stream_records_behind") || [];
    const ages = new Map(
      (metrics.get("iotpipe_stream_iterator_age_seconds") || []).map((s) => [s.labels.shard, s.value]),
    );
    fillRows(
      $("lag"),
      behind
        .slice()
        .sort((a, b) => (a.labels.shard < b.labels.shard ? -1 : 1))
        .map((s) => ({
          cells: [s.labels.shard, intFormat.format(s.value), fmt(ages.get(s.labels.shard) ?? null)],
          data: { shard: s.labels.shard, behind: s.value },
        })),
      "No shard has been read yet",
    );
    fillRows(
      $("statuses"),
      statusCounts(metrics, listed.devices).map(([fleet, c]) => ({
        cells: [fleet, intFormat.format(c.online), intFormat.format(c.stale), intFormat.format(c.offline)],
        data: { fleet, online: c.online, stale: c.stale, offline: c.offline },
      })),
      "No devices yet",
    );
    return fleets;
  }

  /**
   * Devices per fleet by status: every fleet's from /metrics
   * (iotpipe_api_devices), or, where the API does not count them (on AWS),
   * the chosen fleet's from its listed devices.
   */
  function statusCounts(metrics, listed) {
    const counts = new Map();
    const of = (fleet) => {
      if (!counts.has(fleet)) counts.set(fleet, { online: 0, stale: 0, offline: 0 });
      return counts.get(fleet);
    };
    const series = metrics.get("iotpipe_api_devices");
    if (series) {
      for (const s of series) {
        if (s.labels.status in of(s.labels.fleet)) of(s.labels.fleet)[s.labels.status] = s.value;
      }
    } else if (state.fleet) {
      for (const d of listed) if (d.status in of(state.fleet)) of(state.fleet)[d.status] += 1;
    }
    return [...counts.entries()].sort((a, b) => (a[0] < b[0] ? -1 : 1));
  }

  /** Replaces a table's body; cells align like their column's header. */
  function fillRows(table, rows, emptyText) {
    const heads = [...table.tHead.rows[0].cells];
    const body = table.tBodies[0];
    body.replaceChildren();
    if (rows.length === 0) {
      const td = document.createElement("td");
      td.colSpan = heads.length;
      td.className = "empty";
      td.textContent = emptyText;
      body.insertRow().append(td);
      return;
    }
    for (const row of rows) {
      const tr = body.insertRow();
      for (const [k, v] of Object.entries(row.data || {})) tr.dataset[k] = v;
      row.cells.forEach((c, i) => {
        const td = tr.insertCell();
        td.textContent = c;
        td.className = heads[i] ? heads[i].className : "";
      });
    }
  }

  // ---- Pickers ----------------------------------------------------------

  /** Fills a select, keeping `want` if offered, else the first option. */
  function fillSelect(select, values, want) {
    const have = [...select.options].map((o) => o.value);
    if (have.length !== values.length || have.some((v, i) => v !== values[i])) {
      select.replaceChildren(...values.map((v) => new Option(v, v)));
    }
    const pick = values.includes(want) ? want : values[0] ?? null;
    select.value = pick ?? "";
    select.disabled = values.length === 0;
    return pick;
  }

  async function refreshPickers(fleets) {
    const devices = state.fleet ? (await listDevices(state.fleet)).devices.map((d) => d.device_id) : [];
    state.device = fillSelect($("device"), devices.sort(), state.device);
    let metrics = [];
    if (state.device) {
      const d = await api(`/v1/devices/${encodeURIComponent(state.device)}`);
      metrics = Object.keys(d.metrics).sort();
    }
    state.metric = fillSelect($("metric"), metrics, state.metric);
    for (const r of document.querySelectorAll('input[name="res"]')) r.checked = r.value === state.res;
    rememberSelection();
  }

  /** Keeps the selection in the address, so a reload or a link shows the same. */
  function rememberSelection() {
    const q = new URLSearchParams();
    for (const k of ["fleet", "device", "metric", "res"]) if (state[k]) q.set(k, state[k]);
    history.replaceState(null, "", `${location.pathname}?${q}`);
  }

  // ---- Series -----------------------------------------------------------

  async function loadWindows() {
    const { ms, span } = RANGES[state.res];
    // Up to the end of the current window, so the open one shows too.
    const to = Math.floor(Date.now() / ms) * ms + ms;
    const from = to - span;
    const windows = [];
    let cursor = null;
    do {
      const q = new URLSearchParams({
        res: state.res,
        from: String(from),
        to: String(to),
        agg: "count,min,max,avg,final",
      });
      if (cursor) q.set("cursor", cursor);
      const path = `/v1/devices/${encodeURIComponent(state.device)}/metrics/${encodeURIComponent(state.metric)}`;
      const page = await api(`${path}?${q}`);
      windows.push(...page.windows);
      cursor = page.next_cursor;
    } while (cursor);
    return { windows, from, to, ms };
  }

  async function refreshSeries() {
    state.data = state.device && state.metric ? await loadWindows() : null;
    drawChart(state.data);
    fillTable(state.data);
  }

  function fillTable(data) {
    const table = $("chart-table");
    table.caption.textContent = data
      ? `${state.device} ${state.metric} per ${state.res}, ${utc(data.from)} to ${utc(data.to)} UTC`
      : "No series selected";
    const windows = data ? data.windows : [];
    table.dataset.windows = String(windows.length);
    table.dataset.series = data ? `${state.device}|${state.metric}|${state.res}` : "";
    fillRows(
      table,
      windows.map((w) => ({
        cells: [utc(w.start), intFormat.format(w.count), fmt(w.min), fmt(w.avg), fmt(w.max), w.final ? "yes" : "no"],
        data: { start: w.start, count: w.count, min: w.min, avg: w.avg, max: w.max },
      })),
      "No windows in this range",
    );
  }

  // ---- Chart ------------------------------------------------------------

  function svg(name, attrs, parent) {
    const el = document.createElementNS(SVG_NS, name);
    for (const [k, v] of Object.entries(attrs)) el.setAttribute(k, v);
    if (parent) parent.append(el);
    return el;
  }

  /** About `count` round steps covering [lo, hi]. */
  function niceTicks(lo, hi, count) {
    if (lo === hi) {
      const d = Math.abs(lo) > 0 ? Math.abs(lo) * 0.1 : 1;
      lo -= d;
      hi += d;
    }
    const raw = (hi - lo) / count;
    const mag = 10 ** Math.floor(Math.log10(raw));
    const step = [1, 2, 2.5, 5, 10].map((m) => m * mag).find((s) => s >= raw);
    const start = Math.floor(lo / step) * step;
    const end = Math.ceil(hi / step) * step;
    const ticks = [];
    for (let v = start; v <= end + step / 2; v += step) ticks.push(Number(v.toPrecision(12)));
    return { lo: start, hi: end, ticks };
  }

  const TIME_STEPS = [
    MINUTE, 2 * MINUTE, 5 * MINUTE, 10 * MINUTE, 15 * MINUTE, 30 * MINUTE,
    HOUR, 2 * HOUR, 3 * HOUR, 6 * HOUR, 12 * HOUR,
    DAY, 2 * DAY, 7 * DAY, 14 * DAY, 30 * DAY,
  ];

  function timeTicks(from, to, count) {
    const step = TIME_STEPS.find((s) => (to - from) / s <= count) || 30 * DAY;
    const ticks = [];
    for (let t = Math.ceil(from / step) * step; t <= to; t += step) ticks.push(t);
    return { step, ticks };
  }

  function drawChart(data) {
    const box = $("chart");
    box.replaceChildren();
    $("tooltip").hidden = true;
    state.plotted = null;
    const caption = $("chart-caption");
    if (!data) {
      caption.textContent = "Pick a device and a metric.";
      return;
    }
    const W = box.clientWidth || 900;
    const H = box.clientHeight || 320;
    const m = { top: 12, right: 16, bottom: 28, left: 56 };
    const root = svg("svg", {
      viewBox: `0 0 ${W} ${H}`,
      role: "img",
      "aria-label": `${state.metric} of ${state.device}: average with min-max band per ${state.res}; the table below lists the values`,
    }, box);
    const windows = data.windows.filter((w) => w.count > 0);
    caption.textContent = windows.length
      ? `${state.device} · ${state.metric} · ${state.res} windows · line: average, band: min to max · times in UTC`
      : `No ${state.metric} windows for ${state.device} in this range.`;

    const x = (t) => m.left + ((t - data.from) / (data.to - data.from)) * (W - m.left - m.right);
    const lo = Math.min(...windows.map((w) => w.min));
    const hi = Math.max(...windows.map((w) => w.max));
    const yt = windows.length ? niceTicks(lo, hi, 5) : niceTicks(0, 1, 5);
    const y = (v) => H - m.bottom - ((v - yt.lo) / (yt.hi - yt.lo)) * (H - m.top - m.bottom);

    for (const v of yt.ticks) {
      svg("line", { class: "grid", x1: m.left, x2: W - m.right, y1: y(v), y2: y(v) }, root);
      const label = svg("text", { class: "tick", x: m.left - 6, y: y(v) + 4, "text-anchor": "end" }, root);
      label.textContent = fmt(v);
    }
    const tt = timeTicks(data.from, data.to, Math.max(2, Math.floor((W - m.left - m.right) / 90)));
    let lastDay = null;
    for (const t of tt.ticks) {
      svg("line", { class: "axis", x1: x(t), x2: x(t), y1: H - m.bottom, y2: H - m.bottom + 4 }, root);
      const label = svg("text", { class: "tick", x: x(t), y: H - m.bottom + 17, "text-anchor": "middle" }, root);
      const day = Math.floor(t / DAY);
      // The date where it changes, the time of day otherwise.
      label.textContent = tt.step >= DAY || (day !== lastDay && t % DAY === 0) ? utcDay(t) : utc(t, false);
      lastDay = day;
    }
    svg("line", { class: "axis", x1: m.left, x2: W - m.right, y1: H - m.bottom, y2: H - m.bottom }, root);

    // Runs of adjacent windows; a gap in the data is a gap in the drawing.
    const runs = [];
    for (const w of windows) {
      const run = runs[runs.length - 1];
      if (run && run[run.length - 1].end === w.start) run.push(w);
      else runs.push([w]);
    }
    const mid = (w) => x((w.start + w.end) / 2);
    for (const run of runs) {
      if (run.length === 1) {
        const w = run[0];
        svg("line", { class: "avg", x1: mid(w), x2: mid(w), y1: y(w.min), y2: y(w.max), "stroke-opacity": 0.35, "stroke-width": 6 }, root);
        svg("circle", { class: "dot", cx: mid(w), cy: y(w.avg), r: 3 }, root);
        continue;
      }
      const top = run.map((w) => `${mid(w)},${y(w.max)}`);
      const bottom = run.slice().reverse().map((w) => `${mid(w)},${y(w.min)}`);
      svg("polygon", { class: "band", points: [...top, ...bottom].join(" ") }, root);
      svg("polyline", { class: "avg", points: run.map((w) => `${mid(w)},${y(w.avg)}`).join(" ") }, root);
    }

    const cursor = svg("line", { class: "cursor", y1: m.top, y2: H - m.bottom, visibility: "hidden" }, root);
    const dot = svg("circle", { class: "hover-dot", r: 4, visibility: "hidden" }, root);
    const hit = svg("rect", { x: m.left, y: m.top, width: W - m.left - m.right, height: H - m.top - m.bottom, fill: "transparent" }, root);
    state.plotted = { windows, mid, y, W, root, cursor, dot };
    hit.addEventListener("pointermove", (ev) => hover(ev));
    hit.addEventListener("pointerleave", () => unhover());
    if (state.pointerX !== null) hover({ clientX: state.pointerX });
  }

  function hover(ev) {
    const p = state.plotted;
    state.pointerX = ev.clientX;
    if (!p || p.windows.length === 0) return;
    const rect = p.root.getBoundingClientRect();
    const px = ((ev.clientX - rect.left) / rect.width) * p.W;
    let best = p.windows[0];
    for (const w of p.windows) if (Math.abs(p.mid(w) - px) < Math.abs(p.mid(best) - px)) best = w;
    const cx = p.mid(best);
    for (const [k, v] of [["x1", cx], ["x2", cx]]) p.cursor.setAttribute(k, v);
    p.cursor.setAttribute("visibility", "visible");
    p.dot.setAttribute("cx", cx);
    p.dot.setAttribute("cy", p.y(best.avg));
    p.dot.setAttribute("visibility", "visible");
    const tip = $("tooltip");
    tip.textContent =
      `${utc(best.start)} UTC\navg ${fmt(best.avg)}\nmin ${fmt(best.min)}  max ${fmt(best.max)}\n` +
      `count ${intFormat.format(best.count)}${best.final ? "" : " (not final)"}`;
    tip.hidden = false;
    const left = (cx / p.W) * rect.width;
    tip.style.left = `${Math.min(left + 12, rect.width - tip.offsetWidth - 4)}px`;
    tip.style.top = "8px";
  }

  function unhover() {
    state.pointerX = null;
    const p = state.plotted;
    if (!p) return;
    p.cursor.setAttribute("visibility", "hidden");
    p.dot.setAttribute("visibility", "hidden");
    $("tooltip").hidden = true;
  }

  // ---- Refresh loop -----------------------------------------------------

  async function refresh() {
    if (state.busy) {
      state.again = true;
      return;
    }
    state.busy = true;
    state.again = false;
    try {
      const fleets = await refreshOverview();
      await refreshPickers(fleets);
      await refreshSeries();
      $("token-form").hidden = true;
      $("forget-token").hidden = !token();
      setStatus(`Updated ${new Date().toLocaleTimeString()}`, false);
      document.body.dataset.state = "ready";
    } catch (e) {
      if (!(e instanceof AuthError)) setStatus(`Refresh failed: ${e.message}`, true);
      document.body.dataset.state = e instanceof AuthError ? "needs-token" : "error";
    } finally {
      state.busy = false;
    }
    if (state.again) await refresh();
  }

  /** A picker changed: redraw now rather than at the next tick. */
  async function reselect(change) {
    change();
    rememberSelection();
    // A new fleet or device may offer other devices or metrics.
    await refresh();
  }

  function start() {
    const q = new URLSearchParams(location.search);
    state.fleet = q.get("fleet");
    // Typed, not picked: the API lists devices one fleet at a time, since
    // listing every fleet would read the whole store.
    $("fleet").value = state.fleet ?? "";
    state.device = q.get("device");
    state.metric = q.get("metric");
    if (RANGES[q.get("res")]) state.res = q.get("res");

    $("fleet").addEventListener("change", (e) => reselect(() => {
      state.fleet = e.target.validity.valid && e.target.value ? e.target.value : null;
      state.device = null;
    }));
    $("device").addEventListener("change", (e) => reselect(() => {
      state.device = e.target.value;
    }));
    $("metric").addEventListener("change", (e) => reselect(() => {
      state.metric = e.target.value;
    }));
    for (const r of document.querySelectorAll('input[name="res"]')) {
      r.addEventListener("change", (e) => reselect(() => {
        state.res = e.target.value;
      }));
    }
    $("token-form").addEventListener("submit", (e) => {
      e.preventDefault();
      sessionStorage.setItem(TOKEN_KEY, $("token").value.trim());
      $("token").value = "";
      $("token-form").hidden = true;
      refresh();
    });
    $("forget-token").addEventListener("click", () => {
      sessionStorage.removeItem(TOKEN_KEY);
      $("forget-token").hidden = true;
      refresh();
    });
    setInterval(() => {
      if ($("live").checked && !document.hidden) refresh();
    }, REFRESH_MS);
    window.addEventListener("resize", () => drawChart(state.data));
    // A second scrape soon after the first, so rates show within a second
    // instead of after a whole refresh period.
    refresh().then(() => setTimeout(refresh, 1000));
  }

  start();
})();
