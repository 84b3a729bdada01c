"""Frame time of the exported viewer while panning at the finest level, in headless Chromium.

Builds a synthetic site (no model needed) in the export format of `actatlas.export.site`: 3 levels
(40, 80, 160 by default) with ~25k cells at the finest, icon sprite sheets, heat data and 1000
class names; serves it on 127.0.0.1 and pans continuously for a few seconds, recording
requestAnimationFrame deltas and the viewer's own draw time per frame.

    .venv/bin/python scripts/bench_viewer.py [--seconds 3] [--icon 48] [--out bench-out/viewer-site]

Needs playwright (pip) and Debian's chromium at /usr/bin/chromium.
"""

from __future__ import annotations

import argparse
import base64
import json
import math
import shutil
import threading
import time
from pathlib import Path

import numpy as np
from PIL import Image

from actatlas.export.serve import make_server
from actatlas.export.site import STATIC_FILES, _icon_tile, _static

CHROME_ARGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
               "--disable-component-update"]


def synthetic_site(out: Path, sizes=(40, 80, 160), icon: int = 48, fill: float = 0.98, classes: int = 1000,
                   seed: int = 0) -> dict:
    rng = np.random.default_rng(seed)
    if out.exists():
        shutil.rmtree(out)
    (out / "data" / "synth").mkdir(parents=True)
    names = [f"class {q:04d}" for q in range(classes)]
    levels = []
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
        data = {"layer": "synth", "size": G, "icon": icon, "tile": T, "i": ii.tolist(), "j": jj.tolist(),
                "n": n.tolist(), "t": t.ravel().tolist(), "v": np.round(v.ravel(), 3).tolist(),
                "f": np.round(rng.random(m), 3).tolist(), "mf": np.round(rng.random(m), 3).tolist(),
                "s": sheet_of.tolist(), "k": slot_of.tolist(), "pc": [0] * m, "sheets": sheets,
                "patches": None, "samples": int(n.sum())}
        (out / f"data/synth/level-{G}.json").write_text(json.dumps(data, separators=(",", ":")))
        K = 20
        idx = rng.integers(0, classes, (m, K)).astype("<u2")
        val = rng.normal(size=(m, K)).astype("<f2")
        heat = {"k": K, "m": m, "idx": base64.b64encode(idx.tobytes()).decode(),
                "val": base64.b64encode(val.tobytes()).decode(), "pos": [3.0] * classes, "neg": [3.0] * classes}
        (out / f"data/synth/level-{G}-heat.json").write_text(json.dumps(heat, separators=(",", ":")))
        levels.append({"size": G, "cells": m, "url": f"data/synth/level-{G}.json",
                       "heat": f"data/synth/level-{G}-heat.json", "icon": icon, "samples": int(n.sum())})
    manifest = {"format": 1, "title": "synthetic atlas (benchmark)", "model": "synthetic",
                "layers": [{"name": "synth", "levels": levels, "total_samples": levels[-1]["samples"]}],
                "class_names": names, "icon_size": icon, "total_samples": levels[-1]["samples"]}
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


def _summary(xs):
    a = np.asarray(xs[1:] if len(xs) > 1 else xs, float)
    return {"mean": round(float(a.mean()), 2), "p95": round(float(np.percentile(a, 95)), 2),
            "max": round(float(a.max()), 2), "frames": int(len(a))}


def bench(site: Path, seconds: float = 3.0, viewport=(1280, 800), chromium="/usr/bin/chromium") -> dict:
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
    out = {"cells_finest": man["layers"][0]["levels"][-1]["cells"], "levels": [lv["size"] for lv in
                                                                             man["layers"][0]["levels"]]}
    try:
        with sync_playwright() as p:
            b = p.chromium.launch(executable_path=chromium, args=CHROME_ARGS)
            for name, h in scenarios.items():
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
    args = ap.parse_args()
    t = time.perf_counter()
    man = synthetic_site(Path(args.out), tuple(int(x) for x in args.levels.split(",")), icon=args.icon)
    print(f"synthetic site: levels {[lv['size'] for lv in man['layers'][0]['levels']]}, cells "
          f"{[lv['cells'] for lv in man['layers'][0]['levels']]} ({time.perf_counter() - t:.1f} s)")
    res = bench(Path(args.out), args.seconds)
    print(json.dumps(res, indent=2))


if __name__ == "__main__":
    main()
