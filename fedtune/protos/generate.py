"""Regenerates the committed Python stubs from protos/fedtune/v1/*.proto.

Run from the repository root: ``python -m fedtune.protos.generate``. protoc writes absolute imports
(``import fedtune_pb2``) that only work with the output dir on sys.path; they are rewritten to
relative imports so the stubs live inside the ``fedtune.protos`` package.
"""

from __future__ import annotations

import re
import sys
import tempfile
from pathlib import Path

PROTO_DIR = Path(__file__).resolve().parents[2] / "protos" / "fedtune" / "v1"
OUT_DIR = Path(__file__).resolve().parent


def generate(out_dir: Path, proto_dir: Path = PROTO_DIR) -> list[Path]:
    """Runs protoc (from grpcio-tools) on every .proto in ``proto_dir`` into ``out_dir``.

    Returns:
        The written files.
    """
    import grpc_tools
    from grpc_tools import protoc  # test/dev dependency only

    protos = sorted(proto_dir.glob("*.proto"))
    include = Path(grpc_tools.__file__).parent / "_proto"
    with tempfile.TemporaryDirectory() as tmp:
        args = [
            "protoc",
            f"-I{proto_dir}",
            f"-I{include}",
            f"--python_out={tmp}",
            f"--pyi_out={tmp}",
            f"--grpc_python_out={tmp}",
            *[str(p) for p in protos],
        ]
        if protoc.main(args) != 0:
            raise RuntimeError(f"protoc failed on {protos}")
        written = []
        for produced in sorted(Path(tmp).iterdir()):
            text = produced.read_text()
            text = re.sub(r"^import (\w+_pb2) as", r"from . import \1 as", text, flags=re.MULTILINE)
            target = out_dir / produced.name
            target.write_text(text)
            written.append(target)
    return written


if __name__ == "__main__":
    for path in generate(OUT_DIR):
        print(path, file=sys.stderr)
