"""Regenerate (or check) the Python gRPC stubs for ``csi.proto``.

The stubs are committed so that the node plugin's image needs no compiler at runtime, and this
script is the one way to make them: ``python -m datahoard.csi_node.genproto`` rewrites them,
``--check`` fails when the committed files differ from what the installed grpcio-tools would
produce (a unit test runs the check, so an edited ``.proto`` cannot ship with stale stubs).

Generated code pins its runtime (grpcio, protobuf): pyproject.toml pins grpcio-tools to the same
grpcio release, so bump all three together and rerun this script.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
from importlib import resources
from pathlib import Path

PACKAGE_DIR = Path(__file__).resolve().parent
PROTO = "csi.proto"
OUTPUTS = ("csi_pb2.py", "csi_pb2_grpc.py", "csi_pb2.pyi")

# protoc writes a top-level import for the sibling module; the stubs live inside a package.
_ABSOLUTE_IMPORT = "import csi_pb2 as csi__pb2"
_RELATIVE_IMPORT = "from . import csi_pb2 as csi__pb2"


def generate(out_dir: Path) -> None:
    """Run protoc on ``csi.proto`` into *out_dir* and make the stubs package-relative."""
    from grpc_tools import protoc  # build-time tool only; not imported by the plugin

    well_known = resources.files("grpc_tools") / "_proto"
    args = [
        "grpc_tools.protoc",
        f"-I{PACKAGE_DIR}",
        f"-I{well_known}",
        f"--python_out={out_dir}",
        f"--grpc_python_out={out_dir}",
        f"--pyi_out={out_dir}",
        str(PACKAGE_DIR / PROTO),
    ]
    if protoc.main(args) != 0:
        raise RuntimeError(f"protoc failed on {PACKAGE_DIR / PROTO}")
    grpc_file = out_dir / "csi_pb2_grpc.py"
    text = grpc_file.read_text()
    if _ABSOLUTE_IMPORT not in text:
        raise RuntimeError(f"unexpected protoc output: no {_ABSOLUTE_IMPORT!r} in {grpc_file}")
    grpc_file.write_text(text.replace(_ABSOLUTE_IMPORT, _RELATIVE_IMPORT))


def stale_outputs() -> list[str]:
    """Names of committed stub files that differ from a fresh generation (empty: current)."""
    with tempfile.TemporaryDirectory() as tmp:
        fresh = Path(tmp)
        generate(fresh)
        return [
            name
            for name in OUTPUTS
            if not (PACKAGE_DIR / name).exists()
            or (PACKAGE_DIR / name).read_bytes() != (fresh / name).read_bytes()
        ]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--check", action="store_true", help="only report stale stubs")
    args = parser.parse_args(argv)
    if args.check:
        stale = stale_outputs()
        if stale:
            print(f"stale CSI stubs: {', '.join(stale)}; run python -m datahoard.csi_node.genproto")
            return 1
        print("CSI stubs are current")
        return 0
    generate(PACKAGE_DIR)
    print(f"wrote {', '.join(OUTPUTS)} in {PACKAGE_DIR}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
