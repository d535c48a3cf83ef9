"""Regenerate the Python gRPC stubs under longmem/v1/ from protos/longmem/v1/*.proto.

Usage: python scripts/gen_protos.py [--out DIR]

The stubs are generated from the protos root, so they import each other absolutely
(``from longmem.v1 import tensor_pb2``). With --out they are written under DIR/longmem/v1/
instead of the repository, which is how the drift test compares them with the committed ones.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from grpc_tools import protoc

REPO_ROOT = Path(__file__).resolve().parent.parent
PROTO_ROOT = REPO_ROOT / "protos"
PROTO_PACKAGE = Path("longmem") / "v1"
INIT_TEXT = '"""Generated stubs for the longmem.v1 API; regenerate with scripts/gen_protos.py."""\n'


def proto_files() -> list[Path]:
    """The .proto files to compile."""
    return sorted((PROTO_ROOT / PROTO_PACKAGE).glob("*.proto"))


def generate(out_dir: Path = REPO_ROOT) -> list[Path]:
    """Compile every proto into out_dir and return the paths of the generated files."""
    package_dir = out_dir / PROTO_PACKAGE
    package_dir.mkdir(parents=True, exist_ok=True)
    args = [
        "grpc_tools.protoc",
        f"-I{PROTO_ROOT}",
        f"-I{Path(protoc.__file__).parent / '_proto'}",
        f"--python_out={out_dir}",
        f"--pyi_out={out_dir}",
        f"--grpc_python_out={out_dir}",
        *(str(p) for p in proto_files()),
    ]
    if protoc.main(args) != 0:
        raise RuntimeError(f"protoc failed: {' '.join(args)}")
    (package_dir / "__init__.py").write_text(INIT_TEXT)
    return sorted(p for p in package_dir.iterdir() if p.suffix in {".py", ".pyi"})


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--out",
        type=Path,
        default=REPO_ROOT,
        help="root to write longmem/v1/ under (default: the repository root)",
    )
    args = parser.parse_args(argv)
    generate(args.out.resolve())
    return 0


if __name__ == "__main__":
    sys.exit(main())
