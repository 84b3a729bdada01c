"""Frame time of the exported viewer while panning at the finest level, and the time to show a class,
in headless Chromium.

Builds a synthetic site (no model needed) in the export format of `actatlas.export.site`: 3 levels
(40, 80, 160 by default) with ~25k cells at the finest, icon sprite sheets, the full class heat of
1000 classes (written by the export's own `quantize_heat` / `_write_class_heat` from random full
attribution matrices) and 1000 class names; serves it on 127.0.0.1 and
  * pans continuously for a few seconds, recording requestAnimationFrame deltas and the viewer's own
    draw time per frame;
  * types classes into the class box and times each until the frame that draws its heat (first
    time: the class file is fetched; then the winner filter and the negative sign on the loaded file).

    .venv/bin/python scripts/bench_viewer.py [--seconds 3] [--icon 48] [--out bench-out/viewer-site]
        [--json bench-out/viewer.json]

Needs playwright (pip) and Debian's chromium at /usr/bin/chromium.
"""

from __future__ import annotations

import argparse
import json
import math
import shutil
import threading
import time
from pathlib import Path

import numpy as np
from PIL import Image

from actatlas.atlas import cell_winners
from actatlas.export.serve import make_server
from actatlas.export.site import STATIC_FILES, _icon_tile, _static, _write_class_heat, _Writer, quantize_heat

CHROME_ARGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
               "--disable-component-update"]


def synthetic_site(out: Path, sizes=(40, 80, 160), icon: int = 48, fill: float = 0.98, classes: int = 1000,
                   seed: int = 0) -> dict:
    rng = np.random.default_rng(seed)
    if out.exists():
        shutil.rmtree(out)
    (out / "data" / "synth").mkdir(parents=True)
    names = [f"class {q:04d}" for q in range(classes)]
    levels, heats = [], []
    heat_s = 0.0
    yy, xx = np.mgrid[0:icon, 0:icon] / icon
    for G in sizes:
        keep = rng.random((G, G)) < fill
        ii, jj = np.nonzero(keep)
        m = len(ii)
        n = rng.integers(1, 400, m)
        T = _icon_tile(G, icon)
        sheet_of = np.zeros(m, np.int32)
        slot_of = np.zeros(m, np.int32)
        sheets = []
        tile_id = (ii // T) * 10000 + (jj // T)
        for si, tid in enumerate(np.unique(tile_id)):
            members = np.nonzero(tile_id == tid)[0]
            cols = math.ceil(math.sqrt(len(members)))
            rows = math.ceil(len(members) / cols)
            arr = np.zeros((rows * icon, cols * icon, 3), np.uint8)
            for k, c in enumerate(members):
                f1, f2, ph = 2 + ii[c] % 7, 2 + jj[c] % 5, (ii[c] * 0.37 + jj[c] * 0.11)
                base_col = np.array([ii[c] / G, jj[c] / G, 0.5 + 0.5 * math.sin(ph)]) * 200 + 30
                pat = 0.5 + 0.5 * np.sin(2 * np.pi * (f1 * xx + f2 * yy) + ph)
                arr[(k // cols) * icon:(k // cols + 1) * icon, (k % cols) * icon:(k % cols + 1) * icon] = \
                    (base_col[None, None, :] * (0.6 + 0.4 * pat[..., None])).clip(0, 255)
                sheet_of[c], slot_of[c] = si, k
            url = f"data/synth/level-{G}/icons-{int(tid) // 10000}-{int(tid) % 10000}.png"
            (out / url).parent.mkdir(parents=True, exist_ok=True)
            Image.fromarray(arr).save(out / url, compress_level=1)
            sheets.append({"url": url, "cols": cols})
        t = rng.integers(0, classes, (m, 5))
        v = np.sort(rng.random((m, 5)), axis=1)[:, ::-1]
        # full mean attributions [m, classes]: smooth over the grid plus noise (sizes do not depend on it)
        att = (rng.standard_normal((m, classes), np.float32) * 0.3 +
               np.sin(ii[:, None] / G * rng.uniform(1, 9, classes) + rng.uniform(0, 6, classes)).astype(np.float32))
        t0 = time.perf_counter()
        heats.append((G, *quantize_heat(att)))
        w, wn = cell_winners(att, 1), cell_winners(att, -1)
        heat_s += time.perf_counter() - t0
        del att
        data = {"layer": "synth", "size": G, "icon": icon, "tile": T, "i": ii.tolist(), "j": jj.tolist(),
                "n": n.tolist(), "t": t.ravel().tolist(), "v": np.round(v.ravel(), 3).tolist(),
                "f": np.round(rng.random(m), 3).tolist(), "mf": np.round(rng.random(m), 3).tolist(),
                "s": sheet_of.tolist(), "k": slot_of.tolist(), "pc": [0] * m, "sheets": sheets,
                "patches": None, "samples": int(n.sum()), "w": w.tolist(), "wn": wn.tolist()}
        (out / f"data/synth/level-{G}.json").write_text(json.dumps(data, separators=(",", ":")))
        levels.append({"size": G, "cells": m, "url": f"data/synth/level-{G}.json", "icon": icon,
                       "samples": int(n.sum())})
    t0 = time.perf_counter()
    class_heat = _write_class_heat(_Writer(out), "synth", heats, classes)
    heat_s += time.perf_counter() - t0
    manifest = {"format": 2, "title": "synthetic atlas (benchmark)", "model": "synthetic",
                "layers": [{"name": "synth", "levels": levels, "total_samples": levels[-1]["samples"],
                            "class_heat": class_heat}],
                "class_names": names, "icon_size": icon, "total_samples": levels[-1]["samples"],
                "_class_heat_export_s": round(heat_s, 2)}
    (out / "manifest.json").write_text(json.dumps(manifest))
    for name in STATIC_FILES:
        (out / name).write_text(_static(name), encoding="utf-8")
    return manifest


PAN_JS = """async ([seconds, speed]) => {
  const deltas = [], draws = [];
  let last = null, dir = 1, t0 = null, travelled = 0;
  await new Promise(resolve => {
    function step(t) {
      if (last !== null) { deltas.push(t - last); draws.push(atlasViewer.stats.drawMs); }
      last = t; if (t0 === null) t0 = t;
      travelled += speed;
      if (travelled > 600) { dir = -dir; travelled = 0; }
      atlasViewer.panBy(dir * speed, dir * speed * 0.3);
      if (t - t0 < seconds * 1000) requestAnimationFrame(step); else resolve();
    }
    requestAnimationFrame(step);
  });
  const st = atlasViewer.stats;
  return {deltas, draws, level: st.level, drawn: st.drawn, composite: st.composite, cells: st.cells};
}"""


SHOW_CLASS_JS = """async ([name, key, how]) => {
  const t0 = performance.now();
  if (how === 'type') {
    const box = document.getElementById('cls');
    box.value = name; box.dispatchEvent(new Event('input', {bubbles: true}));
  } else if (how === 'winner' || how === 'weighted') {
    document.querySelector('input[name="filter"][value="' + how + '"]').click();
  } else {
    const sel = document.getElementById('sign'); sel.value = how; sel.dispatchEvent(new Event('change'));
  }
  await new Promise(res => { (function chk() { if (atlasViewer.stats.heatShown === key) res();
                                               else requestAnimationFrame(chk); })(); });
  // reading a pixel waits until the canvas has really been rasterised (Chromium defers canvas drawing)
  document.getElementById('atlas').getContext('2d').getImageData(0, 0, 1, 1);
  const st = atlasViewer.stats;
  return {ms: performance.now() - t0, heatCells: st.heatCells, level: st.level, cells: st.cells,
          composite: st.composite};
}"""


def _dir_bytes(path: Path) -> int:
    return sum(f.stat().st_size for f in path.rglob("*") if f.is_file())


def bench_class(b, url: str, site: Path, finest: int, base: float, viewport, n_classes: int = 5) -> dict:
    """Time to show a class at the finest level: whole atlas in view (every cell, composite) and at the
    automatic level of detail (~80 px cells); first paint of the page for reference."""
    man = json.loads((site / "manifest.json").read_text())
    names = man["class_names"]
    picks = [names[q] for q in np.linspace(1, len(names) - 2, n_classes).astype(int)]
    out = {}
    for label, h in (("finest level, whole atlas in view", f"#level={finest}&x=0.5&y=0.5&z=1"),
                     ("finest level at ~80 px cells", f"#level=auto&x=0.3&y=0.3&z={finest * 80 / base:.3f}")):
        page = b.new_page(viewport={"width": viewport[0], "height": viewport[1]})
        errors = []
        page.on("pageerror", lambda e: errors.append(str(e)))
        t0 = time.perf_counter()
        page.goto(url + h)
        page.wait_for_function("window.atlasViewer && atlasViewer.stats.ready", timeout=60000, polling=10)
        first_paint = time.perf_counter() - t0
        page.wait_for_function("atlasViewer.stats.pending === 0", timeout=60000)
        cold, cells = [], []
        for nm in picks:
            c = names.index(nm)
            r = page.evaluate(SHOW_CLASS_JS, [nm, f"{c}|1|weighted", "type"])
            cold.append(r["ms"]); cells.append(r["heatCells"])
        c = names.index(picks[-1])
        winner = page.evaluate(SHOW_CLASS_JS, [None, f"{c}|1|winner", "winner"])["ms"]
        negative = page.evaluate(SHOW_CLASS_JS, [None, f"{c}|-1|winner", "-1"])["ms"]
        back = page.evaluate(SHOW_CLASS_JS, [None, f"{c}|-1|weighted", "weighted"])["ms"]
        st = page.evaluate("atlasViewer.stats")
        out[label] = {"level": st["level"], "cells": st["cells"], "composite": st["composite"],
                      "first_paint_s": round(first_paint, 2),
                      "show_class_ms (fetch + draw)": [round(x, 1) for x in cold],
                      "show_class_ms_median": round(float(np.median(cold)), 1),
                      "heat_cells": cells, "winner_toggle_ms": round(winner, 1),
                      "sign_toggle_ms": round(negative, 1), "weighted_toggle_ms": round(back, 1),
                      "errors": errors}
        page.close()
    return out


def _summary(xs):
    a = np.asarray(xs[1:] if len(xs) > 1 else xs, float)
    return {"mean": round(float(a.mean()), 2), "p95": round(float(np.percentile(a, 95)), 2),
            "max": round(float(a.max()), 2), "frames": int(len(a))}


def bench(site: Path, seconds: float = 3.0, viewport=(1280, 800), chromium="/usr/bin/chromium",
          pan: bool = True) -> dict:
    from playwright.sync_api import sync_playwright

    man = json.loads((site / "manifest.json").read_text())
    finest = man["layers"][0]["levels"][-1]["size"]
    srv = make_server(site, "127.0.0.1", 0)
    th = threading.Thread(target=srv.serve_forever, daemon=True)
    th.start()
    url = f"http://127.0.0.1:{srv.server_address[1]}/"
    base = min(viewport[0], viewport[1] - 60)
    scenarios = {
        # the viewer's auto level of detail picks the finest level (cells ~80 px on screen)
        "auto LOD at finest level (~80 px cells)": f"#level=auto&x=0.3&y=0.3&z={finest * 80 / base:.3f}",
        # finest level forced with the whole atlas in view: every cell visible
        "finest level forced, whole atlas in view": "#level=" + str(finest) + "&x=0.5&y=0.5&z=1",
        "finest level forced, ~20 px cells": f"#level={finest}&x=0.3&y=0.3&z={finest * 20 / base:.3f}",
        "finest level forced, ~40 px cells": f"#level={finest}&x=0.3&y=0.3&z={finest * 40 / base:.3f}",
    }
    ch = man["layers"][0].get("class_heat")
    out = {"cells_finest": man["layers"][0]["levels"][-1]["cells"], "levels": [lv["size"] for lv in
                                                                             man["layers"][0]["levels"]],
           "classes": len(man["class_names"]),
           "site_MB": round(_dir_bytes(site) / 1e6, 1),
           "class_heat_MB": round(_dir_bytes(site / ch["url"].split("{c}")[0]) / 1e6, 1) if ch else 0,
           "class_file_kB": round((site / ch["url"].replace("{c}", "0")).stat().st_size / 1e3, 1) if ch else 0,
           "level_json_kB": [round((site / lv["url"]).stat().st_size / 1e3) for lv in man["layers"][0]["levels"]],
           "class_heat_export_s": man.get("_class_heat_export_s")}
    try:
        with sync_playwright() as p:
            b = p.chromium.launch(executable_path=chromium, args=CHROME_ARGS)
            if ch:
                out["show class"] = bench_class(b, url, site, finest, base, viewport)
            for name, h in (scenarios.items() if pan else ()):
                page = b.new_page(viewport={"width": viewport[0], "height": viewport[1]})
                errors = []
                page.on("pageerror", lambda e: errors.append(str(e)))
                page.on("console", lambda m: errors.append(m.text) if m.type == "error" else None)
                page.goto(url + h)
                page.wait_for_function("window.atlasViewer && atlasViewer.stats.ready", timeout=60000)
                page.wait_for_function("atlasViewer.stats.pending === 0", timeout=60000)
                page.evaluate(PAN_JS, [0.5, 4])  # warm-up: loads the sheets around the start
                page.wait_for_function("atlasViewer.stats.pending === 0", timeout=60000)
                r = page.evaluate(PAN_JS, [seconds, 4])
                out[name] = {"frame_ms": _summary(r["deltas"]), "draw_ms": _summary(r["draws"]),
                             "level": r["level"], "cells_drawn": r["drawn"], "composite": r["composite"],
                             "errors": errors}
                page.close()
            b.close()
    finally:
        srv.shutdown()
        srv.server_close()
    return out


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", default="bench-out/viewer-site")
    ap.add_argument("--seconds", type=float, default=3.0)
    ap.add_argument("--icon", type=int, default=48)
    ap.add_argument("--levels", default="40,80,160")
    ap.add_argument("--classes", type=int, default=1000)
    ap.add_argument("--no-pan", action="store_true", help="only the class timings")
    ap.add_argument("--reuse", action="store_true", help="reuse the site in --out when it exists")
    ap.add_argument("--json", help="also write the results here")
    args = ap.parse_args()
    t = time.perf_counter()
    if not (args.reuse and (Path(args.out) / "manifest.json").is_file()):
        man = synthetic_site(Path(args.out), tuple(int(x) for x in args.levels.split(",")), icon=args.icon,
                             classes=args.classes)
        print(f"synthetic site: levels {[lv['size'] for lv in man['layers'][0]['levels']]}, cells "
              f"{[lv['cells'] for lv in man['layers'][0]['levels']]} ({time.perf_counter() - t:.1f} s)")
    else:  # the data is kept; the viewer is always the current one
        for name in STATIC_FILES:
            (Path(args.out) / name).write_text(_static(name), encoding="utf-8")
    res = bench(Path(args.out), args.seconds, pan=not args.no_pan)
    print(json.dumps(res, indent=2))
    if args.json:
        Path(args.json).parent.mkdir(parents=True, exist_ok=True)
        Path(args.json).write_text(json.dumps(res, indent=2))


if __name__ == "__main__":
    main()
