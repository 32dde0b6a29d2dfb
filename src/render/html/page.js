// peft-compat's HTML report: filters, a cell's cases on click, the URL fragment as the view.
// Data comes from the JSON block above and enters the page through textContent only.
(function () {
  "use strict";
  var D = JSON.parse(document.getElementById("data").textContent);
  var AXES = D.axes;
  var chosen = {}; // axis -> value
  var openCell = null; // data-cell of the open cell, or "case:r:i" for one case

  function byRef(ref) {
    var p = ref.split(":");
    var r = +p[0];
    return { r: r, c: D.reports[r].cases[+p[1]] };
  }
  function value(c, axis) {
    var k = AXES.indexOf(axis);
    return D.values[k][c.a[k]];
  }
  function matches(c) {
    for (var axis in chosen) {
      if (chosen[axis] && value(c, axis) !== chosen[axis]) return false;
    }
    return true;
  }
  function refsOf(el) {
    var s = el.getAttribute("data-cases") || el.getAttribute("data-c") || "";
    return s ? s.split(" ") : [];
  }

  // --- the URL fragment: #dtype=f16&op=init&cell=s0r3c2 -----------------------------------
  function readHash() {
    chosen = {};
    openCell = null;
    var h = location.hash.replace(/^#/, "");
    if (!h) return;
    h.split("&").forEach(function (kv) {
      var i = kv.indexOf("=");
      if (i < 0) return;
      var k = decodeURIComponent(kv.slice(0, i));
      var v = decodeURIComponent(kv.slice(i + 1));
      if (k === "cell") openCell = v;
      else if (AXES.indexOf(k) >= 0) chosen[k] = v;
    });
  }
  function writeHash() {
    var parts = [];
    AXES.forEach(function (a) {
      if (chosen[a]) parts.push(encodeURIComponent(a) + "=" + encodeURIComponent(chosen[a]));
    });
    if (openCell) parts.push("cell=" + encodeURIComponent(openCell));
    history.replaceState(null, "", parts.length ? "#" + parts.join("&") : location.pathname);
  }

  // --- filters ---------------------------------------------------------------------------
  var selects = Array.prototype.slice.call(document.querySelectorAll("select[data-axis]"));
  selects.forEach(function (sel) {
    var k = AXES.indexOf(sel.getAttribute("data-axis"));
    D.values[k].forEach(function (v) {
      var o = document.createElement("option");
      o.value = v;
      o.textContent = v;
      sel.appendChild(o);
    });
    sel.addEventListener("change", function () {
      chosen[sel.getAttribute("data-axis")] = sel.value;
      writeHash();
      apply();
    });
  });
  document.getElementById("clear").addEventListener("click", function () {
    chosen = {};
    writeHash();
    apply();
  });

  var cells = Array.prototype.slice.call(document.querySelectorAll("button.cell"));
  var dots = Array.prototype.slice.call(document.querySelectorAll("circle.dot"));
  var total = D.reports.reduce(function (n, r) { return n + r.cases.length; }, 0);

  function apply() {
    selects.forEach(function (sel) { sel.value = chosen[sel.getAttribute("data-axis")] || ""; });
    var any = AXES.some(function (a) { return chosen[a]; });
    var n = 0;
    D.reports.forEach(function (r) { r.cases.forEach(function (c) { if (matches(c)) n++; }); });
    document.getElementById("matching").textContent = any
      ? n + " of " + total + " cases match the filters; cells without a matching case are dimmed"
      : total + " cases";
    cells.forEach(function (b) {
      var hit = refsOf(b).some(function (ref) { return matches(byRef(ref).c); });
      b.classList.toggle("dim", any && !hit);
    });
    dots.forEach(function (d) {
      d.classList.toggle("hidden", !matches(byRef(d.getAttribute("data-c")).c));
    });
    show();
  }

  // --- a cell's cases --------------------------------------------------------------------
  var detail = document.getElementById("detail");
  var tbody = document.querySelector("#detail-table tbody");
  function el(tag, text, cls) {
    var e = document.createElement(tag);
    if (text !== undefined && text !== null) e.textContent = String(text);
    if (cls) e.className = cls;
    return e;
  }
  function num(x) {
    if (x === null || x === undefined) return "nan";
    if (x === 0) return "0";
    var a = Math.abs(x);
    return a >= 0.01 && a < 1e4 ? x.toPrecision(3).replace(/\.?0+$/, "") : x.toExponential(1);
  }
  function shapeText(rep, name) {
    var s = rep.shapes && rep.shapes[name];
    if (!s) return name;
    var t = name + ": batch " + s.batch + ", " + s.in_features + " -> " + s.out_features +
      ", rank " + s.rank + ", alpha " + s.alpha + (s.bias ? ", bias" : "") + (s.rslora ? ", rsLoRA" : "");
    if (s.kernel) t += ", kernel " + s.kernel + ", image " + s.image;
    return t;
  }
  function row(ref) {
    var x = byRef(ref), c = x.c, rep = D.reports[x.r];
    var tr = el("tr");
    tr.className = "case";
    var id = el("td");
    if (D.reports.length > 1) id.appendChild(el("strong", rep.label + " "));
    id.appendChild(el("code", c.id));
    if (c.d) { id.appendChild(el("br")); id.appendChild(el("small", "dump: " + c.d)); }
    tr.appendChild(id);
    var outcome = value(c, "outcome");
    var o = el("td", (outcome === "pass" ? "✓ " : outcome === "skipped" ? "– " : "✗ ") + outcome +
      (c.s ? " (" + c.s.replace(/_/g, " ") + ")" : ""));
    o.className = outcome === "pass" ? "works" : outcome === "skipped" ? "skipped"
      : (c.x && c.x.status === "met" ? "expected" : "fails");
    tr.appendChild(o);
    var out = el("td");
    out.className = "out";
    if (c.e) out.appendChild(el("div", c.e));
    var u = rep.units && rep.units[value(c, "dtype")];
    c.m.forEach(function (m) {
      var line = m[0] + ": " + num(m[1]) + " u of " + num(m[2]) + " u allowed (" + num(m[3]) + "x)" +
        (m[4] ? ", " + m[4] + " non-finite" : "");
      out.appendChild(el("div", (m[3] !== null && m[3] <= 1 ? "✓ " : "✗ ") + line));
    });
    if (c.m.length && u) out.appendChild(el("small", "u = " + u.toExponential(3) + " (" + value(c, "dtype") + ")"));
    tr.appendChild(out);
    tr.appendChild(el("td", c.x ? c.x.outcome + " (" + c.x.rule + ", " + c.x.status.replace(/_/g, " ") + "): " + c.x.reason : ""));
    tr.appendChild(el("td", shapeText(rep, value(c, "shape"))));
    return tr;
  }
  function show() {
    cells.forEach(function (b) { b.classList.remove("open"); });
    while (tbody.firstChild) tbody.removeChild(tbody.firstChild);
    if (!openCell) { detail.hidden = true; return; }
    var refs, title;
    if (openCell.indexOf("case:") === 0) {
      refs = [openCell.slice(5)];
      title = "Case";
    } else {
      var b = document.querySelector('button.cell[data-cell="' + openCell.replace(/[^a-z0-9]/g, "") + '"]');
      if (!b) { detail.hidden = true; return; }
      b.classList.add("open");
      refs = refsOf(b);
      title = b.getAttribute("aria-label");
    }
    var shown = refs.filter(function (ref) { return matches(byRef(ref).c); });
    shown.forEach(function (ref) { tbody.appendChild(row(ref)); });
    document.getElementById("detail-title").textContent = title + ": " + shown.length +
      (shown.length === refs.length ? "" : " of " + refs.length) + " cases";
    detail.hidden = false;
  }
  function open(id, focus) {
    openCell = id;
    writeHash();
    show();
    if (focus) {
      document.getElementById("detail-title").focus();
      detail.scrollIntoView({ block: "nearest" });
    }
  }
  cells.forEach(function (b) {
    b.addEventListener("click", function () { open(b.getAttribute("data-cell"), true); });
  });
  dots.forEach(function (d) {
    d.addEventListener("click", function () { open("case:" + d.getAttribute("data-c"), true); });
  });
  function close() { openCell = null; writeHash(); show(); }
  document.getElementById("detail-close").addEventListener("click", close);
  document.addEventListener("keydown", function (e) { if (e.key === "Escape" && openCell) close(); });
  window.addEventListener("hashchange", function () { readHash(); apply(); });

  readHash();
  apply();
})();
