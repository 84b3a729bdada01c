/* actatlas viewer: a zoomable activation atlas on a 2-D canvas. No dependencies.
 * World coordinates are [0,1]^2 with y downward; cell (i, j) of a G x G level covers
 * column i and row G-1-j (j grows upward in the layout). */
(function () {
  "use strict";
  var $ = function (id) { return document.getElementById(id); };
  var bundleEl = $("atlas-bundle");
  var BUNDLE = bundleEl ? JSON.parse(bundleEl.textContent) : null;
  var TARGET_CELL_PX = 80;

  function getJSON(url) {
    if (BUNDLE) {
      if (!(url in BUNDLE)) return Promise.reject(new Error("missing " + url));
      return Promise.resolve(BUNDLE[url]);
    }
    return fetch(url).then(function (r) {
      if (!r.ok) throw new Error(url + ": HTTP " + r.status);
      return r.json();
    });
  }

  var images = new Map();
  var pendingImages = 0;
  function getImage(url) {
    var e = images.get(url);
    if (!e) {
      var img = new Image();
      e = { img: img, ok: false, failed: false };
      pendingImages++;
      var done = function () { if (e.ok) return; e.ok = true; pendingImages--; loadedImages++; requestDraw(); };
      img.src = BUNDLE ? BUNDLE[url] : url;
      // decode off the main thread before first use, so panning onto a new sheet does not stall a frame
      if (img.decode) img.decode().then(done, function () { if (img.complete && img.naturalWidth) done(); else { e.failed = true; pendingImages--; } });
      else { img.onload = done; img.onerror = function () { e.failed = true; pendingImages--; }; }
      images.set(url, e);
    }
    return e;
  }
  var loadedImages = 0;

  function b64bytes(s) {
    var bin = atob(s), n = bin.length, out = new Uint8Array(n);
    for (var q = 0; q < n; q++) out[q] = bin.charCodeAt(q);
    return out.buffer;
  }
  function f16(h) {
    var s = (h & 0x8000) ? -1 : 1, e = (h >> 10) & 0x1f, f = h & 0x3ff;
    if (e === 0) return s * Math.pow(2, -14) * (f / 1024);
    if (e === 31) return f ? NaN : s * Infinity;
    return s * Math.pow(2, e - 15) * (1 + f / 1024);
  }
  function fmt(x) {
    if (x === null || x === undefined || !isFinite(x)) return "–";
    var a = Math.abs(x);
    if (a !== 0 && (a < 0.01 || a >= 1000)) return x.toExponential(2);
    return x.toFixed(2);
  }
  function esc(s) {
    return String(s).replace(/[&<>"']/g, function (c) {
      return { "&": "&amp;", "<": "&lt;", ">": "&gt;", '"': "&quot;", "'": "&#39;" }[c];
    });
  }

  // ------------------------------------------------------------------ state
  var canvas = $("atlas"), ctx = canvas.getContext("2d");
  var mini = $("minimap"), mctx = mini.getContext("2d");
  var manifest = null, names = [], nameIndex = new Map();
  var layer = null;                 // manifest layer entry
  var levels = new Map();           // "layer|G" -> level object
  var levelMode = "auto";
  var view = { x: 0.5, y: 0.5, z: 1 }, target = { x: 0.5, y: 0.5, z: 1 };
  var W = 1, H = 1, dpr = 1, zmin = 0.5, zmax = 48;
  var hover = -1, selected = -1, cls = -1, sign = 1, intensity = 1, density = 1, showLabels = true, showTips = true;
  var stats = { ready: false, layer: null, level: 0, drawn: 0, cells: 0, composite: false, drawMs: 0, frames: 0,
                pending: 0, cls: -1, error: null };
  var drawQueued = false, animating = false, lastLevelObj = null;

  function base() { return Math.min(W, H); }
  function k() { return base() * view.z; }
  function toScreen(wx, wy) { return [(wx - view.x) * k() + W / 2, (wy - view.y) * k() + H / 2]; }
  function toWorld(sx, sy) { return [(sx - W / 2) / k() + view.x, (sy - H / 2) / k() + view.y]; }

  // ------------------------------------------------------------------ data
  function loadLevel(entry) {
    var key = layer.name + "|" + entry.size;
    var L = levels.get(key);
    if (L) return L;
    L = { G: entry.size, entry: entry, ready: false, layer: layer.name };
    levels.set(key, L);
    getJSON(entry.url).then(function (d) {
      var m = d.i.length, G = d.size;
      L.m = m; L.d = d; L.icon = d.icon;
      L.grid = new Int32Array(G * G).fill(-1);
      for (var c = 0; c < m; c++) L.grid[(G - 1 - d.j[c]) * G + d.i[c]] = c;
      L.avg = Math.max(1, d.samples) / (G * G);
      L.pstart = null;
      L.ready = true;
      requestDraw();
    }).catch(fail);
    return L;
  }
  function loadHeat(L) {
    if (L.heat || L.heatLoading || !L.entry.heat) return;
    L.heatLoading = true;
    getJSON(L.entry.heat).then(function (h) {
      var idx = new Uint16Array(b64bytes(h.idx)), raw = new Uint16Array(b64bytes(h.val));
      var val = new Float32Array(raw.length);
      for (var q = 0; q < raw.length; q++) val[q] = f16(raw[q]);
      L.heat = { k: h.k, idx: idx, val: val, pos: h.pos, neg: h.neg, cache: new Map() };
      requestDraw();
    }).catch(fail);
  }
  // normalised heat of the current class for each cell of L, or null while loading
  function heatOf(L) {
    if (cls < 0) return null;
    if (!L.heat) { loadHeat(L); return null; }
    var key = cls + "|" + sign;
    var hv = L.heat.cache.get(key);
    if (hv) return hv;
    var K = L.heat.k, m = L.m, out = new Float32Array(m);
    var norm = sign > 0 ? L.heat.pos[cls] : L.heat.neg[cls];
    if (norm > 0) {
      for (var c = 0; c < m; c++) {
        for (var q = 0; q < K; q++) {
          if (L.heat.idx[c * K + q] === cls) { out[c] = Math.max(0, sign * L.heat.val[c * K + q] / norm); break; }
        }
      }
    }
    L.heat.cache.set(key, out);
    return out;
  }
  function iconSrc(L, c) {
    var d = L.d, sh = d.sheets[d.s[c]], slot = d.k[c], ic = d.icon;
    return [getImage(sh.url), (slot % sh.cols) * ic, Math.floor(slot / sh.cols) * ic, ic];
  }

  // ------------------------------------------------------------------ level of detail
  function autoLevel() {
    var best = null, bestErr = Infinity;
    layer.levels.forEach(function (e) {
      var px = k() / e.size, err = Math.abs(Math.log(px / TARGET_CELL_PX));
      if (err < bestErr) { bestErr = err; best = e; }
    });
    return best;
  }
  function currentLevel() {
    var e = null;
    if (levelMode !== "auto") e = layer.levels.find(function (x) { return String(x.size) === String(levelMode); });
    if (!e) e = autoLevel();
    var L = loadLevel(e);
    if (L.ready) { lastLevelObj = L; return L; }
    return (lastLevelObj && lastLevelObj.layer === layer.name) ? lastLevelObj : null;
  }

  // ------------------------------------------------------------------ drawing
  function requestDraw() {
    if (!drawQueued) { drawQueued = true; requestAnimationFrame(frame); }
  }
  var lastFrameT = 0;
  function frame(t) {
    drawQueued = false;
    if (animating) {
      var a = 0.22;
      view.x += (target.x - view.x) * a;
      view.y += (target.y - view.y) * a;
      view.z = Math.exp(Math.log(view.z) + (Math.log(target.z) - Math.log(view.z)) * a);
      if (Math.abs(target.x - view.x) * k() < 0.3 && Math.abs(target.y - view.y) * k() < 0.3 &&
          Math.abs(Math.log(target.z / view.z)) < 0.002) {
        view.x = target.x; view.y = target.y; view.z = target.z; animating = false; scheduleHash();
      }
    }
    draw();
    stats.frames++;
    lastFrameT = t;
    if (animating) requestDraw();
  }

  // pixels per cell of the offscreen composite of a level (side <= 4096 px)
  function compPx(L) { return Math.max(1, Math.min(L.icon, Math.floor(4096 / L.G))); }
  function compositeFor(L, heat) {
    // all cells of L drawn once into an offscreen canvas; reused while many cells are visible
    var key = (heat ? cls + "|" + sign + "|" + intensity : "-") + "|" + density + "|" + loadedImages;
    if (L.comp && L.compKey === key) return L.comp;
    var d = L.d, G = L.G, cp = compPx(L);
    for (var s = 0; s < d.sheets.length; s++) {
      var e = getImage(d.sheets[s].url);
      if (!e.ok) return null;
    }
    var cv = L.comp || document.createElement("canvas");
    cv.width = cv.height = G * cp;
    var c2 = cv.getContext("2d");
    c2.imageSmoothingEnabled = true;
    c2.clearRect(0, 0, cv.width, cv.height);
    for (var c = 0; c < L.m; c++) drawCell(c2, L, c, d.i[c] * cp, (G - 1 - d.j[c]) * cp, cp, heat);
    L.comp = cv; L.compKey = key;
    return cv;
  }

  function drawCell(g, L, c, x, y, cell, heat) {
    var d = L.d, src = iconSrc(L, c);
    if (!src[0].ok) return false;
    var rel = Math.min(1, Math.sqrt(density * d.n[c] / L.avg));
    var sz = cell * rel, off = (cell - sz) / 2;
    var crop = Math.min(8 / Math.max(sz, 1), 0.6) * src[3] / 2;
    if (heat) {
      var a = Math.min(1, heat[c] * intensity);
      g.fillStyle = "#fff";
      g.fillRect(x + off, y + off, sz, sz);
      g.globalAlpha = Math.max(0.06, a);
    }
    g.drawImage(src[0].img, src[1] + crop, src[2] + crop, src[3] - 2 * crop, src[3] - 2 * crop, x + off, y + off, sz, sz);
    if (heat) g.globalAlpha = 1;
    return true;
  }

  function draw() {
    var t0 = performance.now();
    ctx.setTransform(dpr, 0, 0, dpr, 0, 0);
    ctx.fillStyle = "#dfdfdf";
    ctx.fillRect(0, 0, W, H);
    var L = layer ? currentLevel() : null;
    if (!L) { stats.drawn = 0; return; }
    var d = L.d, G = L.G, cell = k() / G;
    var heat = heatOf(L);
    var w0 = toWorld(0, 0), w1 = toWorld(W, H);
    var c0 = Math.max(0, Math.floor(w0[0] * G)), c1 = Math.min(G - 1, Math.floor(w1[0] * G));
    var r0 = Math.max(0, Math.floor(w0[1] * G)), r1 = Math.min(G - 1, Math.floor(w1[1] * G));
    var drawn = 0, visibleArea = (c1 - c0 + 1) * (r1 - r0 + 1);
    ctx.imageSmoothingEnabled = false;  // as the Distill viewer; much cheaper when many icons are scaled
    stats.composite = false;
    if (c1 >= c0 && r1 >= r0) {
      var comp = (visibleArea > 600 && L.m > 600 && cell <= compPx(L) * 1.25) ? compositeFor(L, heat) : null;
      if (comp) {
        var p = toScreen(0, 0);
        ctx.imageSmoothingEnabled = true;
        ctx.drawImage(comp, p[0], p[1], k(), k());
        stats.composite = true;
        for (var rr = r0; rr <= r1; rr++) for (var cc = c0; cc <= c1; cc++) if (L.grid[rr * G + cc] >= 0) drawn++;
      } else {
        for (var r = r0; r <= r1; r++) {
          for (var col = c0; col <= c1; col++) {
            var c = L.grid[r * G + col];
            if (c < 0) continue;
            var s = toScreen(col / G, r / G);
            if (drawCell(ctx, L, c, s[0], s[1], cell, heat)) drawn++;
          }
        }
      }
      if (showLabels && !heat && cell >= 16) drawLabels(L, c0, c1, r0, r1, cell);
      if (cell >= 30) {
        ctx.strokeStyle = "rgba(0,0,0,0.3)"; ctx.lineWidth = 0.5;
        ctx.beginPath();
        for (var r2 = r0; r2 <= r1; r2++) for (var cc2 = c0; cc2 <= c1; cc2++) {
          if (L.grid[r2 * G + cc2] < 0) continue;
          var s2 = toScreen(cc2 / G, r2 / G);
          ctx.rect(s2[0], s2[1], cell, cell);
        }
        ctx.stroke();
      }
    }
    var hl = selected >= 0 ? selected : -1;
    [hl, hover].forEach(function (c, n) {
      if (c < 0 || c >= L.m) return;
      var s3 = toScreen(d.i[c] / G, (G - 1 - d.j[c]) / G);
      ctx.lineWidth = 3; ctx.strokeStyle = n === 0 ? "#1a73e8" : "#000";
      ctx.strokeRect(s3[0], s3[1], cell, cell);
    });
    stats.level = G; stats.drawn = drawn; stats.cells = L.m; stats.layer = layer.name; stats.cls = cls;
    stats.pending = pendingImages;
    stats.zoom = view.z; stats.cellPx = cell;
    if (!stats.ready && drawn > 0 && pendingImages === 0) { stats.ready = true; $("status").textContent = ""; }
    drawMinimap();
    $("loc").textContent = "x " + view.x.toFixed(3) + "  y " + view.y.toFixed(3) + "  zoom " + view.z.toFixed(2) +
      "  grid " + G + "\u00d7" + G;
    stats.drawMs = performance.now() - t0;
  }

  function drawLabels(L, c0, c1, r0, r1, cell) {
    var d = L.d, G = L.G;
    var ey = Math.ceil(60 / cell), ex = Math.ceil(90 / cell), maxw = ex * cell - 6;
    ctx.font = "11px system-ui, sans-serif";
    ctx.textBaseline = "bottom";
    for (var r = r0; r <= r1; r++) {
      if (r % ey) continue;
      for (var col = c0; col <= c1; col++) {
        if (col % ex) continue;
        var c = L.grid[r * G + col];
        if (c < 0 || d.t[c * 5] < 0) continue;
        var name = names[d.t[c * 5]] || String(d.t[c * 5]);
        var s = toScreen(col / G, (r + 1) / G), tw = Math.min(ctx.measureText(name).width, maxw);
        ctx.fillStyle = "rgba(255,255,255,0.8)";
        ctx.fillRect(s[0] + 2, s[1] - 16, tw + 6, 14);
        ctx.fillStyle = "#111";
        ctx.fillText(name, s[0] + 5, s[1] - 3, maxw);
      }
    }
  }

  var miniBg = null, miniKey = "";
  function drawMinimap() {
    var mw = mini.clientWidth || 140, mh = mini.clientHeight || 140;
    if (mini.width !== Math.round(mw * dpr)) { mini.width = Math.round(mw * dpr); mini.height = Math.round(mh * dpr); miniKey = ""; }
    var L = loadLevel(layer.levels[0]);
    mctx.setTransform(dpr, 0, 0, dpr, 0, 0);
    mctx.fillStyle = "#dfdfdf"; mctx.fillRect(0, 0, mw, mh);
    if (L.ready) {
      var key = layer.name + "|" + loadedImages + "|" + mw;
      if (miniKey !== key) {
        miniBg = document.createElement("canvas"); miniBg.width = mini.width; miniBg.height = mini.height;
        var g = miniBg.getContext("2d"), cs = mini.width / L.G;
        g.globalAlpha = 0.6;
        for (var c = 0; c < L.m; c++) drawCell(g, L, c, L.d.i[c] * cs, (L.G - 1 - L.d.j[c]) * cs, cs, null);
        miniKey = key;
      }
      mctx.drawImage(miniBg, 0, 0, mw, mh);
    }
    var w0 = toWorld(0, 0), w1 = toWorld(W, H);
    var x0 = w0[0] * mw, y0 = w0[1] * mh, x1 = w1[0] * mw, y1 = w1[1] * mh;
    mctx.fillStyle = "rgba(255,255,255,0.6)";
    mctx.beginPath(); mctx.rect(0, 0, mw, mh); mctx.rect(x0, y0, x1 - x0, y1 - y0); mctx.fill("evenodd");
    mctx.strokeStyle = "#d00"; mctx.lineWidth = 1.5; mctx.strokeRect(x0, y0, x1 - x0, y1 - y0);
  }

  // ------------------------------------------------------------------ view changes
  function clampView(v) {
    v.z = Math.min(zmax, Math.max(zmin, v.z));
    v.x = Math.min(1, Math.max(0, v.x)); v.y = Math.min(1, Math.max(0, v.y));
    return v;
  }
  function setTarget(x, y, z, animate) {
    target = clampView({ x: x, y: y, z: z });
    if (animate) { animating = true; requestDraw(); }
    else { view = { x: target.x, y: target.y, z: target.z }; animating = false; requestDraw(); scheduleHash(); }
  }
  function zoomAt(factor, sx, sy, animate) {
    var from = animating ? target : view;
    var wx = (sx - W / 2) / (base() * from.z) + from.x, wy = (sy - H / 2) / (base() * from.z) + from.y;
    var z = Math.min(zmax, Math.max(zmin, from.z * factor));
    setTarget(wx - (sx - W / 2) / (base() * z), wy - (sy - H / 2) / (base() * z), z, animate);
  }
  function panBy(dx, dy, animate) {
    var from = animating && animate ? target : view;
    setTarget(from.x - dx / (base() * from.z), from.y - dy / (base() * from.z), from.z, animate);
  }
  function home() { setTarget(0.5, 0.5, 1, true); }

  function resize() {
    var r = canvas.getBoundingClientRect();
    W = Math.max(1, r.width); H = Math.max(1, r.height); dpr = window.devicePixelRatio || 1;
    canvas.width = Math.round(W * dpr); canvas.height = Math.round(H * dpr);
    if (layer) {
      var fine = layer.levels[layer.levels.length - 1];
      zmax = Math.max(8, fine.size * 200 / base());
    }
    requestDraw();
  }

  // ------------------------------------------------------------------ hash
  var hashTimer = null, applyingHash = false;
  function scheduleHash() {
    clearTimeout(hashTimer);
    hashTimer = setTimeout(writeHash, 150);
  }
  function hashString() {
    var p = ["layer=" + encodeURIComponent(layer.name), "level=" + levelMode, "x=" + view.x.toFixed(4),
             "y=" + view.y.toFixed(4), "z=" + view.z.toFixed(3)];
    if (cls >= 0) p.push("class=" + encodeURIComponent(names[cls]), "sign=" + sign);
    return "#" + p.join("&");
  }
  function writeHash() {
    if (!layer || applyingHash) return;
    var h = hashString();
    if (location.hash === h) return;
    try { history.replaceState(null, "", h); } catch (e) { /* sandboxed srcdoc: no URL to update */ }
  }
  function readHash() {
    var out = {};
    (location.hash || "").replace(/^#/, "").split("&").forEach(function (kv) {
      var q = kv.indexOf("=");
      if (q > 0) out[kv.slice(0, q)] = decodeURIComponent(kv.slice(q + 1));
    });
    return out;
  }
  function applyHash() {
    var h = readHash();
    applyingHash = true;
    if (h.layer) {
      var li = manifest.layers.findIndex(function (x) { return x.name === h.layer; });
      if (li >= 0) setLayer(li);
    }
    if (h.level) { levelMode = h.level; $("level").value = h.level; if ($("level").value !== h.level) levelMode = "auto"; }
    if (h["class"] !== undefined) setClass(nameIndex.has(h["class"].toLowerCase()) ? nameIndex.get(h["class"].toLowerCase()) : -1);
    if (h.sign) { sign = h.sign === "-1" ? -1 : 1; $("sign").value = String(sign); }
    var x = parseFloat(h.x), y = parseFloat(h.y), z = parseFloat(h.z);
    if (isFinite(x) && isFinite(y) && isFinite(z)) setTarget(x, y, z, false);
    applyingHash = false;
  }

  // ------------------------------------------------------------------ UI
  function setLayer(li) {
    layer = manifest.layers[li];
    $("layer").value = layer.name;
    var sel = $("level");
    sel.innerHTML = '<option value="auto">auto</option>' + layer.levels.map(function (e) {
      return '<option value="' + e.size + '">' + e.size + "\u00d7" + e.size + "</option>";
    }).join("");
    if (levelMode !== "auto" && !layer.levels.some(function (e) { return String(e.size) === String(levelMode); })) levelMode = "auto";
    sel.value = levelMode;
    hover = -1; selected = -1; closePanel(); lastLevelObj = null; miniKey = "";
    resize();
    layer.levels.forEach(loadLevel);
    scheduleHash();
  }
  function setClass(c) {
    cls = c;
    $("cls").value = c >= 0 ? names[c] : "";
    document.body.classList.toggle("heat", c >= 0);
    requestDraw(); scheduleHash();
  }

  function cellAtScreen(sx, sy) {
    var L = currentLevel();
    if (!L) return -1;
    var w = toWorld(sx, sy), col = Math.floor(w[0] * L.G), row = Math.floor(w[1] * L.G);
    if (col < 0 || row < 0 || col >= L.G || row >= L.G) return -1;
    return L.grid[row * L.G + col];
  }
  function topRows(L, c, limit) {
    var d = L.d, out = [];
    for (var q = 0; q < Math.min(5, limit); q++) {
      var id = d.t[c * 5 + q];
      if (id < 0) continue;
      out.push("<tr><td>" + esc(names[id] || id) + '</td><td class="v">' + fmt(d.v[c * 5 + q]) + "</td></tr>");
    }
    return out.join("");
  }
  function showTooltip(c, sx, sy) {
    var tip = $("tooltip"), L = currentLevel();
    if (c < 0 || !L || !showTips) { tip.hidden = true; return; }
    tip.innerHTML = "<table>" + topRows(L, c, 5) + '</table><div class="avg">Average of ' + L.d.n[c] +
      " activations</div>";
    tip.hidden = false;
    var tw = tip.offsetWidth, th = tip.offsetHeight;
    tip.style.left = Math.min(W - tw - 4, sx + 14) + "px";
    tip.style.top = Math.min(H - th - 4, sy + 14) + "px";
  }
  function openPanel(c) {
    var L = currentLevel();
    if (!L || c < 0) return;
    selected = c;
    var d = L.d;
    $("ptitle").textContent = "Cell (" + d.i[c] + ", " + d.j[c] + ") of the " + L.G + "\u00d7" + L.G + " grid";
    var big = $("bigicon"), g = big.getContext("2d"), src = iconSrc(L, c);
    g.imageSmoothingEnabled = false;
    g.fillStyle = "#fff"; g.fillRect(0, 0, big.width, big.height);
    var drawBig = function () { g.drawImage(src[0].img, src[1], src[2], src[3], src[3], 0, 0, big.width, big.height); };
    if (src[0].ok) drawBig(); else src[0].img.addEventListener("load", drawBig, { once: true });
    $("pinfo").innerHTML = "<div>Average of " + d.n[c] + " activations</div><table>" +
      "<tr><td>icon fidelity</td><td class=\"v\">" + fmt(d.f[c]) + "</td></tr>" +
      "<tr><td>best real member fidelity</td><td class=\"v\">" + fmt(d.mf[c]) + "</td></tr></table>" +
      "<h3>Top classes (mean attribution)</h3><table>" + topRows(L, c, 5) + "</table>";
    var box = $("patches");
    box.innerHTML = "";
    var P = d.patches, np = d.pc[c] || 0;
    if (!P || np === 0) box.textContent = "no patches exported";
    else {
      var sheet = Math.floor(c / P.cells_per_sheet), e = getImage(P.sheets[sheet]);
      for (var q = 0; q < np; q++) {
        var slot = (c % P.cells_per_sheet) * P.per_cell + q;
        var pc = document.createElement("canvas");
        pc.width = pc.height = P.size; pc.className = "patch";
        pc.setAttribute("aria-label", "image patch " + (q + 1));
        box.appendChild(pc);
        (function (pc, slot) {
          var paint = function () {
            pc.getContext("2d").drawImage(e.img, (slot % P.cols) * P.size, Math.floor(slot / P.cols) * P.size,
                                          P.size, P.size, 0, 0, P.size, P.size);
            pc.dataset.painted = "1";
          };
          if (e.ok) paint(); else e.img.addEventListener("load", paint, { once: true });
        })(pc, slot);
      }
    }
    $("panel").hidden = false;
    requestDraw();
  }
  function closePanel() { $("panel").hidden = true; selected = -1; requestDraw(); }

  // pointer handling: drag to pan, two pointers to pinch, click to select
  var pointers = new Map(), dragMoved = 0, pinch = null;
  canvas.addEventListener("pointerdown", function (e) {
    canvas.setPointerCapture(e.pointerId);
    pointers.set(e.pointerId, { x: e.offsetX, y: e.offsetY });
    dragMoved = pointers.size > 1 ? 99 : 0;
    animating = false; target = { x: view.x, y: view.y, z: view.z };
    canvas.classList.add("dragging");
    if (pointers.size === 2) {
      var p = Array.from(pointers.values());
      pinch = { d: Math.hypot(p[0].x - p[1].x, p[0].y - p[1].y) };
    }
  });
  canvas.addEventListener("pointermove", function (e) {
    var p = pointers.get(e.pointerId);
    if (!p) {
      var c = cellAtScreen(e.offsetX, e.offsetY);
      if (c !== hover) { hover = c; requestDraw(); }
      showTooltip(c, e.offsetX, e.offsetY);
      return;
    }
    var dx = e.offsetX - p.x, dy = e.offsetY - p.y;
    p.x = e.offsetX; p.y = e.offsetY;
    if (pointers.size === 2 && pinch) {
      var q = Array.from(pointers.values()), dist = Math.hypot(q[0].x - q[1].x, q[0].y - q[1].y);
      if (pinch.d > 0) zoomAt(dist / pinch.d, (q[0].x + q[1].x) / 2, (q[0].y + q[1].y) / 2, false);
      pinch.d = dist;
      panBy(dx / 2, dy / 2, false);
      return;
    }
    dragMoved += Math.abs(dx) + Math.abs(dy);
    $("tooltip").hidden = true;
    panBy(dx, dy, false);
  });
  function endPointer(e) {
    if (!pointers.has(e.pointerId)) return;
    pointers.delete(e.pointerId);
    if (pointers.size < 2) pinch = null;
    if (pointers.size === 0) {
      canvas.classList.remove("dragging");
      if (dragMoved < 5 && e.type === "pointerup") {
        var c = cellAtScreen(e.offsetX, e.offsetY);
        if (c >= 0) openPanel(c); else closePanel();
      }
    }
  }
  canvas.addEventListener("pointerup", endPointer);
  canvas.addEventListener("pointercancel", endPointer);
  canvas.addEventListener("pointerleave", function () { if (!pointers.size) { hover = -1; $("tooltip").hidden = true; requestDraw(); } });
  canvas.addEventListener("wheel", function (e) {
    e.preventDefault();
    var dy = e.deltaY * (e.deltaMode === 1 ? 40 : e.deltaMode === 2 ? 800 : 1);
    zoomAt(Math.exp(-dy / 500 * (e.ctrlKey ? 3 : 1)), e.offsetX, e.offsetY, true);
  }, { passive: false });

  function miniMove(e) {
    var r = mini.getBoundingClientRect();
    setTarget((e.clientX - r.left) / r.width, (e.clientY - r.top) / r.height, view.z, false);
  }
  var miniDown = false;
  mini.addEventListener("pointerdown", function (e) { miniDown = true; mini.setPointerCapture(e.pointerId); miniMove(e); });
  mini.addEventListener("pointermove", function (e) { if (miniDown) miniMove(e); });
  mini.addEventListener("pointerup", function () { miniDown = false; });

  $("home").addEventListener("click", home);
  $("zin").addEventListener("click", function () { zoomAt(2, W / 2, H / 2, true); });
  $("zout").addEventListener("click", function () { zoomAt(0.5, W / 2, H / 2, true); });
  $("close").addEventListener("click", closePanel);
  document.addEventListener("keydown", function (e) {
    var tag = (e.target && e.target.tagName) || "";
    if (/^(INPUT|SELECT|TEXTAREA)$/.test(tag) || e.ctrlKey || e.metaKey || e.altKey) return;
    var step = Math.min(W, H) * 0.15, done = true;
    switch (e.key) {
      case "+": case "=": zoomAt(2, W / 2, H / 2, true); break;
      case "-": case "_": zoomAt(0.5, W / 2, H / 2, true); break;
      case "0": home(); break;
      case "ArrowLeft": panBy(step, 0, true); break;
      case "ArrowRight": panBy(-step, 0, true); break;
      case "ArrowUp": panBy(0, step, true); break;
      case "ArrowDown": panBy(0, -step, true); break;
      case "Escape": closePanel(); break;
      default: done = false;
    }
    if (done) e.preventDefault();
  });
  $("layer").addEventListener("change", function () {
    var li = manifest.layers.findIndex(function (x) { return x.name === $("layer").value; });
    if (li >= 0) setLayer(li);
  });
  $("level").addEventListener("change", function () { levelMode = $("level").value; requestDraw(); scheduleHash(); });
  function classFromInput() {
    var v = $("cls").value.trim().toLowerCase();
    if (!v) { setClass(-1); return; }
    if (nameIndex.has(v)) setClass(nameIndex.get(v));
  }
  $("cls").addEventListener("change", classFromInput);
  $("cls").addEventListener("input", classFromInput);
  $("clsclear").addEventListener("click", function () { setClass(-1); });
  $("sign").addEventListener("change", function () { sign = $("sign").value === "-1" ? -1 : 1; requestDraw(); scheduleHash(); });
  $("intensity").addEventListener("input", function () { intensity = parseFloat($("intensity").value) || 1; requestDraw(); });
  $("density").addEventListener("input", function () { density = parseFloat($("density").value) || 1; requestDraw(); });
  $("labels").addEventListener("change", function () { showLabels = $("labels").checked; requestDraw(); });
  $("tips").addEventListener("change", function () { showTips = $("tips").checked; if (!showTips) $("tooltip").hidden = true; });
  $("share").addEventListener("click", function () {
    writeHash();
    var url = location.href;
    if (navigator.clipboard && navigator.clipboard.writeText) navigator.clipboard.writeText(url).catch(function () {});
    $("status").textContent = "link: " + url;
    setTimeout(function () { if (stats.ready) $("status").textContent = ""; }, 4000);
  });
  window.addEventListener("resize", resize);
  window.addEventListener("hashchange", function () { if (manifest && location.hash !== hashString()) applyHash(); });

  function fail(err) {
    stats.error = String(err && err.message || err);
    $("status").textContent = "error: " + stats.error;
    if (window.console) console.error(err);
  }

  // read-only debug/test hooks
  window.atlasViewer = Object.freeze({
    get stats() { return Object.assign({}, stats); },
    get view() { return { x: view.x, y: view.y, z: view.z, level: levelMode }; },
    hash: function () { return hashString(); },
    cellCenter: function (i, j) {
      var L = currentLevel();
      if (!L) return null;
      var s = toScreen((i + 0.5) / L.G, (L.G - 1 - j + 0.5) / L.G), r = canvas.getBoundingClientRect();
      return { x: r.left + s[0], y: r.top + s[1] };
    },
    panBy: function (dx, dy) { panBy(dx, dy, false); },
    setView: function (x, y, z) { setTarget(x, y, z, false); }
  });

  getJSON("manifest.json").then(function (m) {
    manifest = m;
    names = m.class_names || [];
    names.forEach(function (n, q) { if (!nameIndex.has(String(n).toLowerCase())) nameIndex.set(String(n).toLowerCase(), q); });
    document.title = m.title || "Activation atlas";
    $("title").textContent = m.title || "Activation atlas";
    $("layer").innerHTML = m.layers.map(function (l) { return "<option>" + esc(l.name) + "</option>"; }).join("");
    $("layer").disabled = m.layers.length < 2;
    $("classlist").innerHTML = names.map(function (n) { return '<option value="' + esc(n) + '">'; }).join("");
    var anyHeat = m.layers.some(function (l) { return l.levels.some(function (e) { return !!e.heat; }); });
    if (!anyHeat) $("classfilter").hidden = true;
    setLayer(0);
    applyHash();
    requestDraw();
  }).catch(fail);
})();
