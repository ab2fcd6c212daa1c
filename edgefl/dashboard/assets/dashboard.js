// The edgefl dashboard page: draws the view the server inlined, then every view its event
// stream sends. Read-only; no libraries; every string from the fleet is escaped before use.
(function () {
  "use strict";
  var token = new URLSearchParams(location.search).get("token");
  var query = token ? "?token=" + encodeURIComponent(token) : "";
  var $ = function (id) { return document.getElementById(id); };
  var ENTITIES = { "&": "&amp;", "<": "&lt;", ">": "&gt;", '"': "&quot;", "'": "&#39;" };
  var esc = function (s) {
    return String(s === null || s === undefined ? "" : s).replace(/[&<>"']/g, function (c) {
      return ENTITIES[c];
    });
  };
  var view = JSON.parse($("initial-view").textContent);
  var skew = 0; // the server's clock minus the browser's, seconds

  function num(x, digits) { return x === null || x === undefined ? "–" : x.toFixed(digits); }
  function bytes(n) {
    if (n === null || n === undefined) return "–";
    var units = ["B", "kB", "MB", "GB"], i = 0;
    while (n >= 1000 && i < units.length - 1) { n /= 1000; i++; }
    return (i ? n.toFixed(1) : n) + " " + units[i];
  }
  function ago(t) {
    if (!t) return "–";
    var s = Math.max(0, Date.now() / 1000 + skew - t);
    if (s < 60) return Math.round(s) + " s ago";
    if (s < 3600) return Math.round(s / 60) + " min ago";
    if (s < 86400) return Math.round(s / 3600) + " h ago";
    return Math.round(s / 86400) + " d ago";
  }
  function badge(state) { return '<span class="state ' + esc(state) + '">' + esc(state) + "</span>"; }
  function codes(rejected) {
    return Object.keys(rejected).sort().map(function (c) { return esc(c) + " " + rejected[c]; })
      .join(", ");
  }

  function renderCards(v) {
    $("count-online").textContent = v.counts.online;
    $("count-stale").textContent = v.counts.stale;
    $("count-offline").textContent = v.counts.offline + v.counts.unknown;
    var done = v.rounds.filter(function (r) { return r.status !== "running"; });
    var running = v.rounds.filter(function (r) { return r.status === "running"; });
    $("count-rounds").textContent = done.length + (running.length ? " +1 running" : "");
    var withAcc = done.filter(function (r) { return r.accuracy !== null; });
    $("last-accuracy").textContent = withAcc.length ? withAcc[withAcc.length - 1].accuracy.toFixed(3) : "–";
    var p = v.privacy;
    $("epsilon").textContent = p.epsilon === null ? "–" : "ε = " + p.epsilon.toPrecision(3) + " at δ = " + p.delta.toExponential(0);
    $("privacy-line").textContent = p.line;
    var link = $("link");
    link.textContent = v.connected ? "live · broker connected" : "broker disconnected";
    link.className = "pill " + (v.connected ? "up" : "down");
    var codesText = codes(v.rejected_by_code);
    $("rejected-by-code").textContent = codesText ? "rejections by code: " + codesText : "";
    document.title = "edgefl · " + v.fleet + " · " + v.counts.online + " online";
  }

  function svg(tag, attrs) {
    var parts = Object.keys(attrs).map(function (k) { return k + '="' + esc(attrs[k]) + '"'; });
    return "<" + tag + " " + parts.join(" ") + "/>";
  }
  function text(x, y, s, anchor) {
    return '<text x="' + x + '" y="' + y + '" text-anchor="' + (anchor || "start") + '">' + esc(s) + "</text>";
  }
  var W = 480, H = 180, L = 34, R = 8, T = 8, B = 22;

  function renderAccuracy(rounds) {
    var pts = rounds.filter(function (r) { return r.accuracy !== null; });
    var out = [];
    for (var g = 0; g <= 4; g++) {
      var y = T + (H - T - B) * (1 - g / 4);
      out.push(svg("line", { x1: L, x2: W - R, y1: y, y2: y, class: "axis" }));
      out.push(text(L - 4, y + 3, (g / 4).toFixed(2), "end"));
    }
    if (pts.length) {
      var first = pts[0].round, last = pts[pts.length - 1].round, span = Math.max(1, last - first);
      var xy = pts.map(function (r) {
        return [L + (W - L - R) * (pts.length === 1 ? 0.5 : (r.round - first) / span),
                T + (H - T - B) * (1 - r.accuracy)];
      });
      out.push(svg("polyline", { points: xy.map(function (p) { return p.join(","); }).join(" "), class: "curve" }));
      if (pts.length <= 60) xy.forEach(function (p) { out.push(svg("circle", { cx: p[0], cy: p[1], r: 2.5, class: "dot" })); });
      out.push(text(L, H - 6, "round " + first));
      out.push(text(W - R, H - 6, "round " + last, "end"));
    } else {
      out.push(text(W / 2, H / 2, "no accuracy yet (the aggregator needs an eval set)", "middle"));
    }
    $("chart-accuracy").innerHTML = out.join("");
  }

  function renderParticipants(rounds) {
    var shown = rounds.slice(-40), out = [];
    var top = Math.max(1, Math.max.apply(null, shown.map(function (r) { return r.selected || 0; })));
    out.push(svg("line", { x1: L, x2: W - R, y1: H - B, y2: H - B, class: "axis" }));
    out.push(text(L - 4, T + 8, top, "end"));
    var slot = (W - L - R) / Math.max(1, shown.length), bw = Math.max(2, slot * 0.7);
    shown.forEach(function (r, i) {
      var x = L + i * slot + (slot - bw) / 2, h = H - T - B;
      var sel = (r.selected || 0) / top * h, acc = (r.accepted || 0) / top * h;
      var rej = Math.min(sel, (r.rejected_total || 0) / top * h);
      out.push(svg("rect", { x: x, y: H - B - sel, width: bw, height: sel, class: "sel" }));
      out.push(svg("rect", { x: x, y: H - B - acc, width: bw, height: acc, class: "acc" }));
      if (rej > 0) out.push(svg("rect", { x: x, y: H - B - acc - rej, width: bw, height: rej, class: "rej" }));
    });
    if (shown.length) {
      out.push(text(L, H - 6, "round " + shown[0].round));
      out.push(text(W - R, H - 6, "round " + shown[shown.length - 1].round, "end"));
    }
    $("chart-participants").innerHTML = out.join("");
  }

  var ROUND_ROWS = 200; // the newest; a months-long run's thousands of rounds live in the chart

  function renderRounds(rounds) {
    var rows = rounds.slice(-ROUND_ROWS).reverse().map(function (r) {
      var duration = r.seconds === null ? (r.status === "running" ? "running" : "–") : r.seconds.toFixed(2) + " s";
      return '<tr data-round="' + r.round + '"><td class="num">' + r.round + "</td><td>" + badge(r.status) +
        '</td><td class="num">' + (r.accepted === null ? "–" : r.accepted) + " / " + r.selected +
        '</td><td class="num">' + (r.online === null ? "–" : r.online) +
        "</td><td>" + (r.rejected_total ? r.rejected_total + " (" + codes(r.rejected) + ")" : "0") +
        '</td><td class="num">' + r.late + '</td><td class="num">' + num(r.accuracy, 4) +
        '</td><td class="num">' + bytes(r.bytes_up) + '</td><td class="num">' + bytes(r.bytes_down) +
        '</td><td class="num">' + duration + '</td><td class="num">' +
        (r.epsilon === null ? "–" : r.epsilon.toPrecision(3)) + "</td></tr>";
    });
    if (rounds.length > ROUND_ROWS) {
      rows.push('<tr><td colspan="11" class="dim">' + (rounds.length - ROUND_ROWS) +
        " older rounds: in the chart, the record and metrics.csv</td></tr>");
    }
    $("rounds").tBodies[0].innerHTML = rows.join("");
  }

  function renderDeploys(deploys) {
    var counts = {};
    var rows = deploys.map(function (d) {
      counts[d.state] = (counts[d.state] || 0) + 1;
      var progress = d.total_bytes ? '<progress max="' + d.total_bytes + '" value="' + d.received_bytes +
        '"></progress> ' + bytes(d.received_bytes) + " / " + bytes(d.total_bytes) : "";
      return '<tr data-device="' + esc(d.device) + '"><td>' + esc(d.device) + '</td><td class="num">v' +
        d.version + "</td><td>" + badge(d.state) + "</td><td>" + progress + "</td><td>" + esc(d.reason) + "</td></tr>";
    });
    $("deploys").tBodies[0].innerHTML = rows.join("") ||
      '<tr><td colspan="5" class="dim">no deploy reported</td></tr>';
    $("deploy-summary").textContent = Object.keys(counts).sort().map(function (s) { return s + " " + counts[s]; }).join(", ");
  }

  // Only the device rows in view (and a margin) are in the DOM: a 1,000-row table costs the
  // browser more to lay out and paint than everything else on the page together.
  var ROW_PX = 24, MARGIN_ROWS = 20;
  var deviceRows = [];

  // Whether statuses and deploy reports are checked, and what was refused in whose name.
  function renderSeals(v) {
    var seals = v.seals, box = $("seals"), refused = v.refused;
    box.textContent = seals.line;
    box.className = "notice " + (!seals.checked ? "warn" : seals.refused ? "bad" : "ok");
    $("refused-section").hidden = !refused.length;
    $("refused").innerHTML = refused.map(function (r) {
      return '<li data-device="' + esc(r.device) + '">' + esc(r.line) + "</li>";
    }).join("");
  }

  function deviceRow(d) {
    var bundle = d.model_version ? "v" + d.model_version + " <code>" + esc(d.bundle_digest.slice(0, 12) || "-") + "</code>" : "–";
    var refused = d.refused ? ' <span class="bad">' + d.refused + " refused</span>" : "";
    return '<tr data-device="' + esc(d.id) + '"><td>' + esc(d.id) + refused + "</td><td>" + badge(d.state) + "</td><td>" +
      esc(d.profile || "–") + "</td><td>" + bundle + "</td><td>" + esc(d.running) + '</td><td class="num">' + d.samples +
      '</td><td class="num">' + (d.last_round || "–") +
      (d.last_answer && d.last_answer !== "accepted" ? ' <span class="bad">' + esc(d.last_answer) + "</span>" : "") + "</td><td>" + ago(d.last_seen) + "</td><td>" + esc(d.deploy || "–") + "</td></tr>";
  }

  function drawDeviceWindow() {
    var box = $("devices").parentNode;
    var first = Math.max(0, Math.floor(box.scrollTop / ROW_PX) - MARGIN_ROWS);
    var last = Math.min(deviceRows.length, first + Math.ceil(box.clientHeight / ROW_PX) + 2 * MARGIN_ROWS);
    var html = ['<tr class="pad"><td colspan="9"></td></tr>'];
    for (var i = first; i < last; i++) html.push(deviceRow(deviceRows[i]));
    html.push('<tr class="pad"><td colspan="9"></td></tr>');
    var body = $("devices").tBodies[0];
    body.innerHTML = html.join("");
    body.rows[0].style.height = first * ROW_PX + "px";
    body.rows[body.rows.length - 1].style.height = (deviceRows.length - last) * ROW_PX + "px";
  }

  function renderDevices(devices) {
    var needle = $("filter").value.trim().toLowerCase();
    deviceRows = devices.filter(function (d) {
      return !needle || (d.id + " " + d.state + " " + d.profile + " " + d.group + " " + d.running)
        .toLowerCase().indexOf(needle) >= 0;
    });
    drawDeviceWindow();
    $("footer").textContent = deviceRows.length + " of " + devices.length + " devices shown" +
      (view.record ? " · record " + view.record + (view.record_error ? " (unreadable: " + view.record_error + ")" : "") : "") +
      (view.ignored_messages ? " · " + view.ignored_messages + " messages could not be decoded" : "");
  }

  function render(v) {
    if (v.schema !== 1) { $("link").textContent = "this page is older than its server: reload"; return; }
    skew = v.now - Date.now() / 1000;
    renderCards(v);
    renderSeals(v);
    renderAccuracy(v.rounds.filter(function (r) { return r.status !== "running"; }));
    renderParticipants(v.rounds);
    renderRounds(v.rounds);
    renderDeploys(v.deploys);
    renderDevices(v.devices);
    document.body.setAttribute("data-view-version", String(v.version));
  }

  render(view);
  // When the first full render ended, after navigation start (what benchmarks/dashboard.py reads).
  if (window.performance && performance.mark) {
    performance.mark("edgefl-rendered");
    // The frame after the next one starts once the first one, with the tables, was painted.
    requestAnimationFrame(function () {
      requestAnimationFrame(function () { performance.mark("edgefl-painted"); });
    });
  }
  var stream = new EventSource("events" + query);
  stream.addEventListener("view", function (event) { view = JSON.parse(event.data); render(view); });
  stream.onerror = function () { var l = $("link"); l.textContent = "dashboard unreachable: retrying"; l.className = "pill down"; };
  $("filter").addEventListener("input", function () { renderDevices(view.devices); });
  var pending = false;
  $("devices").parentNode.addEventListener("scroll", function () {
    if (pending) return;
    pending = true;
    requestAnimationFrame(function () { pending = false; drawDeviceWindow(); });
  });
  // "last seen" ages as time passes even when nothing new arrives.
  setInterval(function () { renderDevices(view.devices); }, 5000);
})();
