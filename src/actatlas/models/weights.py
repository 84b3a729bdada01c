"""Weights files: local paths, URLs or named sources, sha256-verified, cached, loaded safely.

`fetch_weights` turns a path, URL or named source into a local file:

- a local path is returned as is (it must exist; its sha256 is checked when one is given);
- a named source (`WEIGHT_SOURCES`, e.g. ``"inception5h"``) stands for its URL (and its published
  sha256 when there is one);
- a URL (``file://``, ``http://``, ``https://``) is downloaded with urllib into the cache directory
  (``$ACTATLAS_CACHE``, else ``~/.cache/actatlas/weights``) as ``<8 hex of sha256(url)>-<basename>``.
  The download goes to a temporary file beside it and is renamed into place once verified
  (`actatlas.store.write_atomic`), so a cached file is always complete. A cached file is reused
  without downloading again when it matches the expected sha256.

**Trust on first use.** When no sha256 is given or published (lucent's ``inception5h.pth`` has none),
the first download's sha256 is printed (a warning) and recorded beside the cached file as
``<file>.sha256`` (``sha256sum`` format); every later use verifies the cached file against that record
and refuses a file that changed. To check the first download itself, fetch the file a second time
from another network or machine and compare (``sha256sum inception5h.pth`` there, against the recorded
value); ``sha256sum -c <file>.sha256`` in the cache directory re-checks the cached copy.

`load_state_dict` reads a file with ``torch.load(weights_only=True)`` (no arbitrary code runs).
"""

from __future__ import annotations

import hashlib
import http.client
import logging
import os
import pickle
import re
import urllib.error
import urllib.parse
import urllib.request
from dataclasses import dataclass
from pathlib import Path

import torch

from ..errors import ConfigError, ModelError
from ..store import write_atomic

log = logging.getLogger(__name__)

__all__ = ["default_cache_dir", "sha256_file", "fetch_weights", "load_state_dict", "is_url", "WeightSource",
           "WEIGHT_SOURCES", "recorded_sha256"]

_URL_SCHEMES = ("http", "https", "file")
_CHUNK = 1 << 20


@dataclass(frozen=True)
class WeightSource:
    """A public weights file known by name.

    Attributes:
        url: where it is downloaded from.
        model: the registered model whose state dict it is.
        sha256: the published checksum, or None (then trust on first use, see the module docstring).
        description: what the file is and who publishes it.
    """

    url: str
    model: str
    sha256: str | None = None
    description: str = ""


WEIGHT_SOURCES: dict[str, WeightSource] = {
    "inception5h": WeightSource(
        url="https://github.com/ProGamerGov/pytorch-old-tensorflow-models/raw/master/inception5h.pth",
        model="inceptionv1",
        description="Lucid's InceptionV1 (inception5h) converted to PyTorch by ProGamerGov: the file "
                    "lucent's inceptionv1(pretrained=True) downloads (lucent/modelzoo/inceptionv1/"
                    "InceptionV1.py, model_urls['inceptionv1']). No sha256 is published.",
    ),
}
"""Named weight sources: ``load_model("inceptionv1", weights="inception5h")``."""


def default_cache_dir() -> Path:
    """``$ACTATLAS_CACHE`` if set, else ``~/.cache/actatlas/weights``."""
    env = os.environ.get("ACTATLAS_CACHE")
    return Path(env).expanduser() if env else Path.home() / ".cache" / "actatlas" / "weights"


def sha256_file(path: str | Path) -> str:
    """Hex sha256 digest of a file."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(_CHUNK), b""):
            h.update(chunk)
    return h.hexdigest()


def is_url(source: str) -> bool:
    """True for ``scheme://...`` strings (Windows drive letters like ``C:\\`` are not URLs)."""
    return re.match(r"^[A-Za-z][A-Za-z0-9+.-]+://", str(source)) is not None


def _normalize_sha(sha256: str | None) -> str | None:
    if sha256 is None:
        return None
    s = sha256.strip().lower()
    if s.startswith("sha256:"):
        s = s[len("sha256:"):]
    if not re.fullmatch(r"[0-9a-f]{64}", s):
        raise ConfigError(f"sha256 must be 64 hexadecimal digits, got {sha256!r}")
    return s


def _check_sha(path: Path, expected: str | None, what: str) -> str:
    digest = sha256_file(path)
    if expected is not None and digest != expected:
        raise ModelError(f"sha256 mismatch for {what}: expected {expected}, got {digest}")
    return digest


def _cache_name(url: str) -> str:
    parsed = urllib.parse.urlparse(url)
    base = os.path.basename(urllib.parse.unquote(parsed.path)) or "weights"
    base = re.sub(r"[^A-Za-z0-9._-]", "_", base)
    tag = hashlib.sha256(url.encode("utf-8")).hexdigest()[:8]
    return f"{tag}-{base}"


def _record_path(dest: Path) -> Path:
    return dest.with_name(dest.name + ".sha256")


def recorded_sha256(cached: str | Path) -> str | None:
    """The sha256 recorded on first download beside a cached weights file, or None."""
    record = _record_path(Path(cached))
    if not record.is_file():
        return None
    found = re.match(r"\s*([0-9a-fA-F]{64})\b", record.read_text("utf-8", errors="replace"))
    return found.group(1).lower() if found else None


def _write_record(dest: Path, digest: str) -> Path:
    text = f"{digest}  {dest.name}\n".encode()
    return write_atomic(_record_path(dest), lambda tmp: tmp.write_bytes(text))


def _trust_on_first_use(dest: Path, digest: str, url: str, downloaded: bool) -> None:
    record = _write_record(dest, digest)
    how = "downloaded" if downloaded else "found in the cache"
    log.warning("%s %s with no published sha256: its sha256 is %s, recorded in %s; every later use is "
                "checked against it (trust on first use). To check this copy, download the file once more "
                "elsewhere and compare its sha256sum", url, how, digest, record)


def fetch_weights(source: str | Path, sha256: str | None = None,
                  cache_dir: str | Path | None = None) -> Path:
    """A local file for `source` (path, URL or named source), verified against a sha256.

    Args:
        source: a file path; a ``file://``, ``http://`` or ``https://`` URL; or a name in
            `WEIGHT_SOURCES` (``"inception5h"``), unless a file of that name exists.
        sha256: expected hex digest (64 digits, optional ``sha256:`` prefix); for a named source,
            default its published one.
        cache_dir: where downloads go; default `default_cache_dir()`.

    A URL downloaded without any expected sha256 is trusted on first use: its digest is printed and
    recorded beside the cached file, and every later call verifies the cached file against the record.

    Raises:
        ModelError: missing file, unsupported URL scheme, network failure (the message names the URL
            and suggests the weights FILE), or checksum mismatch (a mismatching download is removed;
            a cached file that no longer matches its first-use record is refused).
        ConfigError: a malformed sha256.
    """
    expected = _normalize_sha(sha256)
    source = str(source)
    named = WEIGHT_SOURCES.get(source)
    if named is not None and not Path(source).expanduser().exists():
        expected = expected or _normalize_sha(named.sha256)
        log.info("weights %r: %s", source, named.url)
        source = named.url
    if not is_url(source):
        path = Path(source).expanduser()
        if not path.is_file():
            known = ", ".join(sorted(WEIGHT_SOURCES))
            raise ModelError(f"weights file not found: {source} (named weight sources: {known})")
        _check_sha(path, expected, str(path))
        return path

    scheme = urllib.parse.urlparse(source).scheme.lower()
    if scheme not in _URL_SCHEMES:
        raise ModelError(f"unsupported URL scheme {scheme!r} in {source}; use http(s)://, file:// or a path")
    cache = Path(cache_dir).expanduser() if cache_dir is not None else default_cache_dir()
    dest = cache / _cache_name(source)
    if dest.is_file():
        digest = sha256_file(dest)
        if expected is None:
            recorded = recorded_sha256(dest)
            if recorded is None:
                _trust_on_first_use(dest, digest, source, downloaded=False)
            elif digest != recorded:
                raise ModelError(f"cached weights {dest} changed since their first download: sha256 {digest}, "
                                 f"recorded {recorded}. Delete {dest} and {_record_path(dest).name} to "
                                 "download them again")
            log.info("using cached weights %s (sha256 %s, as recorded)", dest, digest)
            return dest
        if digest == expected:
            log.info("using cached weights %s", dest)
            return dest
        log.warning("cached %s does not match the expected sha256; downloading again", dest)
    try:
        cache.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise ModelError(f"cannot create the weights cache directory {cache}: {e}") from e
    digest = _download(source, dest, expected)
    if expected is None:
        _trust_on_first_use(dest, digest, source, downloaded=True)
    return dest


def _download(url: str, dest: Path, expected: str | None) -> str:
    """Download `url` to `dest` (a temp file beside it, renamed when complete and verified); its sha256."""
    from tqdm.auto import tqdm

    h = hashlib.sha256()

    def write(tmp: Path) -> None:
        try:
            req = urllib.request.Request(url, headers={"User-Agent": "actatlas"})
            with urllib.request.urlopen(req, timeout=60) as resp, open(tmp, "wb") as out:
                length = resp.headers.get("Content-Length")
                total = int(length) if length and length.isdigit() else None
                log.info("downloading %s -> %s", url, dest)
                with tqdm(total=total, unit="B", unit_scale=True, unit_divisor=1024,
                          desc=dest.name, disable=None if total else True, leave=False) as bar:
                    for chunk in iter(lambda: resp.read(_CHUNK), b""):
                        out.write(chunk)
                        h.update(chunk)
                        bar.update(len(chunk))
        except (urllib.error.URLError, http.client.HTTPException, OSError, ValueError) as e:
            reason = getattr(e, "reason", None) or e
            raise ModelError(
                f"could not download weights from {url}: {reason}. Download the file yourself and "
                "pass it as the weights FILE."
            ) from e
        if expected is not None and h.hexdigest() != expected:
            raise ModelError(f"sha256 mismatch for {url}: expected {expected}, got {h.hexdigest()}; "
                             "the download was discarded")

    write_atomic(dest, write)
    log.info("saved %s (sha256 %s)", dest, h.hexdigest())
    return h.hexdigest()


def load_state_dict(path: str | Path) -> dict[str, torch.Tensor]:
    """Read a PyTorch state dict (``torch.load(weights_only=True)`` on CPU).

    Checkpoints that wrap the state dict under ``"state_dict"`` or ``"model"`` are unwrapped, and a
    common ``"module."`` prefix (DataParallel) is removed. Returns name -> tensor.

    Raises:
        ModelError: unreadable file, or content that is not a mapping of names to tensors.
    """
    try:
        obj = torch.load(str(path), map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as e:
        # torch's message advises weights_only=False, i.e. running the file's code: never pass that on
        found = re.search(r"Unsupported global: (?:GLOBAL )?([\w.]+)", str(e))
        what = f" (it references {found.group(1)})" if found else ""
        raise ModelError(f"{path} holds pickled Python objects{what}, not a plain state dict; actatlas does not "
                        "unpickle code. Save the model's state_dict() with torch.save and pass that file") from None
    except Exception as e:  # noqa: BLE001  (zip and torch errors all mean "not a weights file")
        first = str(e).strip().splitlines()[0] if str(e).strip() else ""
        raise ModelError(f"cannot read {path} as a PyTorch state dict: {type(e).__name__}: {first}") from None
    if isinstance(obj, dict):
        for key in ("state_dict", "model", "model_state_dict"):
            inner = obj.get(key)
            if isinstance(inner, dict) and inner and all(isinstance(v, torch.Tensor) for v in inner.values()):
                obj = inner
                break
    if not isinstance(obj, dict) or not obj:
        raise ModelError(f"{path} does not contain a state dict (got {type(obj).__name__})")
    bad = [k for k, v in obj.items() if not isinstance(k, str) or not isinstance(v, torch.Tensor)]
    if bad:
        raise ModelError(f"{path} is not a state dict: entries that are not tensors: {bad[:5]}")
    if all(k.startswith("module.") for k in obj):
        obj = {k[len("module."):]: v for k, v in obj.items()}
    return dict(obj)
