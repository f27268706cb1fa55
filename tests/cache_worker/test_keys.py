import posixpath

import pytest
from hypothesis import given
from hypothesis import strategies as st

from datahoard.cache_worker.keys import KeyFilter, KeyPath, key_to_path


@pytest.mark.parametrize(
    "key, expected",
    [
        ("a.jpg", KeyPath((), "a.jpg")),
        ("n01/img 1 é.JPEG", KeyPath(("n01",), "img 1 é.JPEG")),
        ("a/b/c/d/e/f.bin", KeyPath(("a", "b", "c", "d", "e"), "f.bin")),
        ("folder/", KeyPath(("folder",), None)),
        ("..", None),
        ("../evil", None),
        ("a/../../etc/passwd", None),
        ("a/./b", None),
        (".", None),
        ("a//b", None),
        ("/abs/path", None),
        ("nul\x00byte", None),
        ("", None),
        ("x" * 256, None),
        ("ok/" + "x" * 255, KeyPath(("ok",), "x" * 255)),
        ("...", KeyPath((), "...")),
        ("line\nbreak", KeyPath((), "line\nbreak")),
    ],
)
def test_key_to_path(key, expected):
    assert key_to_path(key) == expected


@given(st.text(min_size=1, max_size=60))
def test_accepted_keys_never_escape_the_root(key):
    path = key_to_path(key)
    if path is None:
        return
    parts = [*path.parents, *([path.leaf] if path.leaf is not None else [])]
    joined = "/".join(parts)
    # Normalising changes nothing and stays below the root: the path means exactly the key.
    assert posixpath.normpath("/root/" + joined) == "/root/" + joined
    assert all(p and p not in (".", "..") and "/" not in p and "\x00" not in p for p in parts)
    assert joined == key.rstrip("/") if path.leaf is None else joined == key


@pytest.mark.parametrize(
    "include, exclude, path, selected",
    [
        ((), (), "a/b.jpg", True),
        (("**/*.JPEG",), (), "n01/x.JPEG", True),
        (("**/*.JPEG",), (), "x.JPEG", True),
        (("**/*.JPEG",), (), "n01/x.jpeg", False),
        (("*.txt",), (), "a/b.txt", False),
        (("train/**",), (), "train/a/b", True),
        ((), ("**/_tmp/**",), "a/_tmp/b", False),
        ((), ("*.tmp",), "x.tmp", False),
        (("img?.png",), (), "img1.png", True),
        (("img[0-3].png",), (), "img4.png", False),
    ],
)
def test_key_filter(include, exclude, path, selected):
    assert KeyFilter(include, exclude)(path) is selected
