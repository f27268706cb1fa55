"""The one mountinfo parser and the bind/detach every component uses (``datahoard.mounts``)."""

from __future__ import annotations

import os
import string
from pathlib import Path

import pytest
from hypothesis import given
from hypothesis import strategies as st

from datahoard import mounts
from datahoard.mounts import MS_NOEXEC, MS_NODEV, MS_NOSUID, MS_RDONLY, flags_for, parse_mountinfo, top_mounts


def _kernel_escape(path: str) -> str:
    """What the kernel writes for a path in mountinfo (fs/proc_namespace.c: " \\t\\n\\\\")."""
    return "".join(f"\\{ord(c):03o}" if c in " \t\n\\" else c for c in path)


def test_mountinfo_parsing_unescapes_paths_and_keeps_propagation():
    text = (
        "27 1 254:0 / / rw,relatime shared:1 - ext4 /dev/vda rw\n"
        "43 27 0:40 / /var/lib/kubelet/pods/x/my\\040vol ro,nosuid,nodev shared:2 master:7 - fuse.dh dh ro,allow_other\n"
    )
    root, vol = parse_mountinfo(text)
    assert root.mountpoint == "/" and root.optional == ("shared:1",)
    assert vol.mountpoint == "/var/lib/kubelet/pods/x/my vol"
    assert vol.fstype == "fuse.dh" and vol.readonly and vol.optional == ("shared:2", "master:7")
    assert vol.anonymous_minor == 40 and root.anonymous_minor is None


@given(st.text(alphabet=string.ascii_letters + " \t\n\\01234567", min_size=1, max_size=40))
def test_every_escaped_path_comes_back_as_it_was(name):
    """Root, mountpoint and source all round-trip, whatever mix of escapes and digits they hold
    (a backslash followed by digits is written as \\134 then the digits)."""
    path = "/cache/" + name
    line = f"61 27 0:52 {_kernel_escape(path)} {_kernel_escape(path + '/m')} rw - fuse.datahoard {_kernel_escape(name)} rw"
    (entry,) = parse_mountinfo(line)
    assert (entry.root, entry.mountpoint, entry.source) == (path, path + "/m", name)


def test_lines_without_the_separator_are_skipped():
    assert parse_mountinfo("garbage\n\n27 1 254:0 / / rw - ext4 /dev/vda rw\n")[0].mount_id == 27


def test_bind_flags_are_always_read_only_nosuid_nodev():
    assert flags_for([]) == MS_RDONLY | MS_NOSUID | MS_NODEV
    assert flags_for(["noexec"]) & MS_NOEXEC


def test_top_mounts_are_the_uncovered_layers():
    text = (
        "27 1 254:0 / / rw - ext4 /dev/vda rw\n"
        "50 27 0:40 / /pods/a/mount ro shared:2 - fuse.datahoard dh ro\n"  # dead layer
        "51 50 0:41 / /pods/a/mount ro shared:3 - fuse.datahoard dh ro\n"  # repair on top of it
        "52 27 0:41 /train /pods/a/sub ro - fuse.datahoard dh ro\n"
    )
    assert [m.mount_id for m in top_mounts(parse_mountinfo(text))] == [27, 51, 52]


def test_canonical_does_not_touch_the_last_component(tmp_path: Path):
    (tmp_path / "real").mkdir()
    (tmp_path / "link").symlink_to(tmp_path / "real")
    assert mounts.canonical(tmp_path / "link" / "x" / ".." / "gone") == str((tmp_path / "real" / "gone").resolve())


@pytest.mark.integration
@pytest.mark.skipif(os.geteuid() != 0, reason="bind mounts need root")
def test_bind_is_read_only_and_detach_takes_it_off(tmp_path: Path):
    source, target = tmp_path / "source", tmp_path / "tar get"  # a space: an escape in mountinfo
    source.mkdir()
    target.mkdir()
    (source / "f").write_text("x")
    mounts.bind_readonly(source, target, [])
    try:
        (entry,) = mounts.mounts_at(target)
        assert entry.readonly and entry.mountpoint == str(target)
        assert (target / "f").read_text() == "x"
        with pytest.raises(OSError):
            (target / "g").write_text("no")
        mounts.bind_readonly(source, target, ["noexec"])
        assert len(mounts.mounts_at(target)) == 2
        mounts.detach(target)
        assert len(mounts.mounts_at(target)) == 1
    finally:
        assert mounts.unmount_all(target) <= 2
    assert mounts.mounts_at(target) == []
    with pytest.raises(OSError, match="unmount"):
        mounts.detach(target)
