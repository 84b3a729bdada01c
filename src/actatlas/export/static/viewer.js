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
  // an ArrayBuffer: a fetched binary file, or its base64 text in the single-file bundle
  function getBinary(url) {
    if (BUNDLE) {
      if (!(url in BUNDLE)) return Promise.reject(new Error("missing " + url));
      return Promise.resolve(b64bytes(BUNDLE[url]));
    }
    return fetch(url).then(function (r) {
      if (!r.ok) throw new Error(url + ": HTTP " + r.status);
      return r.arrayBuffer();
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
  function fmtTick(x) {
    if (!isFinite(x) || x === 0) return "0";
    var a = Math.abs(x);
    if (a < 1e-3 || a >= 1e4) return x.toExponential(1).replace("e-", "e\u2212").replace("-", "\u2212");
    return String(Number(x.toPrecision(2))).replace("-", "\u2212");
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
  var filterMode = "weighted";      // class view: "weighted" by the class's attribution, or "winner" cells only
  var stats = { ready: false, layer: null, level: 0, drawn: 0, cells: 0, composite: false, drawMs: 0, frames: 0,
                pending: 0, cls: -1, error: null, filter: "weighted", sign: 1, heatCells: null, heatShown: null,
                heatMax: null, heatFormat: null, classError: null, layerIndex: 0, aligned: false, links: null };
  var drawQueued = false, animating = false, lastLevelObj = null;

  function base() { return Math.min(W, H); }
  function k() { return base() * view.z; }
  function toScreen(wx, wy) { return [(wx - view.x) * k() + W / 2, (wy - view.y) * k() + H / 2]; }
  function toWorld(sx, sy) { return [(sx - W / 2) / k() + view.x, (sy - H / 2) / k() + view.y]; }

  // ------------------------------------------------------------------ data
  // a level of layer entry `le` (default: the current layer), loaded once
  function loadLevel(entry, le) {
    le = le || layer;
    var key = le.name + "|" + entry.size;
    var L = levels.get(key);
    if (L) return L;
    L = { G: entry.size, entry: entry, ready: false, layer: le.name, layerEntry: le };
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
  // ---- class heat, format 2: one binary file per class (see export/site.py), fetched on demand
  var classFiles = new Map();       // "layer|c" -> {ready, failed, pos[], neg[], q[] (Int8Array per level)}
  function classFile(le, c) {
    var key = le.name + "|" + c, F = classFiles.get(key);
    if (F) return F;
    var ch = le.class_heat;
    F = { ready: false, failed: false };
    classFiles.set(key, F);
    getBinary(ch.url.replace("{c}", String(c))).then(function (buf) {
      var nl = ch.levels.length, dv = new DataView(buf), off = 8 * nl;
      F.pos = []; F.neg = []; F.q = [];
      for (var l = 0; l < nl; l++) {
        F.pos.push(dv.getFloat32(8 * l, true)); F.neg.push(dv.getFloat32(8 * l + 4, true));
        F.q.push(new Int8Array(buf, off, ch.cells[l]));
        off += ch.cells[l];
      }
      if (off > buf.byteLength) throw new Error("class heat file of class " + c + " is truncated");
      F.ready = true;
      requestDraw();
    }).catch(function (err) { F.failed = true; F.error = String(err && err.message || err); requestDraw(); });
    return F;
  }
  // ---- format 1 (sites exported before full class heat): each cell's top-K classes only
  function loadHeat(L) {
    if (L.heat || L.heatLoading || !L.entry.heat) return;
    L.heatLoading = true;
    getJSON(L.entry.heat).then(function (h) {
      var idx = new Uint16Array(b64bytes(h.idx)), raw = new Uint16Array(b64bytes(h.val));
      var val = new Float32Array(raw.length);
      for (var q = 0; q < raw.length; q++) val[q] = f16(raw[q]);
      L.heat = { k: h.k, idx: idx, val: val, pos: h.pos, neg: h.neg };
      requestDraw();
    }).catch(fail);
  }
  function truncatedHeat(L) {
    if (!L.heat) { loadHeat(L); return null; }
    var H = L.heat, K = H.k, m = L.m, heat = new Float32Array(m), attr = new Float32Array(m);
    var norm = sign > 0 ? H.pos[cls] : H.neg[cls];
    for (var c = 0; c < m; c++) {
      var best = -Infinity, bestId = -1;
      for (var q = 0; q < K; q++) {
        var id = H.idx[c * K + q], v = H.val[c * K + q];
        if (id === 65535) continue;
        if (id === cls) attr[c] = v;
        if (sign * v > best) { best = sign * v; bestId = id; }
      }
      if (filterMode === "winner") heat[c] = bestId === cls && best > 0 ? 1 : 0;
      else heat[c] = norm > 0 ? Math.max(0, sign * attr[c] / norm) : 0;
    }
    return { heat: heat, attr: attr, max: norm, truncated: K };
  }
  function fullHeat(L) {
    var ch = L.layerEntry.class_heat, li = ch.levels.indexOf(L.G);
    if (li < 0 || ch.cells[li] !== L.m) return { heat: null, note: "no class data at this level" };
    var F = classFile(L.layerEntry, cls);
    if (F.failed) return { heat: null, note: "could not load the class heat: " + F.error };
    if (!F.ready) return null;
    var q = F.q[li], m = L.m, heat = new Float32Array(m), attr = new Float32Array(m), sc = ch.scale;
    var pos = F.pos[li], neg = F.neg[li], win = sign > 0 ? L.d.w : L.d.wn;
    for (var c = 0; c < m; c++) {
      var v = q[c];
      attr[c] = v > 0 ? v / sc * pos : v / sc * neg;
      if (filterMode === "winner") heat[c] = win && win[c] === cls ? 1 : 0;
      else heat[c] = sign * v > 0 ? sign * v / sc : 0;
    }
    return { heat: heat, attr: attr, max: sign > 0 ? pos : neg, truncated: 0 };
  }
  // the class view of level L: {heat: Float32Array [m] in [0, 1] or null, attr, max, cells, truncated, note},
  // or null while its data loads
  function heatInfo(L) {
    if (cls < 0) return null;
    var key = cls + "|" + sign + "|" + filterMode;
    if (L.heatKey === key) return L.heatVal;
    var r = L.layerEntry.class_heat ? fullHeat(L)
      : L.entry.heat ? truncatedHeat(L) : { heat: null, note: "this export has no class data" };
    if (!r) return null;
    r.key = key; r.cells = 0;
    if (r.heat) for (var c = 0; c < L.m; c++) if (r.heat[c] > 0.1) r.cells++;
    L.heatKey = key; L.heatVal = r;
    return r;
  }
  // ---- aligned layers: where the samples of a cell lie in the neighbouring layers (the level's links,
  // see export/site.py); drawn over the map, which aligned layers share
  var LINK_RGB = { prev: "0,137,123", next: "230,81,0" }, LINK_NAME = { prev: "previous", next: "next" };
  function neighbourLevel(name, G) {
    var le = manifest.layers.find(function (x) { return x.name === name; });
    var e = le && le.levels.find(function (x) { return x.size === G; });
    if (!e) return null;
    var NL = loadLevel(e, le);
    return NL.ready ? NL : null;
  }
  // {prev, next}: {layer, cells: [[cell, i, j, samples], ...] most first, total, same (samples in the same
  // place), ready} for cell c of level L; null without links
  function linkInfo(L, c) {
    var links = L && L.d && L.d.links;
    if (!links || c < 0 || c >= L.m) return null;
    var out = {};
    ["prev", "next"].forEach(function (side) {
      var lk = links[side];
      if (!lk) return;
      var NL = neighbourLevel(lk.layer, L.G), info = { layer: lk.layer, cells: [], total: 0, same: 0, ready: !!NL };
      for (var q = lk.o[c]; q < lk.o[c + 1]; q++) {
        var t = lk.c[q], n = lk.n[q];
        info.total += n;
        if (!NL) continue;
        info.cells.push([t, NL.d.i[t], NL.d.j[t], n]);
        if (NL.d.i[t] === L.d.i[c] && NL.d.j[t] === L.d.j[c]) info.same += n;
      }
      out[side] = info;
    });
    return out;
  }
  function drawLinks(L, c) {
    var info = linkInfo(L, c);
    if (!info) return null;
    var G = L.G, cell = k() / G;
    ["prev", "next"].forEach(function (side) {
      var s = info[side];
      if (!s || !s.cells.length) return;
      var mx = s.cells[0][3], inset = Math.min(side === "prev" ? 2 : 5, cell / 4);
      ctx.save();
      ctx.setLineDash(side === "prev" ? [5, 3] : []);
      s.cells.forEach(function (t) {
        var p = toScreen(t[1] / G, (G - 1 - t[2]) / G), a = t[3] / mx;
        ctx.fillStyle = "rgba(" + LINK_RGB[side] + "," + (0.1 + 0.3 * a).toFixed(3) + ")";
        ctx.fillRect(p[0], p[1], cell, cell);
        ctx.lineWidth = 1 + 2 * a;
        ctx.strokeStyle = "rgba(" + LINK_RGB[side] + ",0.95)";
        ctx.strokeRect(p[0] + inset, p[1] + inset, cell - 2 * inset, cell - 2 * inset);
      });
      ctx.restore();
    });
    return info;
  }
  function linkStats(info) {
    if (!info) return null;
    var out = {};
    Object.keys(info).forEach(function (side) {
      var s = info[side];
      out[side] = { layer: s.layer, cells: s.cells.length, samples: s.total, same: s.same, ready: s.ready };
    });
    return out;
  }
  function linkRows(L, c) {
    var info = linkInfo(L, c);
    if (!info) return "";
    var rows = ["prev", "next"].filter(function (side) { return info[side]; }).map(function (side) {
      var s = info[side], n = L.d.n[c];
      return '<div><span class="sw" style="background:rgb(' + LINK_RGB[side] + ')"></span>in ' + esc(s.layer) +
        " (" + LINK_NAME[side] + "): " + (s.ready ? Math.round(100 * s.same / Math.max(1, n)) + "% in this place, " +
        s.cells.length + " cells" : "loading\u2026") + "</div>";
    });
    return rows.length ? '<div class="links">' + rows.join("") + "</div>" : "";
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
  function compositeFor(L) {
    // all icons of L drawn once into an offscreen canvas; reused while many cells are visible
    var key = density + "|" + loadedImages;
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
    for (var c = 0; c < L.m; c++) drawCell(c2, L, c, d.i[c] * cp, (G - 1 - d.j[c]) * cp, cp, null);
    L.comp = cv; L.compKey = key;
    return cv;
  }
  // the class view over the composite: per cell a veil (white, or the colour on cells too small for a frame)
  // of alpha 1 - max(0.06, a) and a frame in the colour of a, as drawCell draws them; cells are grouped by
  // a (in steps of 1/100) so that the whole level takes ~200 path fills instead of 25k image draws
  function heatOverlayFor(L, hinfo) {
    var key = hinfo.key + "|" + intensity + "|" + L.compKey;
    if (L.hov && L.hovKey === key) return L.hov;
    var d = L.d, G = L.G, cp = compPx(L), heat = hinfo.heat;
    var cv = L.hov || document.createElement("canvas");
    if (cv.width !== G * cp) cv.width = cv.height = G * cp;
    var g = cv.getContext("2d");
    g.clearRect(0, 0, cv.width, cv.height);
    var buckets = [];
    for (var c = 0; c < L.m; c++) {
      var b = Math.round(Math.min(1, heat[c] * intensity) * 100);
      (buckets[b] || (buckets[b] = [])).push(c);
    }
    for (b = 0; b <= 100; b++) {
      var cells = buckets[b];
      if (!cells) continue;
      var a = b / 100, veil = 1 - Math.max(0.06, a), col = ramp(a), rgb = rampRGB(a, sign);
      var inner = new Path2D(), small = new Path2D(), ring = new Path2D(), nSmall = 0;
      for (var q = 0; q < cells.length; q++) {
        c = cells[q];
        // whole composite pixels (within half a pixel of the icon drawCell drew): no anti-aliased edges to raster
        var rel = Math.min(1, Math.sqrt(density * d.n[c] / L.avg)), sz = cp * rel, off = Math.round((cp - sz) / 2);
        var x = d.i[c] * cp + off, y = (G - 1 - d.j[c]) * cp + off;
        var fw = sz >= 8 ? Math.round(Math.max(1, Math.min(4, sz * 0.08))) : 0;
        sz = Math.round(sz);
        if (!fw) { small.rect(x, y, sz, sz); nSmall++; continue; }
        inner.rect(x + fw, y + fw, sz - 2 * fw, sz - 2 * fw);
        ring.rect(x, y, sz, sz); ring.rect(x + fw, y + fw, sz - 2 * fw, sz - 2 * fw);
      }
      if (veil > 0) {
        g.fillStyle = "rgba(255,255,255," + veil + ")"; g.fill(inner);
        if (nSmall) { g.fillStyle = "rgba(" + rgb.join(",") + "," + veil + ")"; g.fill(small); }
      }
      g.fillStyle = col; g.fill(ring, "evenodd");
    }
    L.hov = cv; L.hovKey = key;
    return cv;
  }

  function drawCell(g, L, c, x, y, cell, heat) {
    var d = L.d, src = iconSrc(L, c);
    if (!src[0].ok) return false;
    var rel = Math.min(1, Math.sqrt(density * d.n[c] / L.avg));
    var sz = cell * rel, off = (cell - sz) / 2;
    var crop = Math.min(8 / Math.max(sz, 1), 0.6) * src[3] / 2;
    if (heat) {
      // class view: a frame in the legend's colour, the icon faded to white by the same amount
      var a = Math.min(1, heat[c] * intensity), fw = sz >= 8 ? Math.max(1, Math.min(4, sz * 0.08)) : 0;
      g.fillStyle = ramp(a);
      g.fillRect(x + off, y + off, sz, sz);
      if (fw) { g.fillStyle = "#fff"; g.fillRect(x + off + fw, y + off + fw, sz - 2 * fw, sz - 2 * fw); }
      g.globalAlpha = Math.max(0.06, a);
      g.drawImage(src[0].img, src[1] + crop, src[2] + crop, src[3] - 2 * crop, src[3] - 2 * crop,
                  x + off + fw, y + off + fw, sz - 2 * fw, sz - 2 * fw);
      g.globalAlpha = 1;
      return true;
    }
    g.drawImage(src[0].img, src[1] + crop, src[2] + crop, src[3] - 2 * crop, src[3] - 2 * crop, x + off, y + off, sz, sz);
    return true;
  }
  // colour scale of the class view (ColorBrewer Oranges for positive, Blues for negative influence)
  var RAMPS = { "1": [[255, 255, 255], [253, 174, 107], [217, 72, 1]], "-1": [[255, 255, 255], [107, 174, 214], [8, 81, 156]] };
  var rampCache = {};
  function rampRGB(t, sg) {
    var st = RAMPS[sg > 0 ? "1" : "-1"], u = Math.max(0, Math.min(1, t)) * 2, k0 = Math.min(1, Math.floor(u)), f = u - k0;
    return [0, 1, 2].map(function (q) { return Math.round(st[k0][q] + (st[k0 + 1][q] - st[k0][q]) * f); });
  }
  function ramp(t) {
    var key = sign + ":" + Math.round(Math.max(0, Math.min(1, t)) * 100);
    var v = rampCache[key];
    if (!v) { var c = rampRGB(Math.round(t * 100) / 100, sign); v = rampCache[key] = "rgb(" + c.join(",") + ")"; }
    return v;
  }

  function draw() {
    var t0 = performance.now();
    ctx.setTransform(dpr, 0, 0, dpr, 0, 0);
    ctx.fillStyle = "#dfdfdf";
    ctx.fillRect(0, 0, W, H);
    var L = layer ? currentLevel() : null;
    if (!L) { stats.drawn = 0; return; }
    var d = L.d, G = L.G, cell = k() / G;
    var hinfo = heatInfo(L), heat = hinfo ? hinfo.heat : null;
    var w0 = toWorld(0, 0), w1 = toWorld(W, H);
    var c0 = Math.max(0, Math.floor(w0[0] * G)), c1 = Math.min(G - 1, Math.floor(w1[0] * G));
    var r0 = Math.max(0, Math.floor(w0[1] * G)), r1 = Math.min(G - 1, Math.floor(w1[1] * G));
    var drawn = 0, visibleArea = (c1 - c0 + 1) * (r1 - r0 + 1);
    ctx.imageSmoothingEnabled = false;  // as the Distill viewer; much cheaper when many icons are scaled
    stats.composite = false;
    if (c1 >= c0 && r1 >= r0) {
      var comp = (visibleArea > 600 && L.m > 600 && cell <= compPx(L) * 1.25) ? compositeFor(L) : null;
      if (comp) {
        var p = toScreen(0, 0);
        ctx.imageSmoothingEnabled = true;
        ctx.drawImage(comp, p[0], p[1], k(), k());
        if (heat) ctx.drawImage(heatOverlayFor(L, hinfo), p[0], p[1], k(), k());
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
    stats.links = hover >= 0 ? linkStats(drawLinks(L, hover)) : null;
    if (tipAt && tipAt.c === hover && tipAt.ready !== linksReady(stats.links)) showTooltip(hover, tipAt.x, tipAt.y);
    [hl, hover].forEach(function (c, n) {
      if (c < 0 || c >= L.m) return;
      var s3 = toScreen(d.i[c] / G, (G - 1 - d.j[c]) / G);
      ctx.lineWidth = 3; ctx.strokeStyle = n === 0 ? "#1a73e8" : "#000";
      ctx.strokeRect(s3[0], s3[1], cell, cell);
    });
    stats.level = G; stats.drawn = drawn; stats.cells = L.m; stats.layer = layer.name; stats.cls = cls;
    stats.filter = filterMode; stats.sign = sign;
    stats.heatCells = heat ? hinfo.cells : null; stats.heatShown = heat ? hinfo.key : null;
    stats.heatMax = heat ? hinfo.max : null;
    stats.heatFormat = cls < 0 ? null : layer.class_heat ? "full" : (L.entry.heat ? "truncated" : "none");
    drawLegend(L, hinfo);
    stats.pending = pendingImages;
    stats.zoom = view.z; stats.cellPx = cell;
    if (!stats.ready && drawn > 0 && pendingImages === 0) { stats.ready = true; $("status").textContent = ""; }
    drawMinimap();
    $("loc").textContent = "x " + view.x.toFixed(3) + "  y " + view.y.toFixed(3) + "  zoom " + view.z.toFixed(2) +
      "  grid " + G + "\u00d7" + G;
    stats.drawMs = performance.now() - t0;
  }

  // ------------------------------------------------------------------ legend of the class view
  var legendKey = "";
  function drawLegend(L, hinfo) {
    var el = $("legend");
    var key = cls < 0 ? "" : [layer.name, L.G, cls, sign, filterMode, intensity, hinfo ? hinfo.key : "loading",
                              hinfo && hinfo.note].join("|");
    if (key === legendKey) return;
    legendKey = key;
    if (cls < 0) { el.hidden = true; el.innerHTML = ""; return; }
    var infl = sign > 0 ? "positive influence" : "negative influence";
    var html = '<div class="lg-title">' + esc(names[cls]) + "</div>" +
      '<div class="lg-sub">' + infl + " \u00b7 " + (filterMode === "winner" ? "winner" : "weighted") + " \u00b7 grid " +
      L.G + "\u00d7" + L.G + "</div>";
    if (!hinfo) html += '<div class="lg-note">loading class heat\u2026</div>';
    else if (!hinfo.heat) html += '<div class="lg-note">' + esc(hinfo.note || "no class data") + "</div>";
    else if (filterMode === "winner") {
      html += '<div class="lg-row"><span class="sw" style="background:' + ramp(1) + '"></span><span>' +
        (sign > 0 ? "top class is " : "most negative class is ") + esc(names[cls]) + ' (<b id="lg-count">' +
        hinfo.cells + "</b> of " + L.m + " cells)</span></div>" +
        '<div class="lg-row"><span class="sw" style="background:#fff"></span><span>other cells (faded)</span></div>';
    } else {
      var stops = [];
      for (var q = 0; q <= 10; q++) stops.push(ramp(q / 10) + " " + q * 10 + "%");
      var ticks = [];
      for (var t = 0; t <= 4; t++) {
        var v = sign * hinfo.max * (t / 4) / intensity;
        ticks.push("<span>" + (t === 4 && intensity > 1 ? "\u2265" : "") + fmtTick(v) + "</span>");
      }
      html += '<div class="lg-bar" style="background:linear-gradient(to right,' + stops.join(",") + ')"></div>' +
        '<div class="lg-ticks">' + ticks.join("") + "</div>" +
        '<div class="lg-note">mean attribution per cell, scaled to the class\u2019s ' +
        (sign > 0 ? "largest" : "most negative") + ' value on this grid; <b id="lg-count">' + hinfo.cells + "</b> of " +
        L.m + " cells above 10 %</div>";
    }
    if (hinfo && hinfo.truncated) {
      html += '<div class="lg-warn" id="lg-truncated">This site was exported before full class heat: it keeps only ' +
        "each cell's top " + hinfo.truncated + " classes, so a cell where the class ranks lower shows as 0. " +
        "Export the run again to see every class in every cell.</div>";
    }
    el.innerHTML = html;
    el.hidden = false;
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
    if (cls >= 0) p.push("class=" + encodeURIComponent(names[cls]), "sign=" + sign, "filter=" + filterMode);
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
    if (h.sign) { sign = h.sign === "-1" ? -1 : 1; $("sign").value = String(sign); }
    if (h.filter) setFilter(h.filter === "winner" ? "winner" : "weighted");
    if (h["class"] !== undefined) {
      var c = lookupClass(h["class"], true);
      if (c >= 0 || !h["class"].trim()) setClass(c);
      else { setClass(-1); $("cls").value = h["class"]; unknownClass(h["class"]); }
    }
    var x = parseFloat(h.x), y = parseFloat(h.y), z = parseFloat(h.z);
    if (isFinite(x) && isFinite(y) && isFinite(z)) setTarget(x, y, z, false);
    applyingHash = false;
  }

  // ------------------------------------------------------------------ UI
  // another layer, the view kept (aligned layers share their places, so the same spot shows the same samples)
  function setLayer(li) {
    layer = manifest.layers[li];
    $("layer").value = layer.name;
    $("layerslider").value = String(li);
    $("layerpos").textContent = (li + 1) + "/" + manifest.layers.length + (manifest.aligned ? " aligned" : "");
    stats.layerIndex = li;
    var sel = $("level");
    sel.innerHTML = '<option value="auto">auto</option>' + layer.levels.map(function (e) {
      return '<option value="' + e.size + '">' + e.size + "\u00d7" + e.size + "</option>";
    }).join("");
    if (levelMode !== "auto" && !layer.levels.some(function (e) { return String(e.size) === String(levelMode); })) levelMode = "auto";
    sel.value = levelMode;
    hover = -1; selected = -1; closePanel(); lastLevelObj = null; miniKey = ""; tipAt = null;
    resize();
    layer.levels.forEach(function (e) { loadLevel(e); });
    if (manifest.aligned) {   // the neighbours' levels too: hovering a cell shows where its samples lie there
      [li - 1, li + 1].forEach(function (n) {
        var ne = manifest.layers[n];
        if (ne) ne.levels.forEach(function (e) { loadLevel(e, ne); });
      });
    }
    scheduleHash();
  }
  function setClass(c, keepText) {
    cls = c;
    if (!keepText) $("cls").value = c >= 0 ? names[c] : "";
    clearClassMessage();
    document.body.classList.toggle("heat", c >= 0);
    requestDraw(); scheduleHash();
  }
  function setFilter(mode) {
    filterMode = mode === "winner" ? "winner" : "weighted";
    var r = document.querySelector('input[name="filter"][value="' + filterMode + '"]');
    if (r) r.checked = true;
    requestDraw(); scheduleHash();
  }
  function normName(x) { return String(x).toLowerCase().replace(/_/g, " ").trim(); }
  // a class name (any case, "_" for " ") or, when allowIndex, a class index
  function lookupClass(text, allowIndex) {
    var v = normName(text);
    if (!v) return -1;
    if (nameIndex.has(v)) return nameIndex.get(v);
    if (allowIndex && /^\d+$/.test(v) && +v < names.length) return +v;
    return -1;
  }
  // Python's difflib.SequenceMatcher(None, a, b).ratio() (no junk: names are < 200 characters)
  function seqRatio(a, b) {
    if (!a.length && !b.length) return 1;
    var b2j = new Map();
    for (var j = 0; j < b.length; j++) { var e = b2j.get(b[j]); if (!e) b2j.set(b[j], e = []); e.push(j); }
    function longest(alo, ahi, blo, bhi) {
      var bi = alo, bj = blo, bs = 0, j2len = new Map();
      for (var i = alo; i < ahi; i++) {
        var nj = new Map(), js = b2j.get(a[i]) || [];
        for (var q = 0; q < js.length; q++) {
          var jj = js[q];
          if (jj < blo) continue;
          if (jj >= bhi) break;
          var kk = (j2len.get(jj - 1) || 0) + 1;
          nj.set(jj, kk);
          if (kk > bs) { bi = i - kk + 1; bj = jj - kk + 1; bs = kk; }
        }
        j2len = nj;
      }
      return [bi, bj, bs];
    }
    var queue = [[0, a.length, 0, b.length]], matched = 0;
    while (queue.length) {
      var t = queue.pop(), x = longest(t[0], t[1], t[2], t[3]);
      if (!x[2]) continue;
      matched += x[2];
      if (t[0] < x[0] && t[2] < x[1]) queue.push([t[0], x[0], t[2], x[1]]);
      if (x[0] + x[2] < t[1] && x[1] + x[2] < t[3]) queue.push([x[0] + x[2], t[1], x[1] + x[2], t[3]]);
    }
    return 2 * matched / (a.length + b.length);
  }
  // close class names as the CLI suggests them (difflib.get_close_matches(word, names, n=5, cutoff=0.6) on
  // lower-cased names); names containing the text when difflib finds none
  function suggest(text, n) {
    n = n || 5;
    var w = normName(text), scored = [], seen = new Set();
    if (!w) return [];
    names.forEach(function (nm) {
      var x = normName(nm);
      if (seen.has(x)) return;
      seen.add(x);
      var la = x.length, lb = w.length;
      if (2 * Math.min(la, lb) / (la + lb) < 0.6) return;   // real_quick_ratio
      var r = seqRatio(x, w);
      if (r >= 0.6) scored.push([r, x]);
    });
    scored.sort(function (p, q) { return q[0] - p[0] || (q[1] > p[1] ? 1 : q[1] < p[1] ? -1 : 0); });
    var out = scored.slice(0, n).map(function (p) { return p[1]; });
    if (!out.length) names.forEach(function (nm) { var x = normName(nm); if (out.length < n && x.indexOf(w) >= 0 && out.indexOf(x) < 0) out.push(x); });
    return out.map(function (x) { return names[nameIndex.get(x)]; });
  }
  function clearClassMessage() {
    var m = $("clsmsg");
    m.hidden = true; m.innerHTML = "";
    $("cls").removeAttribute("aria-invalid");
    stats.classError = null;
  }
  function unknownClass(text) {
    var m = $("clsmsg"), close = suggest(text);
    stats.classError = "unknown class \u201c" + text + "\u201d";
    m.innerHTML = "unknown class \u201c" + esc(text) + "\u201d" + (close.length ? "; did you mean: " + close.map(function (nm) {
      return '<button type="button" class="sugg" data-class="' + esc(nm) + '">' + esc(nm) + "</button>";
    }).join(" ") + "?" : " (no similar class names)");
    m.hidden = false;
    $("cls").setAttribute("aria-invalid", "true");
    requestDraw();
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
  // the neighbouring layers' data of the hovered cell can arrive after its tooltip: draw() shows it again then
  var tipAt = null;
  function linksReady(ls) { return !!ls && Object.keys(ls).every(function (k) { return ls[k].ready; }); }
  function showTooltip(c, sx, sy) {
    var tip = $("tooltip"), L = currentLevel();
    tipAt = null;
    if (c < 0 || !L || !showTips) { tip.hidden = true; return; }
    tipAt = { c: c, x: sx, y: sy, ready: linksReady(linkStats(linkInfo(L, c))) };
    var hinfo = heatInfo(L), extra = "";
    if (hinfo && hinfo.heat) {
      extra = '<div class="hrow">' + esc(names[cls]) + ": " + fmt(hinfo.attr[c]) + (filterMode === "winner" ?
        (hinfo.heat[c] > 0 ? " (winner)" : "") : " (" + Math.round(hinfo.heat[c] * 100) + " % of max)") + "</div>";
    }
    tip.innerHTML = "<table>" + topRows(L, c, 5) + '</table><div class="avg">Average of ' + L.d.n[c] +
      " activations</div>" + extra + linkRows(L, c);
    tip.hidden = false;
    var tw = tip.offsetWidth, th = tip.offsetHeight;
    tip.style.left = Math.min(W - tw - 4, sx + 14) + "px";
    tip.style.top = Math.min(H - th - 4, sy + 14) + "px";
  }
  // the cell's icon scores: the honest ones (icon | a random real member | median of real patches)
  // when the export has them, and the objective alignment (formerly "fidelity") in every export
  function scoreTable(d, c) {
    var col = function (k) { return d[k] ? d[k][c] : undefined; };
    var rank = function (k) { var r = col(k); return r === null || r === undefined ? "\u2013" : r + " / " + d.i.length; };
    var cell = function (x) { return '<td class="v" style="white-space:nowrap">' + x + "</td>"; };
    var row = function (name, title, a, b, p) {
      return '<tr><td title="' + esc(title) + '">' + name + "</td>" + cell(a) + cell(b) + cell(p) + "</tr>";
    };
    var rows = [];
    if (d.rr) {
      rows.push(row("retrieval rank (raw)", "rank of this cell among all cells of the level by cosine to their mean activations (1 = best)",
                    rank("rr"), rank("mrr"), ""));
      if (d.rw) rows.push(row("retrieval rank (whitened)", "the same against the whitened means (the renderer's targets)",
                              rank("rw"), rank("mrw"), ""));
      if (d.mrrl) rows.push(row("member rank, itself left out", "the member's raw (whitened) rank against its cell's mean "
                                + "without itself (the icon is never part of the mean)", "",
                                rank("mrrl") + (d.mrwl ? " (" + rank("mrwl") + ")" : ""), ""));
      rows.push(row("class agreement", "share of the cell's top-5 classes among the top-5 of the own attribution",
                    fmt(col("ca")), fmt(col("mca")), ""));
      rows.push(row("colourfulness", "Hasler & Suesstrunk colourfulness (0-255 units)", fmt(col("cf")), fmt(col("mcf")), fmt(col("pcf"))));
      rows.push(row("contrast", "std of the grey image (0-255 units)", fmt(col("ct")), fmt(col("mct")), fmt(col("pct"))));
      rows.push(row("border fill", "share of the outer 10% frame that is not flat grey", fmt(col("bf")), fmt(col("mbf")), fmt(col("pbf"))));
    }
    var oa = "objective alignment (formerly fidelity)", oaTitle = "cosine to the target the icon was optimised toward";
    if (d.rr) {
      rows.push(row(oa, oaTitle, fmt(d.f[c]), fmt(col("moa")), ""));
      rows.push(row("best real member's alignment", "the highest objective alignment among the cell's real members",
                    "", fmt(col("mf")), ""));
    } else rows.push(row(oa, oaTitle, fmt(d.f[c]), fmt(col("mf")), ""));
    if (d.st) rows.push(row("optimiser steps", "optimiser steps the icon took (all attempts together)",
                            String(col("st")), "", ""));
    var head = d.rr ? '<tr><th></th><th class="v">icon</th><th class="v" title="a random real member of the cell">member</th>' +
      '<th class="v" title="median over the cell\'s real patches' + (d.pn ? " (" + d.pn[c] + ")" : "") + '">patches</th></tr>'
      : '<tr><th></th><th class="v">icon</th><th class="v">best member</th><th></th></tr>';
    return '<table class="scores">' + head + rows.join("") + "</table>";
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
    $("pinfo").innerHTML = "<div>Average of " + d.n[c] + " activations</div>" + scoreTable(d, c) +
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
    $("tooltip").hidden = true; tipAt = null;
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
  canvas.addEventListener("pointerleave", function () { if (!pointers.size) { hover = -1; $("tooltip").hidden = true; tipAt = null; requestDraw(); } });
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
      case "[": stepLayer(-1); break;
      case "]": stepLayer(1); break;
      default: done = false;
    }
    if (done) e.preventDefault();
  });
  $("layer").addEventListener("change", function () {
    var li = manifest.layers.findIndex(function (x) { return x.name === $("layer").value; });
    if (li >= 0) setLayer(li);
  });
  $("layerslider").addEventListener("input", function () {
    var li = parseInt($("layerslider").value, 10);
    if (li >= 0 && li < manifest.layers.length && manifest.layers[li] !== layer) setLayer(li);
  });
  function stepLayer(delta) {
    var li = manifest.layers.indexOf(layer) + delta;
    if (li >= 0 && li < manifest.layers.length) setLayer(li);
  }
  $("level").addEventListener("change", function () { levelMode = $("level").value; requestDraw(); scheduleHash(); });
  // typing: a class is shown as soon as the text names one; Enter / leaving the box with an unknown name says so
  function classFromInput(e) {
    var text = $("cls").value, typing = e.type === "input";
    if (!text.trim()) { if (cls >= 0 || !typing) setClass(-1); else clearClassMessage(); return; }
    var c = lookupClass(text, !typing);
    if (c >= 0) { if (!typing) setClass(c); else if (c !== cls) setClass(c, true); else clearClassMessage(); }
    else if (!typing) unknownClass(text.trim());
    else clearClassMessage();
  }
  $("cls").addEventListener("change", classFromInput);
  $("cls").addEventListener("input", classFromInput);
  $("cls").addEventListener("keydown", function (e) { if (e.key === "Enter") classFromInput({ type: "change" }); });
  $("clsmsg").addEventListener("click", function (e) {
    var b = e.target.closest && e.target.closest("button.sugg");
    if (b) setClass(lookupClass(b.dataset["class"], false));
  });
  Array.prototype.forEach.call(document.querySelectorAll('input[name="filter"]'), function (r) {
    r.addEventListener("change", function () { if (r.checked) setFilter(r.value); });
  });
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
  // a multi-file export opened from disk: browsers refuse to read its data files from file://
  function diskHelp() {
    var dir = decodeURIComponent(location.pathname).replace(/[^/]*$/, "");
    if (/^\/[A-Za-z]:\//.test(dir)) dir = dir.slice(1);
    stats.error = "opened from disk (file://): serve the folder or export a single file";
    $("status").textContent = "";
    $("diskdir").textContent = dir || ".";
    $("diskhelp").hidden = false;
    document.body.classList.add("ondisk");
  }

  // read-only debug/test hooks
  window.atlasViewer = Object.freeze({
    suggest: function (text) { return suggest(text); },
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
    names.forEach(function (n, q) { var k = normName(n); if (!nameIndex.has(k)) nameIndex.set(k, q); });
    document.title = m.title || "Activation atlas";
    $("title").textContent = m.title || "Activation atlas";
    $("layer").innerHTML = m.layers.map(function (l) { return "<option>" + esc(l.name) + "</option>"; }).join("");
    $("layer").disabled = m.layers.length < 2;
    $("layerslider").max = String(Math.max(0, m.layers.length - 1));
    $("layerstep").hidden = m.layers.length < 2;
    stats.aligned = !!m.aligned;
    $("classlist").innerHTML = names.map(function (n) { return '<option value="' + esc(n) + '">'; }).join("");
    var anyHeat = m.layers.some(function (l) { return !!l.class_heat || l.levels.some(function (e) { return !!e.heat; }); });
    if (!anyHeat) $("classfilter").hidden = true;
    setLayer(0);
    applyHash();
    requestDraw();
  }).catch(function (err) {
    if (!BUNDLE && !manifest && location.protocol === "file:") diskHelp(); else fail(err);
  });
})();
