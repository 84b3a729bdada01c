"""Torch device names from the user, checked once with a clear error (design.md: device and dtype
come from an argument, never from module-level state)."""

from __future__ import annotations

import torch

from .errors import ConfigError, UserError


def resolve_device(device: str | torch.device | None) -> torch.device:
    """`device` ("cpu", "cuda", "cuda:1", "mps", a torch.device, None = cpu) as a torch.device.

    UserError when the name is not a device or names an accelerator this torch build or machine
    lacks (instead of torch's "Torch not compiled with CUDA enabled" traceback).
    """
    if device is None:
        return torch.device("cpu")
    try:
        dev = torch.device(device)
    except (RuntimeError, TypeError) as exc:
        raise ConfigError(f"device {device!r} is not a torch device ({exc}); e.g. cpu, cuda, cuda:1") from None
    if dev.type == "cuda":
        if not torch.cuda.is_available():
            raise ConfigError(f"device {device} needs a CUDA GPU and a CUDA build of torch; this torch "
                            f"({torch.__version__}) sees none. Use the cpu device")
        if dev.index is not None and dev.index >= torch.cuda.device_count():
            raise ConfigError(f"device {device}: only {torch.cuda.device_count()} CUDA device(s) visible")
    elif dev.type == "mps":
        mps = getattr(torch.backends, "mps", None)
        if mps is None or not mps.is_available():
            raise ConfigError(f"device {device}: MPS is not available on this machine")
    return dev
