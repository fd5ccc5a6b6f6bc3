// lineguard dashboard: subscribes to the server's snapshots (SSE, or polling as a fallback)
// and draws them. No framework, no build step; charts are plain SVG paths.
"use strict";

(function () {
  const VERDICTS = ["pass", "fail", "uninspected", "error"];
  const SVG = "http://www.w3.org/2000/svg";
  const token = new URLSearchParams(window.location.search).get("token");
  const $ = (id) => document.getElementById(id);

  let latest = null;
  let openKey = null;
  let source = null;
  let pollTimer = null;
  let sseFailures = 0;

  function withToken(url) {
    if (!token) return url;
    return url + (url.includes("?") ? "&" : "?") + "token=" + encodeURIComponent(token);
  }

  function el(tag, cls, text) {
    const node = document.createElement(tag);
    if (cls) node.className = cls;
    if (text !== undefined) node.textContent = text;
    return node;
  }

  function svgEl(tag, attrs, text) {
    const node = document.createElementNS(SVG, tag);
    for (const [k, v] of Object.entries(attrs || {})) node.setAttribute(k, String(v));
    if (text !== undefined) node.textContent = text;
    return node;
  }

  function fmt(value, digits) {
    if (value === null || value === undefined || Number.isNaN(value)) return "–";
    return Number(value).toLocaleString(undefined, {
      minimumFractionDigits: digits || 0, maximumFractionDigits: digits || 0,
    });
  }

  function ago(seconds) {
    if (seconds < 1) return "just now";
    if (seconds < 90) return Math.round(seconds) + " s ago";
    if (seconds < 5400) return Math.round(seconds / 60) + " min ago";
    return Math.round(seconds / 3600) + " h ago";
  }

  function clock(t) {
    return t ? new Date(t * 1000).toLocaleTimeString([], { hour12: false }) : "–";
  }

  // ---------------------------------------------------------------- connection

  function setStatus(kind, text) {
    const s = $("status");
    s.className = "status " + kind;
    s.textContent = text;
  }

  function connect() {
    if (!window.EventSource) { startPolling(); return; }
    source = new EventSource(withToken("api/stream"));
    source.addEventListener("state", (e) => {
      sseFailures = 0;
      setStatus("live", "live");
      render(JSON.parse(e.data));
    });
    source.onerror = () => {
      sseFailures += 1;
      setStatus("connecting", "reconnecting…");
      if (sseFailures >= 5) {  // e.g. a proxy that buffers streams: poll instead
        source.close();
        startPolling();
      }
    };
  }

  function startPolling() {
    if (pollTimer) return;
    const tick = async () => {
      try {
        const r = await fetch(withToken("api/state"), { cache: "no-store" });
        if (!r.ok) throw new Error("HTTP " + r.status);
        setStatus("polling", "live (polling)");
        render(await r.json());
      } catch (err) {
        setStatus("down", "offline");
      }
    };
    tick();
    pollTimer = setInterval(tick, 2000);
  }

  // ---------------------------------------------------------------- rendering

  function render(state) {
    latest = state;
    $("line-name").textContent = "line " + state.line;
    document.title = "lineguard · line " + state.line;
    const model = state.model && state.model.current;
    $("model").textContent = model || "–";
    const seen = (state.model && state.model.seen) || [];
    $("model").title = seen.length > 1 ? "also seen recently: " + seen.join(", ") : "";
    $("last-event").textContent = state.last_event
      ? "last event " + ago(Math.max(0, state.now - state.last_event)) : "no events yet";
    const banner = $("banner");
    banner.hidden = !state.error;
    banner.textContent = state.error || "";

    for (const v of VERDICTS) {
      $("count-" + v).textContent = fmt(state.counts[v]);
      const share = state.share[v];
      $("share-" + v).textContent = share === null ? "–" : fmt(share * 100, 1) + " %";
      $("rate-" + v).textContent = fmt(state.rates.per_min[v], 1);
    }
    $("count-total").textContent = fmt(state.counts.total);
    $("since").textContent = clock(state.since);
    $("fps-now").textContent = fmt(state.rates.fps, 1);
    $("p50-now").textContent = fmt(state.latency_ms.p50, 1);
    $("p99-now").textContent = fmt(state.latency_ms.p99, 1);

    renderShift(state.shift);
    renderQueues(state);
    renderCharts(state.series);
    renderGallery(state.rejects || []);
    if (openKey) {
      const r = (state.rejects || []).find((x) => x.key === openKey);
      if (r) fillDetail(r);
    }
  }

  function renderShift(shift) {
    const box = $("shift");
    box.hidden = !shift;
    if (!shift) return;
    if (shift.error) {
      box.textContent = "this shift (since " + clock(shift.start) + "): history unavailable – "
        + shift.error;
      return;
    }
    const c = shift.counts;
    const rate = shift.reject_rate === null ? "–" : fmt(shift.reject_rate * 100, 2) + " %";
    box.replaceChildren(
      document.createTextNode("this shift, since " + clock(shift.start) + " (from the history): "),
      el("b", "", fmt(c.total)), document.createTextNode(" inspected · "),
      el("b", "", fmt(c.fail)), document.createTextNode(" rejected · reject rate "),
      el("b", "", rate),
      document.createTextNode(" · uninspected " + fmt(c.uninspected) + " · error " + fmt(c.error)));
  }

  function renderQueue(name, q) {
    const lag = !q || q.lag === null ? "–" : fmt(q.lag) + (q.estimated ? "≈" : "");
    $("lag-" + name).textContent = lag;
    $("pending-" + name).textContent = q ? fmt(q.pending) : "–";
    $("lag-" + name).title = q ? "group " + q.group + ", " + fmt(q.length) + " in the stream, "
      + fmt(q.consumers) + " consumer(s)" : "the group does not exist yet";
  }

  function renderQueues(state) {
    renderQueue("frames", state.queues.frames);
    renderQueue("scores", state.queues.scores);
    $("dead").textContent = fmt(state.dead);
    const ul = $("workers");
    ul.replaceChildren();
    if (!state.workers.length) ul.append(el("li", "dim", "no heartbeats"));
    for (const w of state.workers) {
      const li = el("li");
      li.append(el("span", "", w.stage + " · " + w.consumer));
      li.append(el("span", "dim", w.age_s === null ? "" : fmt(w.age_s, 0) + " s"));
      li.title = w.model || "";
      ul.append(li);
    }
  }

  // A tiny line chart: each series is drawn as a path with gaps where values are null.
  function drawChart(svg, series, unit) {
    const W = 300, H = 110, L = 30, B = 14, T = 6;
    svg.replaceChildren();
    let max = 0;
    for (const s of series) for (const v of s.values) if (v !== null && v > max) max = v;
    max = niceMax(max);
    const n = Math.max(2, series[0].values.length);
    const x = (i) => L + (W - L - 2) * (i / (n - 1));
    const y = (v) => T + (H - T - B) * (1 - v / max);
    for (const frac of [0, 0.5, 1]) {
      const yy = y(max * frac);
      svg.append(svgEl("line", { x1: L, x2: W, y1: yy, y2: yy, class: "grid" }));
      svg.append(svgEl("text", { x: L - 3, y: yy + 3, "text-anchor": "end", class: "axis" },
        shortNum(max * frac)));
    }
    const span = n * (latest ? latest.series.bucket_s : 5);
    const spanText = span >= 120 ? Math.round(span / 60) + " min" : Math.round(span) + " s";
    svg.append(svgEl("text", { x: L, y: H - 2, class: "axis" }, "−" + spanText));
    svg.append(svgEl("text", { x: W - 2, y: H - 2, "text-anchor": "end", class: "axis" }, "now"));
    if (unit) svg.append(svgEl("text", { x: L + 4, y: T + 8, class: "axis" }, unit));
    let legendX = W - 4;
    for (const s of series.slice().reverse()) {
      if (s.label) {
        const t = svgEl("text", { x: legendX, y: T + 8, "text-anchor": "end",
          class: "axis legend " + s.cls.replace("s-", "l-") }, s.label);
        svg.append(t);
        legendX -= 8 + 6 * s.label.length;
      }
      let d = "";
      let dots = "";  // points with no neighbour: drawn as round-capped stubs
      let pen = false;
      const vals = s.values;
      vals.forEach((v, i) => {
        if (v === null) { pen = false; return; }
        const px = x(i).toFixed(1), py = y(v).toFixed(1);
        d += (pen ? "L" : "M") + px + " " + py + " ";
        const prev = i > 0 ? vals[i - 1] : null;
        const next = i < vals.length - 1 ? vals[i + 1] : null;
        if (prev === null && next === null) dots += "M" + px + " " + py + " l0.01 0 ";
        pen = true;
      });
      if (d) svg.append(svgEl("path", { d: d.trim(), class: s.cls }));
      if (dots) svg.append(svgEl("path", { d: dots.trim(), class: s.cls + " dot" }));
    }
  }

  function niceMax(v) {
    if (!(v > 0)) return 1;
    const p = Math.pow(10, Math.floor(Math.log10(v)));
    for (const m of [1, 2, 2.5, 5, 10]) if (v <= m * p) return m * p;
    return 10 * p;
  }

  function shortNum(v) {
    if (v >= 1e6) return (v / 1e6).toFixed(1) + "M";
    if (v >= 1e3) return (v / 1e3).toFixed(v >= 1e4 ? 0 : 1) + "k";
    return v >= 10 || v === 0 ? String(Math.round(v)) : v.toFixed(1);
  }

  // The charts span the whole window once it has data; until then they start at the first
  // point with data (but show at least two minutes), so a fresh line is not a flat line.
  function firstWithData(series) {
    const n = series.fps.length;
    for (let i = 0; i < n; i++) {
      if (series.fps[i] > 0 || series.p50_ms[i] !== null || series.lag_frames[i] !== null
          || series.lag_scores[i] !== null) return i;
    }
    return n;
  }

  function renderCharts(series) {
    const n = series.fps.length;
    const minPoints = Math.min(n, Math.ceil(120 / series.bucket_s));
    const start = Math.max(0, Math.min(firstWithData(series), n - minPoints) - 1);
    const cut = (values) => values.slice(start);
    drawChart($("chart-fps"), [{ values: cut(series.fps), cls: "s-fps" }], "frames/s");
    drawChart($("chart-latency"), [
      { values: cut(series.p50_ms), cls: "s-p50", label: "p50" },
      { values: cut(series.p99_ms), cls: "s-p99", label: "p99" },
    ], "ms");
    drawChart($("chart-lag"), [
      { values: cut(series.lag_frames), cls: "s-lagf", label: "→infer" },
      { values: cut(series.lag_scores), cls: "s-lags", label: "→decide" },
    ], "entries");
  }

  // ---------------------------------------------------------------- gallery

  const cards = new Map();

  function picture(url, missing) {
    if (!url) return el("div", "noimg", missing);
    const img = el("img");
    img.src = withToken(url);
    img.alt = missing;
    img.loading = "lazy";
    img.addEventListener("error", () => img.replaceWith(el("div", "noimg", missing)));
    return img;
  }

  function makeCard(r) {
    const card = el("button", "card reject");
    card.type = "button";
    card.dataset.key = r.key;
    card.dataset.testid = "reject";
    const missing = r.frame ? "no picture" : "frame no longer available";
    const pic = picture(r.images.thumb, missing);
    pic.classList.add("thumb");
    card.append(pic);
    card.append(el("div", "key", r.camera + " #" + r.seq));
    const score = el("div", "score");
    const b = el("b", "", fmt(r.score, 2));
    score.append(b, document.createTextNode(" / " + fmt(r.threshold, 2) + " · " + clock(r.t_event)));
    card.append(score);
    card.append(el("div", "mark", ""));
    card.title = r.reason;
    card.addEventListener("click", () => openDetail(r.key));
    return card;
  }

  function renderGallery(rejects) {
    const gallery = $("gallery");
    $("reject-count").textContent = rejects.length ? "(newest " + rejects.length + ")" : "";
    const keep = new Set(rejects.map((r) => r.key));
    for (const [key, card] of cards) {
      if (!keep.has(key)) { card.remove(); cards.delete(key); }
    }
    const empty = gallery.querySelector(".empty");
    if (rejects.length && empty) empty.remove();
    let prev = null;
    for (const r of rejects) {
      let card = cards.get(r.key);
      if (!card) { card = makeCard(r); cards.set(r.key, card); }
      card.querySelector(".mark").textContent = r.mark === "good" ? "marked good part"
        : r.mark === "defect" ? "confirmed defect" : "";
      const want = prev ? prev.nextSibling : gallery.firstChild;
      if (card !== want) gallery.insertBefore(card, want);
      prev = card;
    }
    if (!rejects.length && !gallery.querySelector(".empty")) {
      gallery.append(el("p", "dim empty", "no rejects yet"));
    }
  }

  // ---------------------------------------------------------------- detail view

  function openDetail(key) {
    const r = latest && (latest.rejects || []).find((x) => x.key === key);
    if (!r) return;
    openKey = key;
    fillDetail(r, true);
    $("detail").hidden = false;
    $("detail-close").focus();
  }

  function closeDetail() {
    openKey = null;
    $("detail").hidden = true;
  }

  function fillDetail(r, fresh) {
    $("detail-title").textContent = r.key;
    if (fresh || $("detail").dataset.key !== r.key) {
      $("detail").dataset.key = r.key;
      $("view-frame").replaceChildren(picture(r.images.frame, "frame no longer available"));
      $("view-overlay").replaceChildren(picture(r.images.overlay,
        "no anomaly map (infer runs without --maps, or the scores were trimmed)"));
      $("view-seg").replaceChildren(picture(r.images.seg,
        "no segmentation in this frame's scores"));
    }
    drawScore($("detail-score"), r.score, r.threshold);
    drawBranches($("detail-branches"), r.contributions);
    $("detail-reason").textContent = r.reason;
    $("detail-mark").hidden = !(latest && latest.marks);
    for (const b of $("detail-mark").querySelectorAll("button")) {
      b.classList.toggle("on", b.dataset.mark === r.mark);
    }
    if (fresh) $("mark-status").textContent = "";
    $("detail-meta").textContent = "model " + r.model + " · captured " + clock(r.t_capture)
      + " · capture → event " + fmt(r.latency_ms, 1) + " ms" + (r.note ? " · " + r.note : "");
  }

  function drawScore(svg, score, threshold) {
    svg.replaceChildren();
    const W = 400, L = 6, R = 6;
    const lo = Math.min(0, score, threshold);
    const hi = Math.max(score, threshold, lo + 1e-9);
    const span = (hi - lo) * 1.15;
    const x = (v) => L + (W - L - R) * ((v - lo) / span);
    svg.append(svgEl("rect", { x: L, y: 16, width: W - L - R, height: 14, class: "track" }));
    const x0 = x(Math.max(lo, Math.min(0, hi)));
    const xs = x(score);
    svg.append(svgEl("rect", { x: Math.min(x0, xs), y: 16, width: Math.max(1, Math.abs(xs - x0)),
      height: 14, class: score > threshold ? "bar" : "bar ok" }));
    const xt = x(threshold);
    svg.append(svgEl("line", { x1: xt, x2: xt, y1: 10, y2: 36, class: "thr" }));
    svg.append(svgEl("text", { x: xt, y: 9, "text-anchor": "middle" },
      "threshold " + fmt(threshold, 3)));
    svg.append(svgEl("text", { x: Math.min(Math.max(xs, 40), W - 40), y: 44, "text-anchor": "middle" },
      "score " + fmt(score, 3)));
  }

  function drawBranches(box, contributions) {
    box.replaceChildren();
    const entries = Object.entries(contributions || {});
    if (!entries.length) { box.append(el("span", "dim", "none recorded")); return; }
    const maxAbs = Math.max(1e-9, ...entries.map(([, v]) => Math.abs(v || 0)));
    const hasNeg = entries.some(([, v]) => v < 0);
    const zero = hasNeg ? 50 : 0;
    for (const [name, v] of entries) {
      const track = el("div", "track");
      const fill = el("div", v < 0 ? "fill neg" : "fill");
      const width = (Math.abs(v || 0) / maxAbs) * (hasNeg ? 50 : 100);
      fill.style.left = (v < 0 ? zero - width : zero) + "%";
      fill.style.width = width + "%";
      const mark = el("div", "zero");
      mark.style.left = zero + "%";
      track.append(fill, mark);
      box.append(el("span", "", name), track, el("span", "", fmt(v, 3)));
    }
  }

  async function sendMark(mark) {
    if (!openKey) return;
    const status = $("mark-status");
    status.textContent = "saving…";
    const headers = { "Content-Type": "application/json" };
    if (token) headers["X-Lineguard-Token"] = token;
    try {
      const res = await fetch("api/mark", { method: "POST", headers: headers,
        body: JSON.stringify({ key: openKey, mark: mark }) });
      const body = await res.json().catch(() => ({}));
      status.textContent = res.ok ? "saved: " + (mark === "good" ? "good part" : "confirmed defect")
        : "not saved: " + (body.error || res.status);
    } catch (e) {
      status.textContent = "not saved: " + e;
    }
  }

  // ---------------------------------------------------------------- start

  document.addEventListener("DOMContentLoaded", () => {
    $("detail-close").addEventListener("click", closeDetail);
    $("mark-good").addEventListener("click", () => sendMark("good"));
    $("mark-defect").addEventListener("click", () => sendMark("defect"));
    $("detail").addEventListener("click", (e) => { if (e.target === $("detail")) closeDetail(); });
    document.addEventListener("keydown", (e) => { if (e.key === "Escape") closeDetail(); });
    connect();
  });
})();
