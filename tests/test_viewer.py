"""The exported viewer (in real headless Chromium via Playwright), the site export and the local server."""

from __future__ import annotations

import http.client
import json
import shutil
import threading
from pathlib import Path

import numpy as np
import pytest

from actatlas.errors import UserError
from actatlas.export import export_atlases, export_site, make_server, notebook_html, resolve_request, show
from actatlas.export.site import patch_box

TESTS = Path(__file__).resolve().parent
ROOT = TESTS.parent
ARTIFACTS = ROOT / "test-artifacts"
from conftest import needs_browser, serving  # noqa: E402  (the `browser` fixture is conftest's too)


# ------------------------------------------------------------------ fixtures
@pytest.fixture(scope="module")
def built(tmp_path_factory, build_tiny):
    """The tiny atlas as `build_atlas` returns it (each level holds its grid level)."""
    return build_tiny(tmp_path_factory.mktemp("viewer") / "run", levels=(2, 4, 8))


@pytest.fixture(scope="module")
def run_dir(built):
    return built.run_dir


@pytest.fixture(scope="module")
def site(run_dir, tmp_path_factory):
    out = tmp_path_factory.mktemp("site") / "site"
    export_site(run_dir, out)
    return out


@pytest.fixture(scope="module")
def served(site):
    with serving(site) as url:
        yield url


class Page:
    """A page that records console errors and uncaught exceptions."""

    def __init__(self, browser, url, viewport=(1000, 700)):
        self.page = browser.new_page(viewport={"width": viewport[0], "height": viewport[1]})
        self.errors: list[str] = []
        self.page.on("console", lambda m: self.errors.append(m.text) if m.type == "error" else None)
        self.page.on("pageerror", lambda e: self.errors.append(str(e)))
        self.page.goto(url)
        self.page.wait_for_function("window.atlasViewer && atlasViewer.stats.ready", timeout=15000)

    def stats(self):
        return self.page.evaluate("atlasViewer.stats")

    def settle(self, ms=900):
        self.page.wait_for_timeout(ms)
        self.page.wait_for_function("atlasViewer.stats.pending === 0", timeout=10000)

    def canvas_pixels(self) -> np.ndarray:
        import base64

        data = self.page.evaluate("""() => { const c = document.getElementById('atlas');
            const d = c.getContext('2d').getImageData(0, 0, c.width, c.height).data; let s = '';
            for (let q = 0; q < d.length; q += 0x8000) s += String.fromCharCode.apply(null, d.subarray(q, q + 0x8000));
            return btoa(s); }""")
        return np.frombuffer(base64.b64decode(data), np.uint8)

    def close(self):
        self.page.close()


def _level(site, layer, G):
    return json.loads((site / "data" / layer / f"level-{G}.json").read_text())


# ------------------------------------------------------------------ export (no browser)
def test_export_writes_site(site, run_dir):
    man = json.loads((site / "manifest.json").read_text())
    assert [ly["name"] for ly in man["layers"]] == ["conv2"]
    assert [lv["size"] for lv in man["layers"][0]["levels"]] == [2, 4, 8]
    assert man["class_names"] == [f"c{i}" for i in range(10)]
    for name in ("index.html", "viewer.js", "viewer.css"):
        assert (site / name).is_file()
    src = json.loads((run_dir / "atlas" / "conv2" / "level-8.json").read_text())["cells"]
    d = _level(site, "conv2", 8)
    assert len(d["i"]) == len(src) and d["n"] == [c["n"] for c in src]
    assert d["t"][:5] == [e[0] for e in src[0]["top"]]
    assert sum(d["pc"]) > 0 and max(d["pc"]) <= 8
    for sh in d["sheets"]:
        assert (site / sh["url"]).is_file()
    for url in d["patches"]["sheets"]:
        assert (site / url).is_file()
    # class heat: one file per class over every level, the numbers of Atlas.class_heat (quantized)
    from actatlas import open_atlas

    ch = man["layers"][0]["class_heat"]
    assert ch["levels"] == [2, 4, 8] and ch["cells"][-1] == len(src)
    atlas = open_atlas(run_dir)
    for c in range(10):
        buf = (site / ch["url"].replace("{c}", str(c))).read_bytes()
        assert len(buf) == 8 * 3 + sum(ch["cells"])
        pos = np.frombuffer(buf[:24], "<f4")[0::2]
        q = np.frombuffer(buf[24 + sum(ch["cells"][:2]):], np.int8)
        np.testing.assert_allclose(np.maximum(q, 0) / 127, atlas.class_heat(c, 8), atol=0.5 / 127 + 1e-6)
        assert pos[2] == pytest.approx(max(0.0, float(atlas.class_heat(c, 8, mode="attribution").max())), rel=1e-6)
    # the exported top-1 is each cell's winner over all classes
    assert [t for t in d["t"][0::5]] == d["w"]


def test_patch_box_stays_inside():
    for y, x in [(0, 0), (15, 15), (7, 3)]:
        x0, y0, x1, y1 = patch_box(y, x, 16, 16, 64)
        assert 0 <= x0 < x1 <= 64 and 0 <= y0 < y1 <= 64 and x1 - x0 == y1 - y0 == 16


def test_notebook_html_is_iframe(run_dir):
    h = notebook_html(run_dir)
    assert h.startswith('<iframe srcdoc="') and h.endswith("</iframe>")
    srcdoc = h.split('"', 2)[1]
    assert "<" not in srcdoc and "&lt;script" in srcdoc and "atlas-bundle" in srcdoc


def test_cli_export_single_file(run_dir, tmp_path):
    from actatlas.cli import main

    assert main(["export", str(run_dir), "--out", str(tmp_path / "one"), "--single-file"]) == 0
    page = (tmp_path / "one" / "index.html").read_text()
    assert 'id="atlas-bundle"' in page and "viewer.js" not in page and "data:image/png;base64," in page
    assert main(["export", str(run_dir), "--out", str(tmp_path / "x"), "--layer", "nope"]) == 2


# ------------------------------------------------------------------ server (no browser, no build)
@pytest.fixture
def server_root(tmp_path):
    root = tmp_path / "root"
    (root / "sub").mkdir(parents=True)
    (root / "index.html").write_text("<p>hi</p>")
    (root / "sub" / "a.json").write_text("{}")
    (tmp_path / "secret.txt").write_text("SECRET")
    (root / "link.txt").symlink_to(tmp_path / "secret.txt")
    (root / "linkdir").symlink_to(tmp_path)
    (root / "inside.txt").symlink_to(root / "sub" / "a.json")
    return root


def _get(port, raw):
    c = http.client.HTTPConnection("127.0.0.1", port, timeout=5)
    c.putrequest("GET", raw, skip_host=False, skip_accept_encoding=True)
    c.endheaders()
    r = c.getresponse()
    body = r.read()
    c.close()
    return r.status, body


def test_server_refuses_traversal_and_listing(server_root):
    from actatlas.export import serve as serve_mod  # noqa: F401 (module import works)

    attempts = ["/../secret.txt", "/%2e%2e/secret.txt", "/%2E%2E/secret.txt", "/..%2fsecret.txt",
                "/sub/..%2f..%2fsecret.txt", "/sub/../../secret.txt", "//etc/passwd", "/etc/passwd",
                str(server_root.parent / "secret.txt"), "/link.txt", "/linkdir/secret.txt", "/%252e%252e/secret.txt",
                "/sub%5c..%5c..%5csecret.txt", "/sub/", "/sub", "/./index.html", "http://x/../secret.txt"]
    good = ["/", "/index.html", "/sub/a.json", "/inside.txt"]
    srv = make_server(server_root, "127.0.0.1", 0, threaded=False)
    port = srv.server_address[1]

    def loop():
        for _ in range(len(attempts) + len(good)):
            srv.handle_request()

    t = threading.Thread(target=loop, daemon=True)
    t.start()
    try:
        for raw in attempts:
            status, body = _get(port, raw)
            assert status in (403, 404), raw
            assert b"SECRET" not in body and b"root:" not in body and b"a.json" not in body, raw
        assert _get(port, "/") == (200, b"<p>hi</p>")
        assert _get(port, "/index.html")[0] == 200
        assert _get(port, "/sub/a.json") == (200, b"{}")
        assert _get(port, "/inside.txt") == (200, b"{}")
    finally:
        t.join(10)
        srv.server_close()
    assert not t.is_alive()  # bounded: it stopped after the requests it was given


def test_resolve_request_unit(server_root):
    assert resolve_request(server_root, "/sub/a.json") == (server_root / "sub" / "a.json").resolve()
    assert resolve_request(server_root, "/index.html?x=1#y") is not None
    for raw in ["/..", "/%2e%2e/x", "/a/%2F/b", "//etc/passwd", "\\..\\x", "/sub/%00", "/link.txt"]:
        assert resolve_request(server_root, raw) is None, raw


def test_serve_refuses_remote_host_without_permission(server_root, capsys):
    from actatlas.cli import main
    from actatlas.export import serve

    with pytest.raises(UserError):
        serve(server_root, host="0.0.0.0", port=0)
    with pytest.raises(UserError):
        make_server(server_root, host="192.168.1.1", port=0)
    # explicit permission (what --host does): binds, serves zero requests and returns
    serve(server_root, host="0.0.0.0", port=0, max_requests=0, allow_remote=True)
    assert "http://0.0.0.0:" in capsys.readouterr().out
    assert main(["serve", str(server_root), "--port", "0", "--max-requests", "0"]) == 0
    assert "http://127.0.0.1:" in capsys.readouterr().out
    assert main(["serve", str(server_root.parent / "nothing"), "--port", "0", "--max-requests", "0"]) == 2


# ------------------------------------------------------------------ the viewer in Chromium
@needs_browser
def test_viewer_in_chromium(browser, served, site):
    pg = Page(browser, served)
    page = pg.page
    try:
        s = pg.stats()
        assert s["layer"] == "conv2" and s["drawn"] > 0 and s["error"] is None
        px = pg.canvas_pixels().reshape(-1, 4)[:, :3]
        bg = np.array([0xDF, 0xDF, 0xDF])
        assert (np.abs(px.astype(int) - bg).sum(1) > 30).mean() > 0.05, "canvas looks blank"
        assert len(np.unique(px[::7], axis=0)) > 50

        # zoom: from the widest view, zooming in switches to a finer level with more cells drawn
        for _ in range(3):
            page.keyboard.press("-")
        pg.settle()
        coarse = pg.stats()
        levels_seen = [coarse["level"]]
        for _ in range(4):
            page.click("#zin")
            pg.settle(700)
            levels_seen.append(pg.stats()["level"])
        assert max(levels_seen) > coarse["level"], levels_seen
        assert levels_seen == sorted(levels_seen)
        page.keyboard.press("0")  # home
        pg.settle(1500)
        fine = pg.stats()
        assert fine["level"] > coarse["level"] and fine["drawn"] > coarse["drawn"], (coarse, fine)

        # hover a known cell: its top-5 classes and count from the JSON
        G = fine["level"]
        d = _level(site, "conv2", G)
        c = int(np.argmax(d["n"]))
        pos = page.evaluate(f"atlasViewer.cellCenter({d['i'][c]}, {d['j'][c]})")
        page.mouse.move(pos["x"], pos["y"])
        page.wait_for_selector("#tooltip:not([hidden])")
        rows = page.eval_on_selector_all("#tooltip tr", "rs => rs.map(r => r.cells[0].textContent)")
        names = json.loads((site / "manifest.json").read_text())["class_names"]
        assert rows == [names[t] for t in d["t"][c * 5:c * 5 + 5] if t >= 0]
        assert f"Average of {d['n'][c]} activations" in page.inner_text("#tooltip")
        page.screenshot(path=str(_artifact("viewer.png")))

        # click: the side panel with the cell's patches
        page.mouse.click(pos["x"], pos["y"])
        page.wait_for_selector("#panel:not([hidden])")
        page.wait_for_function(f"document.querySelectorAll('#patches canvas[data-painted]').length === {d['pc'][c]}")
        assert d["pc"][c] > 0
        assert "fidelity" in page.inner_text("#pinfo")
        page.screenshot(path=str(_artifact("viewer-panel.png")))
        page.keyboard.press("Escape")
        assert not page.is_visible("#panel")

        # class filter changes the pixels
        before = pg.canvas_pixels()
        page.fill("#cls", names[d["t"][c * 5]])
        page.wait_for_function("atlasViewer.stats.cls >= 0")
        pg.settle(600)
        after = pg.canvas_pixels()
        assert (before != after).mean() > 0.01
        page.select_option("#sign", "-1")
        pg.settle(400)
        assert (pg.canvas_pixels() != after).mean() > 0.001
        page.screenshot(path=str(_artifact("viewer-class.png")))
        page.click("#clsclear")

        # URL hash round-trip: pan + zoom, then load the link in a fresh page
        page.keyboard.press("ArrowRight")
        page.keyboard.press("+")
        pg.settle(1500)
        page.wait_for_function("location.hash === atlasViewer.hash()")
        url, view, st = page.url, page.evaluate("atlasViewer.view"), pg.stats()
        assert "#layer=conv2" in url
        assert pg.errors == []
    finally:
        pg.close()
    pg2 = Page(browser, url)
    try:
        pg2.settle(300)
        v2, st2 = pg2.page.evaluate("atlasViewer.view"), pg2.stats()
        assert abs(v2["x"] - view["x"]) < 1e-3 and abs(v2["y"] - view["y"]) < 1e-3
        assert abs(v2["z"] - view["z"]) < 1e-2 and st2["level"] == st["level"]
        assert pg2.errors == []
    finally:
        pg2.close()


@needs_browser
def test_viewer_phone_width_and_keyboard(browser, served):
    pg = Page(browser, served, viewport=(390, 760))
    try:
        page = pg.page
        assert page.evaluate("document.documentElement.scrollWidth <= window.innerWidth + 1")
        for sel in ("#home", "#zin", "#zout"):
            assert page.evaluate(f"document.querySelector('{sel}').tagName") == "BUTTON"
        z0 = page.evaluate("atlasViewer.view.z")
        page.focus("#zin")
        page.keyboard.press("Enter")
        pg.settle(800)
        assert page.evaluate("atlasViewer.view.z") > z0
        page.screenshot(path=str(_artifact("viewer-phone.png")))
        assert pg.errors == []
    finally:
        pg.close()


@needs_browser
def test_single_file_from_file_url(browser, run_dir, tmp_path):
    index = export_site(run_dir, tmp_path / "one", single_file=True)
    shutil.copy(index, tmp_path / "moved.html")  # self-contained: works anywhere
    pg = Page(browser, (tmp_path / "moved.html").as_uri())
    try:
        s = pg.stats()
        assert s["drawn"] > 0 and s["error"] is None
        px = pg.canvas_pixels().reshape(-1, 4)[:, :3]
        assert len(np.unique(px[::7], axis=0)) > 50
        assert pg.errors == []
    finally:
        pg.close()


@needs_browser
def test_notebook_iframe_draws(browser, run_dir):
    page = browser.new_page(viewport={"width": 900, "height": 800})
    errors = []
    page.on("pageerror", lambda e: errors.append(str(e)))
    page.on("console", lambda m: errors.append(m.text) if m.type == "error" else None)
    try:
        page.set_content("<!doctype html><body>" + notebook_html(run_dir) + "</body>")
        frame = page.frames[1]
        frame.wait_for_function("window.atlasViewer && atlasViewer.stats.ready", timeout=15000)
        assert frame.evaluate("atlasViewer.stats.drawn") > 0
        assert errors == []
    finally:
        page.close()


def test_cli_serve_exports_a_run_first(run_dir, capsys):
    from actatlas.cli import main

    assert main(["serve", str(run_dir), "--port", "0", "--max-requests", "0"]) == 0
    out = capsys.readouterr().out
    assert "http://127.0.0.1:" in out and (run_dir / "site" / "index.html").is_file()
    assert (run_dir / "site" / "manifest.json").is_file()


def _artifact(name: str) -> Path:
    ARTIFACTS.mkdir(exist_ok=True)
    return ARTIFACTS / name


def test_atlas_repr_html_is_the_viewer(run_dir):
    """Jupyter: ``aa.show(atlas)`` is the interactive viewer of an atlas that knows its run, its
    coarsest canvas otherwise; an Atlas itself shows the canvas and says how to get the viewer."""
    import base64
    import io

    from PIL import Image

    from actatlas import Atlas, open_atlas

    def png_size(h: str) -> tuple[int, int]:
        b64 = h.split("base64,", 1)[1].split('"', 1)[0]
        return Image.open(io.BytesIO(base64.b64decode(b64))).size

    atlas = open_atlas(run_dir)
    assert atlas.run_dir == run_dir
    assert show(atlas)._repr_html_() == notebook_html(run_dir, atlas.layer)
    assert f"height:{480}px" in show(atlas, height=480)._repr_html_()
    lv = atlas.levels[0]
    own = atlas._repr_html_()
    assert "<iframe" not in own and "actatlas.show(atlas)" in own
    assert png_size(own) == (lv.size * lv.icon_size, lv.size * lv.icon_size)
    bare = Atlas(atlas.layer, atlas.levels, atlas.class_names)
    h = show(bare)._repr_html_()
    assert "<iframe" not in h and png_size(h) == (lv.size * lv.icon_size, lv.size * lv.icon_size)
    with pytest.raises(UserError):
        open_atlas(run_dir.parent / "no-such-run")


# ------------------------------------------------------------------ export from Atlas objects
def _files(root: Path) -> dict[str, bytes]:
    return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


def test_export_of_built_atlas_matches_the_run_export(built, site, tmp_path):
    """`export_atlases` of the atlas `build_atlas` returned (grid levels in memory, icons as arrays)
    writes the same bytes as `export_site` of its run (grid levels and atlas read from disk)."""
    assert all(lv.grid is not None for lv in built.levels)
    index = export_atlases([built], tmp_path / "mem")
    assert index == tmp_path / "mem" / "index.html"
    assert _files(tmp_path / "mem") == _files(site)


def _copy_run(run_dir: Path, dst: Path) -> Path:
    shutil.copytree(run_dir, dst, ignore=shutil.ignore_patterns("site"))
    return dst


def _warnings(caplog) -> list[str]:
    return [r.getMessage() for r in caplog.records
            if r.name == "actatlas.export.site" and r.levelname == "WARNING"]


def test_export_says_what_it_leaves_out(run_dir, tmp_path, caplog):
    """Moved photos and a missing grid level are one warning each (with a count), not silence."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    run = _copy_run(run_dir, tmp_path / "run")
    rows = run / "collect" / "conv2" / "rows.parquet"
    t = pq.read_table(rows)
    moved = pa.array([f"{tmp_path}/moved/{p.rsplit('#', 1)[-1]}.jpg" for p in t.column("path").to_pylist()])
    pq.write_table(t.set_column(t.schema.get_field_index("path"), "path", moved), rows)
    (run / "grid" / "conv2" / "level-8.npz").unlink()
    with caplog.at_level("WARNING", logger="actatlas.export.site"):
        export_site(run, tmp_path / "site")
    msgs = _warnings(caplog)
    assert len(msgs) == 2, msgs
    photos = next(m for m in msgs if "member photo" in m)
    n = int(photos.split(" ", 1)[0])
    assert n > 1 and f"member photos could not be read (first: {tmp_path}/moved/" in photos
    assert photos.endswith("; their patches are left out")
    grid = next(m for m in msgs if "grid level" in m)
    assert grid.startswith("1 level has no grid level (first: conv2 level 8: ")
    man = json.loads((tmp_path / "site" / "manifest.json").read_text())
    assert man["layers"][0]["class_heat"]["levels"] == [2, 4]
    for G in (2, 4, 8):
        d = _level(tmp_path / "site", "conv2", G)
        assert sum(d["pc"]) == 0 and ("w" in d) == (G != 8)


def test_patch_geometry_from_the_run_or_the_model(run_dir, site, tmp_path, caplog):
    """Member patches use the preprocessing the run recorded; without it, the model loaded again
    (same patches); when neither is available, a plain 224 px centre crop and one warning."""
    run = _copy_run(run_dir, tmp_path / "run")
    complete = run / "collect" / "complete.json"
    summary = json.loads(complete.read_text())
    del summary["preprocess"]
    complete.write_text(json.dumps(summary))
    with caplog.at_level("WARNING", logger="actatlas.export.site"):
        export_site(run, tmp_path / "reloaded")
    assert _warnings(caplog) == []
    for G in (2, 4, 8):
        assert _level(tmp_path / "reloaded", "conv2", G)["pc"] == _level(site, "conv2", G)["pc"]
        name = f"data/conv2/level-{G}/patches-0.png"
        assert (tmp_path / "reloaded" / name).read_bytes() == (site / name).read_bytes()
    del summary["config"]["model_info"]
    complete.write_text(json.dumps(summary))
    export_site(run, tmp_path / "plain")
    msgs = _warnings(caplog)
    assert len(msgs) == 1 and "plain 224 px centre crop" in msgs[0]
    assert "records no preprocessing" in msgs[0] and "its model cannot be loaded" in msgs[0]
    assert sum(_level(tmp_path / "plain", "conv2", 8)["pc"]) > 0


def test_export_imports_no_pipeline_and_no_private_names():
    """export/ depends on the atlas, grid, run, data, models, store and errors modules only, through
    their public names, and imports nothing inside functions."""
    import ast

    import actatlas.export as export

    allowed = {"atlas", "grid", "run", "data", "models", "store", "errors"}
    for path in Path(export.__file__).parent.glob("*.py"):
        tree = ast.parse(path.read_text())
        top = set(map(id, tree.body))
        for node in ast.walk(tree):
            if not isinstance(node, (ast.Import, ast.ImportFrom)):
                continue
            assert id(node) in top, f"{path.name}:{node.lineno}: import inside a function"
            if isinstance(node, ast.ImportFrom) and node.level == 2:
                assert node.module.split(".")[0] in allowed, f"{path.name}: imports actatlas.{node.module}"
                assert not [a.name for a in node.names if a.name.startswith("_")], f"{path.name}:{node.lineno}"
            names = [a.name for a in node.names] + [getattr(node, "module", None) or ""]
            assert not any("pipeline" in n for n in names), f"{path.name}:{node.lineno}"
