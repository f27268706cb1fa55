"""Figures measured by the long-running reliability tests, kept for ``bench/RESULTS.md``.

The same test asserts the guarantee and measures it, so the numbers in RESULTS.md come from
exactly what CI checks. A test calls :func:`record`; nothing is written unless
``DATAHOARD_RESULTS_DIR`` is set, which ``make reliability`` does (see bench/reliability.py).
"""

from __future__ import annotations

import json
import os
import platform
import time
from pathlib import Path


def record(name: str, figures: dict) -> Path | None:
    folder = os.environ.get("DATAHOARD_RESULTS_DIR")
    if not folder:
        return None
    path = Path(folder) / f"{name}.json"
    path.parent.mkdir(parents=True, exist_ok=True)
    document = {
        "name": name,
        "measured_at": time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime()),
        "machine": {"cpus": os.cpu_count(), "kernel": platform.release()},
        **figures,
    }
    path.write_text(json.dumps(document, indent=2) + "\n")
    return path
