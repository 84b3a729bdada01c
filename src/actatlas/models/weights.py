"""Weights files: local paths or URLs, sha256-verified, cached, loaded safely.

`fetch_weights` turns a path or URL into a local file:

- a local path is returned as is (it must exist; its sha256 is checked when one is given);
- a URL (``file://``, ``http://``, ``https://``) is downloaded with urllib into the cache directory
  (``$ACTATLAS_CACHE``, else ``~/.cache/actatlas/weights``) as ``<8 hex of sha256(url)>-<basename>``.
  The download goes to a temporary file in that directory, is verified, then renamed atomically, so
  a cached file is always complete. A cached file is reused without downloading again when it matches
  the given sha256 (or when no sha256 is given).

`load_state_dict` reads a file with ``torch.load(weights_only=True)`` (no arbitrary code runs).
"""

from __future__ import annotations

import hashlib
import http.client
import logging
import os
import pickle
import re
import tempfile
import urllib.error
import urllib.parse
import urllib.request
from pathlib import Path

import torch

from ..errors import UserError

log = logging.getLogger(__name__)

__all__ = ["default_cache_dir", "sha256_file", "fetch_weights", "load_state_dict", "is_url"]

_URL_SCHEMES = ("http", "https", "file")
_CHUNK = 1 << 20


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
        raise UserError(f"sha256 must be 64 hexadecimal digits, got {sha256!r}")
    return s


def _check_sha(path: Path, expected: str | None, what: str) -> str:
    digest = sha256_file(path)
    if expected is not None and digest != expected:
        raise UserError(f"sha256 mismatch for {what}: expected {expected}, got {digest}")
    return digest


def _cache_name(url: str) -> str:
    parsed = urllib.parse.urlparse(url)
    base = os.path.basename(urllib.parse.unquote(parsed.path)) or "weights"
    base = re.sub(r"[^A-Za-z0-9._-]", "_", base)
    tag = hashlib.sha256(url.encode("utf-8")).hexdigest()[:8]
    return f"{tag}-{base}"


def fetch_weights(source: str | Path, sha256: str | None = None,
                  cache_dir: str | Path | None = None) -> Path:
    """A local file for `source` (path or URL), verified against `sha256` when given.

    Args:
        source: a file path, or a ``file://``, ``http://`` or ``https://`` URL.
        sha256: expected hex digest (64 digits, optional ``sha256:`` prefix).
        cache_dir: where downloads go; default `default_cache_dir()`.

    Raises:
        UserError: missing file, unsupported URL scheme, network failure (the message names the URL
            and suggests ``--weights FILE``), or checksum mismatch (a mismatching download is removed).
    """
    expected = _normalize_sha(sha256)
    source = str(source)
    if not is_url(source):
        path = Path(source).expanduser()
        if not path.is_file():
            raise UserError(f"weights file not found: {source}")
        _check_sha(path, expected, str(path))
        return path

    scheme = urllib.parse.urlparse(source).scheme.lower()
    if scheme not in _URL_SCHEMES:
        raise UserError(f"unsupported URL scheme {scheme!r} in {source}; use http(s)://, file:// or a path")
    cache = Path(cache_dir).expanduser() if cache_dir is not None else default_cache_dir()
    dest = cache / _cache_name(source)
    if dest.is_file():
        if expected is None:
            log.info("using cached weights %s (no sha256 given to verify)", dest)
            return dest
        if sha256_file(dest) == expected:
            log.info("using cached weights %s", dest)
            return dest
        log.warning("cached %s does not match the expected sha256; downloading again", dest)
    try:
        cache.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise UserError(f"cannot create the weights cache directory {cache}: {e}") from e
    _download(source, dest, expected)
    return dest


def _download(url: str, dest: Path, expected: str | None) -> None:
    """Download `url` to `dest` via a temp file in the same directory + atomic rename."""
    from tqdm.auto import tqdm

    fd, tmp_name = tempfile.mkstemp(prefix=".part-", suffix=".tmp", dir=dest.parent)
    tmp = Path(tmp_name)
    h = hashlib.sha256()
    try:
        try:
            req = urllib.request.Request(url, headers={"User-Agent": "actatlas"})
            with urllib.request.urlopen(req, timeout=60) as resp, os.fdopen(fd, "wb") as out:
                fd = None
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
            raise UserError(
                f"could not download weights from {url}: {reason}. Download the file yourself and "
                "pass it as the weights FILE."
            ) from e
        digest = h.hexdigest()
        if expected is not None and digest != expected:
            raise UserError(f"sha256 mismatch for {url}: expected {expected}, got {digest}; "
                            "the download was discarded")
        os.replace(tmp, dest)
        log.info("saved %s (sha256 %s)", dest, digest)
    finally:
        if fd is not None:
            os.close(fd)
        if tmp.exists():
            tmp.unlink()


def load_state_dict(path: str | Path) -> dict[str, torch.Tensor]:
    """Read a PyTorch state dict (``torch.load(weights_only=True)`` on CPU).

    Checkpoints that wrap the state dict under ``"state_dict"`` or ``"model"`` are unwrapped, and a
    common ``"module."`` prefix (DataParallel) is removed. Returns name -> tensor.

    Raises:
        UserError: unreadable file, or content that is not a mapping of names to tensors.
    """
    try:
        obj = torch.load(str(path), map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as e:
        # torch's message advises weights_only=False, i.e. running the file's code: never pass that on
        found = re.search(r"Unsupported global: (?:GLOBAL )?([\w.]+)", str(e))
        what = f" (it references {found.group(1)})" if found else ""
        raise UserError(f"{path} holds pickled Python objects{what}, not a plain state dict; actatlas does not "
                        "unpickle code. Save the model's state_dict() with torch.save and pass that file") from None
    except Exception as e:  # noqa: BLE001  (zip and torch errors all mean "not a weights file")
        first = str(e).strip().splitlines()[0] if str(e).strip() else ""
        raise UserError(f"cannot read {path} as a PyTorch state dict: {type(e).__name__}: {first}") from None
    if isinstance(obj, dict):
        for key in ("state_dict", "model", "model_state_dict"):
            inner = obj.get(key)
            if isinstance(inner, dict) and inner and all(isinstance(v, torch.Tensor) for v in inner.values()):
                obj = inner
                break
    if not isinstance(obj, dict) or not obj:
        raise UserError(f"{path} does not contain a state dict (got {type(obj).__name__})")
    bad = [k for k, v in obj.items() if not isinstance(k, str) or not isinstance(v, torch.Tensor)]
    if bad:
        raise UserError(f"{path} is not a state dict: entries that are not tensors: {bad[:5]}")
    if all(k.startswith("module.") for k in obj):
        obj = {k[len("module."):]: v for k, v in obj.items()}
    return dict(obj)
