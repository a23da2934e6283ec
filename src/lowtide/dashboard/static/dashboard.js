// Lowtide dashboard: local times, confirm buttons, auto-submitting filters, and route charts.
// Loaded from the package (no CDN); no inline script anywhere, so the CSP can forbid it.
(function () {
  "use strict";

  function localTimes(root) {
    root.querySelectorAll("time[data-ts]").forEach(function (el) {
      var ts = Number(el.dataset.ts);
      if (!ts) return;
      var d = new Date(ts * 1000);
      el.title = d.toISOString();
      var opts = { month: "short", day: "numeric", hour: "2-digit", minute: "2-digit",
        second: "2-digit", hourCycle: "h23" };
      if (d.getFullYear() !== new Date().getFullYear()) opts.year = "numeric";
      el.textContent = d.toLocaleString([], opts);
    });
  }

  document.addEventListener("submit", function (ev) {
    var form = ev.target;
    if (form.dataset && form.dataset.confirm && !window.confirm(form.dataset.confirm)) {
      ev.preventDefault();
    }
  });

  document.addEventListener("change", function (ev) {
    var el = ev.target;
    if (el.matches && el.matches("select[data-autosubmit]")) el.form.submit();
  });

  // -- charts: uPlot, fed from /ui/routes/history.json ---------------------------------
  var COLORS = ["#1565c0", "#2e7d32", "#c62828", "#ef6c00", "#6a1b9a", "#00838f", "#5d4037", "#ad1457"];
  var charts = [];

  function build(el, data) {
    var metric = el.dataset.metric;
    var names = Object.keys(data[metric] || {}).sort();
    var times = data.times || [];
    if (!times.length || !names.length) {
      el.innerHTML = "";
      var p = document.createElement("div");
      p.className = "empty-chart";
      p.textContent = "No samples yet: the first come a few seconds after the server starts sending.";
      el.appendChild(p);
      return null;
    }
    var series = [{}];
    var rows = [times];
    names.forEach(function (name, i) {
      series.push({ label: name, stroke: COLORS[i % COLORS.length], width: 2, spanGaps: false,
        value: function (u, v) { return v == null ? "—" : v.toFixed(1); } });
      rows.push(data[metric][name]);
    });
    el.innerHTML = "";
    var opts = {
      width: Math.max(el.clientWidth, 240),
      height: 220,
      series: series,
      scales: { y: { range: function (u, min, max) { return [0, Math.max(1, max * 1.1)]; } } },
      axes: [{}, { size: 50 }],
      legend: { live: true },
    };
    return new window.uPlot(opts, rows, el);
  }

  function refreshCharts() {
    var els = document.querySelectorAll("[data-chart]");
    if (!els.length || !window.uPlot) return;
    var url = els[0].dataset.chart;
    fetch(url, { credentials: "same-origin", headers: { "Accept": "application/json" } })
      .then(function (r) { return r.ok ? r.json() : null; })
      .then(function (data) {
        if (!data) return;
        charts.forEach(function (c) { if (c) c.destroy(); });
        charts = Array.prototype.map.call(els, function (el) { return build(el, data); });
      })
      .catch(function () {});
  }

  var resizeTimer = null;
  window.addEventListener("resize", function () {
    clearTimeout(resizeTimer);
    resizeTimer = setTimeout(function () {
      charts.forEach(function (c) {
        if (c) c.setSize({ width: Math.max(c.root.parentNode.clientWidth, 240), height: 220 });
      });
    }, 150);
  });

  document.addEventListener("DOMContentLoaded", function () {
    localTimes(document);
    if (document.querySelector("[data-chart]")) {
      refreshCharts();
      setInterval(refreshCharts, 5000);
    }
  });
  document.addEventListener("htmx:afterSettle", function () { localTimes(document); });
})();
