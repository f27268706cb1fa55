"""Regenerate (or check) the Python gRPC stubs for the plugin's ``.proto`` files.

Two protos, both served by the node plugin: ``csi.proto`` (the CSI Identity and Node services)
and ``pluginregistration.proto`` (the kubelet's plugin-registration service, served only when
the plugin registers itself instead of through node-driver-registrar).

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
PROTOS = ("csi.proto", "pluginregistration.proto")


def outputs(proto: str) -> tuple[str, str, str]:
    """The three files protoc writes for *proto*: messages, services, type stubs."""
    stem = proto.removesuffix(".proto")
    return (f"{stem}_pb2.py", f"{stem}_pb2_grpc.py", f"{stem}_pb2.pyi")


OUTPUTS = tuple(name for proto in PROTOS for name in outputs(proto))


def _make_relative(grpc_file: Path, stem: str) -> None:
    """protoc writes a top-level import for the sibling module; the stubs live inside a package."""
    absolute = f"import {stem}_pb2 as {stem.replace('_', '__')}__pb2"
    relative = f"from . {absolute}"
    text = grpc_file.read_text()
    if absolute not in text:
        raise RuntimeError(f"unexpected protoc output: no {absolute!r} in {grpc_file}")
    grpc_file.write_text(text.replace(absolute, relative))


def generate(out_dir: Path) -> None:
    """Run protoc on every proto into *out_dir* and make the stubs package-relative."""
    from grpc_tools import protoc  # build-time tool only; not imported by the plugin

    well_known = resources.files("grpc_tools") / "_proto"
    for proto in PROTOS:
        args = [
            "grpc_tools.protoc",
            f"-I{PACKAGE_DIR}",
            f"-I{well_known}",
            f"--python_out={out_dir}",
            f"--grpc_python_out={out_dir}",
            f"--pyi_out={out_dir}",
            str(PACKAGE_DIR / proto),
        ]
        if protoc.main(args) != 0:
            raise RuntimeError(f"protoc failed on {PACKAGE_DIR / proto}")
        _make_relative(out_dir / outputs(proto)[1], proto.removesuffix(".proto"))


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
            print(f"stale gRPC stubs: {', '.join(stale)}; run python -m datahoard.csi_node.genproto")
            return 1
        print("gRPC stubs are current")
        return 0
    generate(PACKAGE_DIR)
    print(f"wrote {', '.join(OUTPUTS)} in {PACKAGE_DIR}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
