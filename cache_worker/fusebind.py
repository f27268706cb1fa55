"""The one place that imports the FUSE binding.

mfusepy (maintained, libfuse 2 and 3) over fusepy (unmaintained since 2018). It is told to load
libfuse3 before import: libfuse3 gives ``max_read`` above 128 KiB and the per-open
``keep_cache`` flag this worker relies on, and Debian's ``fuse3`` package ships it.
"""

from __future__ import annotations

import os

os.environ.setdefault("FUSE_LIBRARY_NAME", "fuse3")

import mfusepy  # noqa: E402

FUSE = mfusepy.FUSE
FuseOSError = mfusepy.FuseOSError
Operations = mfusepy.Operations
fuse_version = (mfusepy.fuse_version_major, mfusepy.fuse_version_minor)
