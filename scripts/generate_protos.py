"""Regenerate the committed gRPC code under tierwriter/ from protos/ (run from anywhere)."""

from __future__ import annotations

import sys
from pathlib import Path

from grpc_tools import protoc

ROOT = Path(__file__).resolve().parent.parent
PROTO_ROOT = ROOT / "protos"


def proto_files() -> list[Path]:
    """Every .proto under protos/, sorted so the output never depends on directory order."""
    return sorted(PROTO_ROOT.rglob("*.proto"))


def generate(out_dir: Path) -> None:
    """Write *_pb2.py, *_pb2_grpc.py and *.pyi for every proto into out_dir (package tree)."""
    out_dir.mkdir(parents=True, exist_ok=True)
    include = Path(protoc.__file__).parent / "_proto"  # well-known types bundled with grpcio-tools
    # The .pyi plugin (mypy-protobuf) beside this interpreter: `.venv/bin/pytest` run without
    # activating the venv has no .venv/bin on PATH, where protoc looks by default.
    beside = Path(sys.executable).parent / "protoc-gen-mypy"
    plugin = [f"--plugin=protoc-gen-mypy={beside}"] if beside.exists() else []
    args = [
        "grpc_tools.protoc",
        *plugin,
        f"-I{PROTO_ROOT}",
        f"-I{include}",
        f"--python_out={out_dir}",
        f"--grpc_python_out={out_dir}",
        f"--mypy_out={out_dir}",
        *(str(p.relative_to(PROTO_ROOT)) for p in proto_files()),
    ]
    if protoc.main(args) != 0:
        raise SystemExit("protoc failed; see the messages above")
    # Every folder on the way down must be a package so `tierwriter.generator.v1` imports.
    for proto in proto_files():
        folder = out_dir / proto.relative_to(PROTO_ROOT).parent
        while folder != out_dir:
            (folder / "__init__.py").touch()
            folder = folder.parent


if __name__ == "__main__":
    generate(Path(sys.argv[1]) if len(sys.argv) > 1 else ROOT)
    print("regenerated gRPC code from", PROTO_ROOT)
