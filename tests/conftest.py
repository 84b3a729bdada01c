"""Shared test set-up: tests/ on sys.path (the tiny models), numba's disk cache, the fast render
settings and the one tiny atlas build that many modules use.

`build_tiny(out, **overrides)` runs ``aa.build_atlas`` on the tiny CNN over bundled sample crops with
settings that take seconds; `tiny_run` is one such run, built once per session (copy it before
changing it). Anything that runs UMAP or the real model is marked ``slow``.
"""

from __future__ import annotations

import contextlib
import dataclasses
import os
import sys
from pathlib import Path

import pytest

TESTS = Path(__file__).resolve().parent
ROOT = TESTS.parent
if str(TESTS) not in sys.path:
    sys.path.insert(0, str(TESTS))
os.environ.setdefault("NUMBA_CACHE_DIR", str(ROOT / ".cache" / "numba"))

import actatlas as aa  # noqa: E402

# ---- real Chromium (Debian's, driven by Playwright; never `playwright install`)
CHROMIUM = "/usr/bin/chromium"
CHROME_ARGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
               "--disable-component-update"]
try:
    from playwright.sync_api import sync_playwright
except ImportError:  # pragma: no cover - depends on the environment
    sync_playwright = None
HAVE_BROWSER = sync_playwright is not None and Path(CHROMIUM).is_file()
if not HAVE_BROWSER and os.environ.get("ACTATLAS_REQUIRE_BROWSER"):
    raise RuntimeError("ACTATLAS_REQUIRE_BROWSER is set (CI) but playwright or /usr/bin/chromium is missing; "
                       "install requirements-test.txt and 'apt-get install -y chromium'")
needs_browser = pytest.mark.skipif(
    not HAVE_BROWSER,
    reason="browser tests need playwright (pip install playwright) and Debian's chromium at /usr/bin/chromium "
           "(apt-get install -y chromium); 'playwright install' is not used")

FAST_RENDER = dict(steps=8, attempts=1, icon_size=24, batch_size=8, transforms="recipe")


def fast_render(**kw) -> aa.RenderConfig:
    """CPU-default render settings cut down to a few steps on small icons."""
    return dataclasses.replace(aa.RenderConfig.cpu_default(), **{**FAST_RENDER, **kw})


def tiny_build(out, **kw) -> aa.Atlas:
    """``aa.build_atlas`` of the tiny CNN over 160 bundled crops (2 positions each), levels 2 and 4,
    a PCA layout unless `layout` is given, and `fast_render` icons; keyword arguments override."""
    args = dict(images="sample:160", out=out, model="tinymodels:tiny_cnn", levels=(2, 4), min_count=2,
                collect=aa.CollectConfig(per_image=2, batch_size=32), layout=aa.LayoutConfig(method="pca"),
                render=fast_render(), runtime=aa.Runtime(progress=False, numba_cache=False))
    args.update(kw)
    return aa.build_atlas(**args)


@pytest.fixture(scope="session")
def build_tiny():
    """The `tiny_build` function, for tests that build their own variant."""
    return tiny_build


@pytest.fixture(scope="session")
def tiny_run(tmp_path_factory) -> aa.Atlas:
    """One tiny atlas (see `tiny_build`), shared by the session: copy its run before changing it."""
    return tiny_build(tmp_path_factory.mktemp("tiny") / "run")


@pytest.fixture(scope="session")
def browser():
    """One headless Chromium for the session."""
    if not HAVE_BROWSER:
        pytest.skip("no playwright/chromium")
    with sync_playwright() as p:
        b = p.chromium.launch(executable_path=CHROMIUM, args=CHROME_ARGS)
        yield b
        b.close()


def layer_output_shapes(module, names, x) -> dict[str, tuple]:
    """{name: output shape} of the submodules `names` of `module` on input x (one no-grad forward)."""
    import torch

    out = {}
    hs = [module.get_submodule(n).register_forward_hook(
        lambda _m, _i, o, n=n: out.__setitem__(n, tuple(o.shape))) for n in names]
    try:
        with torch.no_grad():
            module(x)
    finally:
        for h in hs:
            h.remove()
    return out


@contextlib.contextmanager
def serving(site):
    """The viewer's server on `site`, bound to 127.0.0.1 on a free port, in a thread: yields its URL."""
    import threading

    from actatlas.export import make_server

    srv = make_server(site, "127.0.0.1", 0)
    t = threading.Thread(target=srv.serve_forever, daemon=True)
    t.start()
    try:
        yield f"http://127.0.0.1:{srv.server_address[1]}/"
    finally:
        srv.shutdown()
        srv.server_close()
