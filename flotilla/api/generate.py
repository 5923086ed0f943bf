"""``make generate``: the Python modules of every proto under ``protos/``.

protoc's output as it is, but for the KServe v2 module: it declares names in
package ``inference`` that tritonclient's generated modules declare too, and
two files defining one name in protobuf's default descriptor pool cannot both
be imported (duplicate symbol). Its generated module adds its file to a
descriptor pool of its own instead, so the router's KServe front door and a
tritonclient client share a process (the tests do). ``tests/test_generated_code.py``
runs this same function, so the committed modules are what it writes.
"""

from __future__ import annotations

import argparse
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
PROTOS = REPO / "protos"
OWN_POOL = ("flotilla/api/kserve/grpc_service_pb2.py",)
"""Generated modules whose file goes into a descriptor pool of its own."""
_DEFAULT_POOL = "_descriptor_pool.Default().AddSerializedFile("
_OWN_POOL = "_descriptor_pool.DescriptorPool().AddSerializedFile("


def generate(out: Path, protos: Path = PROTOS) -> list[Path]:
    """Write the modules of every proto under ``protos`` into ``out``; the files written."""
    sources = sorted(protos.rglob("*.proto"))
    if not sources:
        raise SystemExit(f"no .proto files under {protos}")
    subprocess.run(
        [sys.executable, "-m", "grpc_tools.protoc", "-I", str(protos),
         f"--python_out={out}", f"--pyi_out={out}", f"--grpc_python_out={out}", *map(str, sources)],
        check=True,
    )
    for relative in OWN_POOL:
        module = out / relative
        text = module.read_text()
        if text.count(_DEFAULT_POOL) != 1:
            raise SystemExit(f"{module}: expected one {_DEFAULT_POOL!r} in protoc's output")
        module.write_text(text.replace(_DEFAULT_POOL, _OWN_POOL))
    return [out / s.relative_to(protos).with_suffix("") for s in sources]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=REPO)
    generate(parser.parse_args().out)


if __name__ == "__main__":
    main()
