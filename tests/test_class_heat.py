"""The class view: full class heat (every class in every cell), `Atlas.class_heat`, the export's per-class
files, and the viewer's legend, filters, hash, unknown-class message, disk-opened page and old-format
sites, in real headless Chromium.

The run is synthetic (grid and atlas arrays written directly, no model, no UMAP): 300 classes, of which
"great white shark" is in no cell's top 20 by |attribution| yet has real weight in many cells, and
"red fox" is the top class of a known block of cells.
"""

from __future__ import annotations

import base64
import difflib
import json
import shutil
import threading
from pathlib import Path

import numpy as np
import pytest

from actatlas.atlas import Atlas, AtlasLevel, open_atlas
from actatlas.errors import UserError
from actatlas.export import export_site, make_server
from actatlas.grid import GridLevel, load_grid, save_grid

ROOT = Path(__file__).resolve().parent.parent
ARTIFACTS = ROOT / "test-artifacts"
from conftest import needs_browser  # noqa: E402  (the `browser` fixture is conftest's too)

LAYER = "mixed4c"
N_CLASSES = 300
SIZES = (6, 12, 40)   # 40: 1599 cells, drawn from the pre-composited level when all in view
RARE, RARE_NAME = 7, "great white shark"
FOX, FOX_NAME = 3, "red fox"


# ------------------------------------------------------------------ synthetic run
def _names() -> list[str]:
    names = [f"thing {q:03d}" for q in range(N_CLASSES)]
    names[RARE], names[FOX] = RARE_NAME, FOX_NAME
    names[11], names[12] = "tiger shark", "grey whale"
    return names


def _attributions(G: int, i: np.ndarray, j: np.ndarray, rng) -> np.ndarray:
    """[m, classes]: 25 strong classes (|a| in [1, 2], random sign) per cell over small noise; the rare
    class at most 0.6 (never in a cell's top 20 by |a|), rising with i; red fox the top class where
    i, j < G/3."""
    m = len(i)
    att = rng.normal(0, 0.03, (m, N_CLASSES)).astype(np.float32)
    others = np.array([q for q in range(N_CLASSES) if q not in (RARE, FOX)])
    for c in range(m):
        strong = rng.choice(others, 25, replace=False)
        att[c, strong] = rng.uniform(1, 2, 25) * rng.choice([-1, 1], 25)
    att[:, RARE] = 0.7 * (i + 0.5) / G - 0.1
    block = (i < G / 3) & (j < G / 3)
    att[block, FOX] = 3.0
    return att


def _grid_level(G: int, rng) -> GridLevel:
    ii, jj = np.meshgrid(np.arange(G), np.arange(G), indexing="ij")
    i, j = ii.ravel().astype(np.int32), jj.ravel().astype(np.int32)
    keep = ~((i == G - 1) & (j == 0))          # one empty cell
    i, j = i[keep], j[keep]
    m = len(i)
    count = rng.integers(2, 9, m).astype(np.int64)
    offsets = np.concatenate([[0], np.cumsum(count)]).astype(np.int64)
    rows = np.arange(offsets[-1], dtype=np.int64)
    att = _attributions(G, i, j, rng)
    top = np.argsort(-att, axis=1, kind="stable")[:, :5].astype(np.int32)
    return GridLevel(size=G, i=i, j=j, count=count, mean_activation=rng.normal(size=(m, 4)).astype(np.float32),
                     mean_attribution=att, top_classes=top,
                     top_values=np.take_along_axis(att, top, axis=1).astype(np.float32),
                     member_offsets=offsets, member_rows=rows, closest=rows[offsets[:-1]][:, None],
                     cell_of_row=np.repeat(np.arange(m, dtype=np.int32), count), min_count=2)


def make_synthetic_run(root: Path, icon: int = 16, seed: int = 0) -> Path:
    rng = np.random.default_rng(seed)
    run = root / "run"
    (run / "collect").mkdir(parents=True)
    names = _names()
    (run / "collect" / "complete.json").write_text(json.dumps(
        {"config": {"layers": [LAYER], "model": "synthetic"}, "class_names": names}))
    (run / "manifest.json").write_text("{}")
    grids = [_grid_level(G, rng) for G in SIZES]
    save_grid(grids, run / "grid", LAYER, names)
    yy, xx = np.mgrid[0:icon, 0:icon] / icon
    levels = []
    for g in grids:
        icons = np.zeros((g.m, icon, icon, 3), np.uint8)
        for c in range(g.m):
            col = np.array([g.i[c] / g.size, g.j[c] / g.size, 0.5]) * 200 + 40
            pat = 0.6 + 0.4 * np.sin(2 * np.pi * ((2 + c % 3) * xx + (1 + c % 4) * yy))
            icons[c] = (col[None, None] * pat[..., None]).clip(0, 255)
        levels.append(AtlasLevel(size=g.size, i=g.i, j=g.j, count=g.count, top_classes=g.top_classes,
                                 top_values=g.top_values, icons=icons, fidelity=rng.random(g.m).astype(np.float32),
                                 member_fidelity=rng.random(g.m).astype(np.float32)))
    Atlas(LAYER, levels, names, run_dir=run).save(run / "atlas" / LAYER)
    return run


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory):
    return make_synthetic_run(tmp_path_factory.mktemp("classheat"))


@pytest.fixture(scope="module")
def site(run_dir, tmp_path_factory):
    out = tmp_path_factory.mktemp("chsite") / "site"
    export_site(run_dir, out)
    return out


def _serve(root: Path):
    srv = make_server(root, "127.0.0.1", 0)
    threading.Thread(target=srv.serve_forever, daemon=True).start()
    return srv, f"http://127.0.0.1:{srv.server_address[1]}/"


@pytest.fixture(scope="module")
def served(site):
    srv, url = _serve(site)
    yield url
    srv.shutdown()
    srv.server_close()


def read_class_file(site: Path, c: int) -> dict:
    """{G: (q int8 [m], pos, neg)} from the export's file of class c."""
    man = json.loads((site / "manifest.json").read_text())
    ch = man["layers"][0]["class_heat"]
    buf = (site / ch["url"].replace("{c}", str(c))).read_bytes()
    nl = len(ch["levels"])
    head = np.frombuffer(buf[:8 * nl], "<f4").reshape(nl, 2)
    out, off = {}, 8 * nl
    for q, (G, m) in enumerate(zip(ch["levels"], ch["cells"])):
        out[G] = (np.frombuffer(buf[off:off + m], np.int8), float(head[q, 0]), float(head[q, 1]))
        off += m
    assert off == len(buf)
    return out


def exported_heat_cells(site: Path, c: int, G: int, sign: int = 1) -> int:
    q = read_class_file(site, c)[G][0].astype(int)
    return int((np.maximum(sign * q, 0) / 127 > 0.1).sum())


# ------------------------------------------------------------------ Python: Atlas.class_heat and the export
def test_rare_class_is_in_no_top20_but_has_weight(run_dir):
    for g in load_grid(run_dir / "grid", LAYER):
        top20 = np.argsort(-np.abs(g.mean_attribution), axis=1)[:, :20]
        assert not (top20 == RARE).any()
        a = g.mean_attribution[:, RARE]
        assert (a / a.max() > 0.1).sum() > g.m // 2


def test_class_heat_matches_export(run_dir, site):
    atlas = open_atlas(run_dir)
    assert atlas.run_dir == run_dir
    man = json.loads((site / "manifest.json").read_text())
    assert man["format"] == 2 and "class_heat" in man["layers"][0]
    assert not list(site.glob("data/*/level-*-heat.json"))   # format 1 files are gone
    for c in (RARE, FOX, 0, N_CLASSES - 1):
        files = read_class_file(site, c)
        for G in SIZES:
            q, pos, neg = files[G]
            d = json.loads((site / "data" / LAYER / f"level-{G}.json").read_text())
            lv = atlas.level(G)
            assert list(lv.i) == d["i"] and list(lv.j) == d["j"]
            hp, hn = atlas.class_heat(c, G), atlas.class_heat(c, G, sign=-1)
            assert hp.shape == (len(d["i"]),) and hp.dtype == np.float32
            np.testing.assert_allclose(np.maximum(q, 0) / 127, hp, atol=0.5 / 127 + 1e-6)
            np.testing.assert_allclose(np.maximum(-q, 0) / 127, hn, atol=0.5 / 127 + 1e-6)
            raw = atlas.class_heat(c, G, mode="attribution")
            assert pos == pytest.approx(max(raw.max(), 0), rel=1e-6)
            assert neg == pytest.approx(max(-raw.min(), 0), rel=1e-6)
            # the numbers the viewer shows: attribution = q / 127 * (pos or neg)
            np.testing.assert_allclose(np.where(q > 0, q / 127 * pos, q / 127 * neg), raw,
                                       atol=0.5 / 127 * max(pos, neg) + 1e-6)
            for sign, key in ((1, "w"), (-1, "wn")):
                win = atlas.class_heat(c, G, mode="winner", sign=sign)
                np.testing.assert_array_equal(win, (np.array(d[key]) == c).astype(np.float32))
    G = SIZES[-1]
    fox = atlas.class_heat(FOX_NAME, G, mode="winner")
    lv = atlas.level(G)
    assert fox.sum() == ((lv.i < G / 3) & (lv.j < G / 3)).sum() > 0
    np.testing.assert_array_equal(atlas.class_heat(RARE_NAME, G), atlas.class_heat(str(RARE), G))
    assert (atlas.class_heat(RARE, G) > 0.1).sum() > 0


def test_class_heat_bad_input(run_dir):
    atlas = open_atlas(run_dir)
    with pytest.raises(UserError, match="did you mean: great white shark"):
        atlas.class_heat("grate white shark", SIZES[0])
    with pytest.raises(UserError, match="no level 7"):
        atlas.class_heat(RARE, 7)
    with pytest.raises(UserError, match="mode"):
        atlas.class_heat(RARE, SIZES[0], mode="nope")
    bare = Atlas(atlas.layer, atlas.levels, atlas.class_names)
    with pytest.raises(UserError, match="run_dir"):
        bare.class_heat(RARE, SIZES[0])


def test_single_file_bundle_has_class_heat(run_dir, site):
    from actatlas.export import single_file_html

    page = single_file_html(run_dir)
    bundle = json.loads(page.split('id="atlas-bundle">', 1)[1].split("</script>", 1)[0])
    url = json.loads((site / "manifest.json").read_text())["layers"][0]["class_heat"]["url"]
    key = url.replace("{c}", str(RARE))
    assert base64.b64decode(bundle[key]) == (site / key).read_bytes()


def test_export_of_atlas_objects_without_a_run(run_dir, site, tmp_path, caplog):
    """An Atlas whose levels hold their grid levels exports without a run (its own class names, no
    patches: one warning) and writes the same cells and class heat as the run's export."""
    import dataclasses

    from actatlas.export import export_atlases

    atlas = open_atlas(run_dir)
    grids = {g.size: g for g in load_grid(run_dir / "grid", LAYER)}
    bare = Atlas(LAYER, [dataclasses.replace(lv, grid=grids[lv.size]) for lv in atlas.levels], atlas.class_names)
    with caplog.at_level("WARNING", logger="actatlas.export.site"):
        export_atlases([bare], tmp_path / "bare", title="bare")
    msgs = [r.getMessage() for r in caplog.records if r.name == "actatlas.export.site"]
    assert msgs == [f"1 layer has no provenance for its members (first: {LAYER}: the atlas has no run); "
                    "exported without member patches"]
    man = json.loads((tmp_path / "bare" / "manifest.json").read_text())
    ref = json.loads((site / "manifest.json").read_text())
    assert man["title"] == "bare" and man["model"] is None and man["class_names"] == ref["class_names"]
    assert man["layers"] == ref["layers"]
    for f in sorted((site / "data").rglob("*")):
        if f.is_file():
            assert (tmp_path / "bare" / f.relative_to(site)).read_bytes() == f.read_bytes(), f


# ------------------------------------------------------------------ the viewer in Chromium
class Page:
    def __init__(self, browser, url, viewport=(1000, 700), ready=True):
        self.page = browser.new_page(viewport={"width": viewport[0], "height": viewport[1]})
        self.errors: list[str] = []
        self.page.on("console", lambda m: self.errors.append(m.text) if m.type == "error" else None)
        self.page.on("pageerror", lambda e: self.errors.append(str(e)))
        self.page.goto(url)
        if ready:
            self.page.wait_for_function("window.atlasViewer && atlasViewer.stats.ready", timeout=15000)

    def stats(self):
        return self.page.evaluate("atlasViewer.stats")

    def wait_heat(self, key: str):
        self.page.wait_for_function(f"atlasViewer.stats.heatShown === {json.dumps(key)}", timeout=10000)
        return self.stats()

    def close(self):
        self.page.close()


def _artifact(name: str) -> Path:
    ARTIFACTS.mkdir(exist_ok=True)
    return ARTIFACTS / name


@needs_browser
def test_class_view_full_heat_filters_legend(browser, served, site):
    G = SIZES[-1]
    pg = Page(browser, served + f"#level={G}&x=0.5&y=0.5&z=1")
    page = pg.page
    try:
        assert page.is_hidden("#legend")
        # typing the rare class: the full heat shows it in many cells (format 1 showed none)
        page.fill("#cls", RARE_NAME)
        s = pg.wait_heat(f"{RARE}|1|weighted")
        want = exported_heat_cells(site, RARE, G)
        assert s["heatCells"] == want and want > s["cells"] // 2, (s, want)
        assert s["heatFormat"] == "full" and s["level"] == G
        q, pos, neg = read_class_file(site, RARE)[G]
        assert s["heatMax"] == pytest.approx(pos, rel=1e-6)
        # legend: colour bar, five ticks from 0 to the class's max attribution, the count of cells
        assert page.is_visible("#legend .lg-bar")
        assert page.inner_text("#legend .lg-title") == RARE_NAME
        ticks = page.eval_on_selector_all("#legend .lg-ticks span", "ts => ts.map(t => t.textContent)")
        assert len(ticks) == 5 and ticks[0] == "0"
        assert float(ticks[-1]) == pytest.approx(pos, rel=0.05)
        assert float(ticks[2]) == pytest.approx(pos / 2, rel=0.05)
        assert page.inner_text("#lg-count") == str(want)
        assert "positive influence" in page.inner_text("#legend")
        page.screenshot(path=str(_artifact("class-view-legend.png")))
        # negative influence of the same class
        page.select_option("#sign", "-1")
        s = pg.wait_heat(f"{RARE}|-1|weighted")
        assert s["heatCells"] == exported_heat_cells(site, RARE, G, -1) and s["heatMax"] == pytest.approx(neg, rel=1e-6)
        assert page.inner_text("#legend .lg-ticks span:last-child").startswith("\u2212")
        page.select_option("#sign", "1")
        # winner vs weighted for red fox
        page.fill("#cls", FOX_NAME)
        s = pg.wait_heat(f"{FOX}|1|weighted")
        weighted = s["heatCells"]
        assert weighted == exported_heat_cells(site, FOX, G)
        page.check('input[name="filter"][value="winner"]')
        s = pg.wait_heat(f"{FOX}|1|winner")
        d = json.loads((site / "data" / LAYER / f"level-{G}.json").read_text())
        assert s["heatCells"] == sum(1 for w in d["w"] if w == FOX) == ((np.array(d["i"]) < G / 3) &
                                                                         (np.array(d["j"]) < G / 3)).sum()
        assert "top class is red fox" in page.inner_text("#legend")
        assert page.inner_text("#lg-count") == str(s["heatCells"])
        page.screenshot(path=str(_artifact("class-view-winner.png")))
        # the rare class never wins a cell
        page.fill("#cls", RARE_NAME)
        assert pg.wait_heat(f"{RARE}|1|winner")["heatCells"] == 0
        page.check('input[name="filter"][value="weighted"]')
        pg.wait_heat(f"{RARE}|1|weighted")
        # hovering a cell shows the class's attribution there
        c = int(np.argmax(q))
        pos_xy = page.evaluate(f"atlasViewer.cellCenter({d['i'][c]}, {d['j'][c]})")
        page.mouse.move(pos_xy["x"], pos_xy["y"])
        page.wait_for_selector("#tooltip:not([hidden]) .hrow")
        assert "100 % of max" in page.inner_text("#tooltip .hrow")
        page.click("#clsclear")
        page.wait_for_function("atlasViewer.stats.cls === -1")
        assert page.is_hidden("#legend")
        assert pg.errors == []
    finally:
        pg.close()


@needs_browser
def test_class_view_on_the_composite(browser, served, site):
    """A level of > 600 cells all in view is drawn from one composite image; the class view is an overlay."""
    G = SIZES[-1]
    pg = Page(browser, served + f"#level={G}&x=0.5&y=0.5&z=1")
    try:
        page = pg.page
        page.wait_for_function("atlasViewer.stats.pending === 0")
        assert pg.stats()["composite"]
        plain = _pixels(page)
        page.fill("#cls", RARE_NAME)
        s = pg.wait_heat(f"{RARE}|1|weighted")
        assert s["composite"] and s["level"] == G and s["heatCells"] == exported_heat_cells(site, RARE, G)
        heat = _pixels(page)
        assert (plain != heat).any(axis=1).mean() > 0.2
        r, g, b = (heat[:, q].astype(int) for q in range(3))
        orange = (r > g + 60) & (g > b + 30)            # the frames' colour scale
        assert orange.mean() > 0.02
        # the rare class rises with i: its frames are on the right half, faded cells on the left
        w = page.evaluate("document.getElementById('atlas').width")
        xs = np.arange(len(heat)) % w
        assert orange[xs > w * 0.55].sum() > 5 * orange[xs < w * 0.45].sum()
        page.check('input[name="filter"][value="winner"]')
        page.fill("#cls", FOX_NAME)
        d = json.loads((site / "data" / LAYER / f"level-{G}.json").read_text())
        assert pg.wait_heat(f"{FOX}|1|winner")["heatCells"] == d["w"].count(FOX) > 0
        page.screenshot(path=str(_artifact("class-view-composite.png")))
        assert pg.errors == []
    finally:
        pg.close()


def _pixels(page) -> np.ndarray:
    data = page.evaluate("""() => { const c = document.getElementById('atlas');
        const d = c.getContext('2d').getImageData(0, 0, c.width, c.height).data; let s = '';
        for (let q = 0; q < d.length; q += 0x8000) s += String.fromCharCode.apply(null, d.subarray(q, q + 0x8000));
        return btoa(s); }""")
    return np.frombuffer(base64.b64decode(data), np.uint8).reshape(-1, 4)[:, :3]


@needs_browser
def test_class_hash_round_trip(browser, served, site):
    G = SIZES[-1]
    pg = Page(browser, served + f"#level={G}&x=0.5&y=0.5&z=1")
    try:
        page = pg.page
        page.fill("#cls", RARE_NAME)
        page.select_option("#sign", "-1")
        page.check('input[name="filter"][value="winner"]')
        s1 = pg.wait_heat(f"{RARE}|-1|winner")
        page.wait_for_function("location.hash === atlasViewer.hash()")
        url = page.url
        assert "class=great%20white%20shark" in url and "filter=winner" in url and "sign=-1" in url
        assert pg.errors == []
    finally:
        pg.close()
    pg2 = Page(browser, url)
    try:
        s2 = pg2.wait_heat(f"{RARE}|-1|winner")
        assert s2["heatCells"] == s1["heatCells"] and s2["level"] == G
        assert pg2.page.input_value("#cls") == RARE_NAME and pg2.page.input_value("#sign") == "-1"
        assert pg2.page.is_checked('input[name="filter"][value="winner"]')
        assert pg2.errors == []
    finally:
        pg2.close()
    # a hand-written link with only the class
    pg3 = Page(browser, served + f"#level={G}&class=Great_White_Shark")
    try:
        assert pg3.wait_heat(f"{RARE}|1|weighted")["heatCells"] == exported_heat_cells(site, RARE, G)
    finally:
        pg3.close()


@needs_browser
def test_unknown_class_suggests_close_names(browser, served, site):
    pg = Page(browser, served)
    try:
        page = pg.page
        assert page.is_hidden("#clsmsg")
        page.fill("#cls", "grate white shark")
        page.press("#cls", "Enter")
        page.wait_for_selector("#clsmsg:not([hidden])")
        msg = page.inner_text("#clsmsg")
        assert "unknown class" in msg and "grate white shark" in msg
        sugg = page.eval_on_selector_all("#clsmsg button.sugg", "bs => bs.map(b => b.textContent)")
        assert sugg[0] == RARE_NAME
        assert page.get_attribute("#cls", "aria-invalid") == "true"
        assert pg.stats()["cls"] == -1
        # the same suggestions as the CLI (difflib on lower-cased names)
        names = [n.lower() for n in json.loads((site / "manifest.json").read_text())["class_names"]]
        for word in ("grate white shark", "shark", "red fax", "thing 01", "gray whale", "whale", "zzzz"):
            want = difflib.get_close_matches(word, names, n=5, cutoff=0.6) or \
                [n for n in names if word in n][:5]   # names containing the text when difflib finds none
            assert page.evaluate(f"atlasViewer.suggest({json.dumps(word)})") == want, word
        # clicking a suggestion shows that class
        page.click("#clsmsg button.sugg >> nth=0")
        pg.wait_heat(f"{RARE}|1|weighted")
        assert page.is_hidden("#clsmsg") and page.input_value("#cls") == RARE_NAME
        # typing: any case shows the class at once and leaves the text alone; an index needs Enter
        page.fill("#cls", "RED FOX")
        pg.wait_heat(f"{FOX}|1|weighted")
        assert page.input_value("#cls") == "RED FOX"
        page.fill("#cls", "1")
        page.fill("#cls", "12")
        assert pg.stats()["cls"] == FOX and page.is_hidden("#clsmsg")
        page.press("#cls", "Enter")
        pg.wait_heat("12|1|weighted")
        assert page.input_value("#cls") == "grey whale"
        assert pg.errors == []
    finally:
        pg.close()
    pg2 = Page(browser, served + "#class=snow%20leperd")
    try:
        pg2.page.wait_for_selector("#clsmsg:not([hidden])")
        assert "unknown class \u201csnow leperd\u201d" in pg2.page.inner_text("#clsmsg")
        assert pg2.stats()["cls"] == -1 and pg2.stats()["classError"]
        assert pg2.page.input_value("#cls") == "snow leperd"
    finally:
        pg2.close()


@needs_browser
def test_multi_file_export_opened_from_disk_explains(browser, site):
    pg = Page(browser, (site / "index.html").as_uri(), ready=False)
    try:
        page = pg.page
        page.wait_for_selector("#diskhelp:not([hidden])", timeout=10000)
        text = page.inner_text("#diskhelp")
        assert "actatlas serve " + str(site) in text and "--single-file" in text
        assert "Failed to fetch" not in page.inner_text("#status")
        assert pg.stats()["error"]
        page.screenshot(path=str(_artifact("disk-opened.png")))
    finally:
        pg.close()


@needs_browser
def test_single_file_class_view_from_disk(browser, run_dir, site, tmp_path):
    index = export_site(run_dir, tmp_path / "one", single_file=True)
    G = SIZES[0]
    pg = Page(browser, index.as_uri() + f"#level={G}&class={RARE_NAME.replace(' ', '%20')}")
    try:
        s = pg.wait_heat(f"{RARE}|1|weighted")
        assert s["heatCells"] == exported_heat_cells(site, RARE, G)
        assert pg.page.is_hidden("#diskhelp") and pg.errors == []
    finally:
        pg.close()


def _to_format1(site: Path, out: Path, K: int = 20) -> Path:
    """A copy of `site` as exported before full class heat: each cell's top-K classes in level-G-heat.json."""
    shutil.copytree(site, out)
    man = json.loads((out / "manifest.json").read_text())
    ly = man["layers"][0]
    ch = ly.pop("class_heat")
    full = {}
    for c in range(N_CLASSES):  # rebuild the full attributions from the per-class files
        for G, (q, pos, neg) in read_class_file(site, c).items():
            full.setdefault(G, np.zeros((len(q), N_CLASSES), np.float32))[:, c] = np.where(q > 0, q / 127 * pos,
                                                                                          q / 127 * neg)
    shutil.rmtree(out / ch["url"].split("{c}")[0])
    for lv in ly["levels"]:
        G, att = lv["size"], full[lv["size"]]
        idx = np.argsort(-np.abs(att), axis=1, kind="stable")[:, :K]
        val = np.take_along_axis(att, idx, axis=1)
        rel = f"data/{LAYER}/level-{G}-heat.json"
        (out / rel).write_text(json.dumps({
            "k": K, "m": len(att), "idx": base64.b64encode(idx.astype("<u2").tobytes()).decode(),
            "val": base64.b64encode(val.astype("<f2").tobytes()).decode(),
            "pos": np.maximum(att.max(0), 0).tolist(), "neg": np.maximum((-att).max(0), 0).tolist()}))
        lv["heat"] = rel
        d = json.loads((out / lv["url"]).read_text())
        d.pop("w"), d.pop("wn")
        (out / lv["url"]).write_text(json.dumps(d))
    man["format"] = 1
    (out / "manifest.json").write_text(json.dumps(man))
    return out


@needs_browser
def test_old_format_export_still_opens(browser, site, tmp_path):
    old = _to_format1(site, tmp_path / "old")
    srv, url = _serve(old)
    G = SIZES[-1]
    try:
        pg = Page(browser, url + f"#level={G}&x=0.5&y=0.5&z=1")
        try:
            page = pg.page
            page.fill("#cls", FOX_NAME)
            s = pg.wait_heat(f"{FOX}|1|weighted")
            assert s["heatFormat"] == "truncated" and s["heatCells"] > 0
            assert page.is_visible("#lg-truncated") and "top 20 classes" in page.inner_text("#lg-truncated")
            page.check('input[name="filter"][value="winner"]')
            s = pg.wait_heat(f"{FOX}|1|winner")
            d = json.loads((site / "data" / LAYER / f"level-{G}.json").read_text())
            assert s["heatCells"] == sum(1 for w in d["w"] if w == FOX)
            page.check('input[name="filter"][value="weighted"]')
            # the rare class is in no cell's top 20: the truncated heat shows nothing, and says why
            page.fill("#cls", RARE_NAME)
            s = pg.wait_heat(f"{RARE}|1|weighted")
            assert s["heatCells"] == 0 and page.is_visible("#lg-truncated")
            page.screenshot(path=str(_artifact("class-view-old-format.png")))
            assert pg.errors == []
        finally:
            pg.close()
    finally:
        srv.shutdown()
        srv.server_close()
