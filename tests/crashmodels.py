"""Models that kill their own process once, for the Ray fault-tolerance test (``crashmodels:...``).

`crash_once_tiny_cnn` is `tinymodels.tiny_cnn` (same weights) whose forward number
``$ACTATLAS_TEST_CRASH_AT`` (default 3) in a process calls ``os._exit(1)``, but only when
``$ACTATLAS_TEST_CRASH_MARKER`` is set and names a file that does not exist yet; it creates the file
first, so the restarted worker runs normally. Without the variable (e.g. in the test's driver
process) the model never crashes.
"""

from __future__ import annotations

import os

from tinymodels import tiny_cnn


def crash_once_tiny_cnn(num_classes: int = 10):
    spec = tiny_cnn(num_classes)
    spec.name = "crashmodels:crash_once_tiny_cnn"
    calls = {"n": 0}
    at = int(os.environ.get("ACTATLAS_TEST_CRASH_AT", "3"))

    def hook(mod, inp):
        marker = os.environ.get("ACTATLAS_TEST_CRASH_MARKER")
        if not marker:
            return
        calls["n"] += 1
        if calls["n"] == at and not os.path.exists(marker):
            with open(marker, "w") as f:
                f.write(str(os.getpid()))
            os._exit(1)

    spec.module.register_forward_pre_hook(hook)
    return spec
