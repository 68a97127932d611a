(function () {
  "use strict";
  var SVG = "http://www.w3.org/2000/svg";
  var KINDS = {"cross layer transcoder": "component", "mlp reconstruction error": "error",
               "embedding": "embedding", "logit": "logit"};
  var data = JSON.parse(document.getElementById("graph-data").textContent);
  var meta = data.metadata, extra = meta.decomp_hooks || {};
  var tokens = meta.prompt_tokens;
  var byId = {}, selected = null;

  function el(name, attrs, parent) {
    var e = document.createElementNS(SVG, name);
    Object.keys(attrs).forEach(function (k) { e.setAttribute(k, attrs[k]); });
    if (parent) parent.appendChild(e);
    return e;
  }
  function text(id, value) { document.getElementById(id).textContent = value; }
  function fmt(v) { return v === null || v === undefined ? "-" : Number(v).toPrecision(3); }

  function layerKey(layer) { return layer === "E" ? -1 : Number(layer); }
  var layers = Array.from(new Set(data.nodes.map(function (n) { return String(n.layer); })));
  layers.sort(function (a, b) { return layerKey(a) - layerKey(b); });
  var sites = {};
  (extra.layers || []).forEach(function (l) { sites[String(l.layer)] = l.site; });
  function rowLabel(layer) {
    if (layer === "E") return "inputs";
    return sites[layer] !== undefined ? sites[layer] : "outputs";
  }

  var cells = {}, perColumn = tokens.map(function () { return 1; });
  data.nodes.forEach(function (n) {
    n.kind = KINDS[n.feature_type] || "component";
    n.edges = [];
    byId[n.node_id] = n;
    var key = String(n.layer) + "|" + n.ctx_idx;
    (cells[key] = cells[key] || []).push(n);
    perColumn[n.ctx_idx] = Math.max(perColumn[n.ctx_idx] || 1, cells[key].length);
  });
  var LEFT = 240, TOP = 20, ROW = 56, STEP = 13, BOTTOM = 90;
  var colX = [], x = LEFT;
  perColumn.forEach(function (count, i) { colX[i] = x; x += Math.max(56, count * STEP + 18); });
  var width = x + 20, height = TOP + layers.length * ROW + BOTTOM;
  function rowY(layer) { return TOP + (layers.length - 1 - layers.indexOf(String(layer))) * ROW + ROW / 2; }
  Object.keys(cells).forEach(function (key) {
    cells[key].sort(function (a, b) { return Math.abs(b.activation || 0) - Math.abs(a.activation || 0); });
    cells[key].forEach(function (n, i) { n.x = colX[n.ctx_idx] + 12 + i * STEP; n.y = rowY(n.layer); });
  });

  var svg = el("svg", {width: width, height: height, viewBox: "0 0 " + width + " " + height});
  document.getElementById("canvas").appendChild(svg);
  layers.forEach(function (layer) {
    var label = el("text", {x: 8, y: rowY(layer) + 4, "class": "row-label"}, svg);
    label.textContent = "L" + layer + "  " + rowLabel(layer);
    el("line", {x1: LEFT - 6, x2: width - 10, y1: rowY(layer), y2: rowY(layer), stroke: "#eee"}, svg);
  });
  tokens.forEach(function (tok, i) {
    var y = height - BOTTOM + 14;
    var t = el("text", {x: colX[i] + 8, y: y, transform: "rotate(35 " + (colX[i] + 8) + " " + y + ")"}, svg);
    t.textContent = tok;
  });

  var maxAbs = data.links.reduce(function (m, l) { return Math.max(m, Math.abs(l.weight)); }, 0) || 1;
  var edgeLayer = el("g", {}, svg), nodeLayer = el("g", {}, svg);
  data.links.forEach(function (link) {
    var s = byId[link.source], t = byId[link.target];
    if (!s || !t) return;
    var mid = (s.y + t.y) / 2;
    link.path = el("path", {
      d: "M" + s.x + " " + s.y + " C" + s.x + " " + mid + " " + t.x + " " + mid + " " + t.x + " " + t.y,
      "class": "edge", stroke: link.weight >= 0 ? "#c0392b" : "#2166ac",
      "stroke-width": (0.4 + 3.6 * Math.abs(link.weight) / maxAbs).toFixed(2), "stroke-opacity": 0.35}, edgeLayer);
    link.sourceNode = s; link.targetNode = t;
    s.edges.push(link); t.edges.push(link);
  });

  var tooltip = document.getElementById("tooltip");
  function describe(n) {
    return n.clerp + "\n" + n.node_id + "  (" + rowLabel(String(n.layer)) + ", position " + n.ctx_idx + ")" +
      "\nactivation " + fmt(n.activation) + "   cumulative influence " + fmt(n.influence);
  }
  function highlight(n) {
    data.links.forEach(function (l) {
      if (!l.path) return;
      var on = n !== null && (l.sourceNode === n || l.targetNode === n);
      l.path.setAttribute("class", n === null ? "edge" : on ? "edge lit" : "edge dim");
    });
  }
  function listEdges(id, edges, other) {
    var list = document.getElementById(id);
    while (list.firstChild) list.removeChild(list.firstChild);
    edges.sort(function (a, b) { return Math.abs(b.weight) - Math.abs(a.weight); }).slice(0, 40).forEach(function (l) {
      var item = document.createElement("li"), peer = other(l);
      item.textContent = (l.weight >= 0 ? "+" : "") + fmt(l.weight) + "  " + peer.clerp + " @" + peer.ctx_idx;
      item.className = l.weight >= 0 ? "pos" : "neg";
      item.addEventListener("click", function () { select(peer); });
      list.appendChild(item);
    });
  }
  function select(n) {
    if (selected) selected.shape.classList.remove("selected");
    selected = n;
    n.shape.classList.add("selected");
    highlight(n);
    text("panel-title", n.clerp);
    text("panel-meta", describe(n));
    listEdges("panel-inputs", n.edges.filter(function (l) { return l.targetNode === n; }),
              function (l) { return l.sourceNode; });
    listEdges("panel-outputs", n.edges.filter(function (l) { return l.sourceNode === n; }),
              function (l) { return l.targetNode; });
  }

  data.nodes.forEach(function (n) {
    var cls = "node " + n.kind;
    n.shape = n.kind === "component"
      ? el("circle", {cx: n.x, cy: n.y, r: 5, "class": cls}, nodeLayer)
      : el("rect", {x: n.x - 5, y: n.y - 5, width: 10, height: 10, "class": cls}, nodeLayer);
    n.shape.addEventListener("mouseenter", function (event) {
      tooltip.textContent = describe(n);
      tooltip.hidden = false;
      tooltip.style.left = (event.clientX + 12) + "px";
      tooltip.style.top = (event.clientY + 12) + "px";
      highlight(n);
    });
    n.shape.addEventListener("mouseleave", function () { tooltip.hidden = true; highlight(selected); });
    n.shape.addEventListener("click", function () { select(n); });
  });

  text("prompt", meta.prompt);
  var targets = (extra.targets || []).map(function (t) {
    return "\u201c" + t.label + "\u201d (" + fmt(t.weight) + ")";
  });
  var counts = extra.counts || {};
  text("summary", "model " + meta.scan + " \u00b7 method " + (extra.method || "-") + " \u00b7 target " +
       targets.join(", ") + " \u00b7 nodes " + data.nodes.length + " of " + counts.nodes + " \u00b7 edges " +
       data.links.length + " of " + counts.edges + " \u00b7 influence kept " +
       fmt(100 * (extra.influence_kept || 0)) + "%");
  var logit = data.nodes.filter(function (n) { return n.is_target_logit; })[0];
  if (logit) select(logit);
})();
