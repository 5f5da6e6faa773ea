"""Build Corral's Go client from the protos with Debian's Go toolchain, offline.

    python clients/go/build.py OUT            # compile cmd/corral-example to OUT
    python clients/go/build.py OUT --keep DIR # and leave the GOPATH tree (generated code) in DIR

Debian packages (what `.ci/run` installs): golang-go, protoc-gen-go, protoc-gen-go-grpc,
golang-google-grpc-dev, golang-google-protobuf-dev, golang-google-genproto-dev and
golang-github-golang-protobuf-1-5-dev (it replaces the 1.3 package, whose codec panics on
today's generated messages: "protobuf tag not enough fields"). The stubs are
generated with the pinned protoc of grpcio-tools (as the Python code is) and Debian's
protoc-gen-go / protoc-gen-go-grpc plugins, under the import path corral.dev/client/gen/...
(the protos name no go_package: the mapping is given here). Debian ships Go's libraries as
source under /usr/share/gocode, so the build runs in GOPATH mode (GO111MODULE=off) with that
tree on GOPATH: nothing is downloaded. google/api's annotations are generated here too (the
packaged genproto predates field_info.proto); google/rpc comes from the packaged genproto,
which gRPC itself links.
"""

from __future__ import annotations

import argparse
import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

HERE = Path(__file__).resolve().parent
ROOT = HERE.parents[1]
PROTOS = ROOT / "protos"
MODULE = "corral.dev/client"
DEBIAN_GOPATH = Path("/usr/share/gocode")
# The public API's packages (the runtime is internal) and the googleapis files they import.
CONTEXTS = ("common", "identity", "session", "task", "storage")
GOOGLE_API = sorted(p.name for p in (PROTOS / "google" / "api").glob("*.proto"))
GOOGLE_RPC = {
    "google/rpc/status.proto": "google.golang.org/genproto/googleapis/rpc/status;status",
    "google/rpc/code.proto": "google.golang.org/genproto/googleapis/rpc/code;code",
}


def tool(name: str, package: str) -> str:
    found = shutil.which(name)
    if found is None:
        sys.exit(f"{name} not found: apt-get install {package}")
    return found


def mappings() -> dict[str, str]:
    """proto file -> Go import path;package for every file the generated code imports."""
    mapping = dict(GOOGLE_RPC)
    for name in GOOGLE_API:
        mapping[f"google/api/{name}"] = f"{MODULE}/gen/google/api/annotations;annotations"
    for context in CONTEXTS:
        for proto in sorted((PROTOS / "corral" / context / "v1").glob("*.proto")):
            relative = proto.relative_to(PROTOS).as_posix()
            mapping[relative] = f"{MODULE}/gen/corral/{context}/v1;{context}v1"
    return mapping


def generate(out: Path) -> None:
    from grpc_tools import protoc  # type: ignore[import-untyped]

    go = tool("protoc-gen-go", "protoc-gen-go")
    go_grpc = tool("protoc-gen-go-grpc", "protoc-gen-go-grpc")
    mapping = mappings()
    options = [f"M{proto}={target}" for proto, target in mapping.items()]
    well_known = Path(protoc.__file__).parent / "_proto"
    files = [p for p in mapping if p not in GOOGLE_RPC]
    out.mkdir(parents=True, exist_ok=True)
    status = protoc.main(
        [
            "protoc",
            f"-I{PROTOS}",
            f"-I{well_known}",
            f"--plugin=protoc-gen-go={go}",
            f"--plugin=protoc-gen-go-grpc={go_grpc}",
            f"--go_out={out}",
            f"--go-grpc_out={out}",
            *(f"--go_opt={o}" for o in options),
            *(f"--go-grpc_opt={o}" for o in options),
            *files,
        ]
    )
    if status != 0:
        sys.exit(f"protoc failed ({status})")


def build(binary: Path, gopath: Path) -> None:
    source = gopath / "src" / MODULE
    if source.exists():
        shutil.rmtree(source)
    source.mkdir(parents=True)
    for part in ("corral", "cmd"):
        shutil.copytree(HERE / part, source / part)
    # protoc writes each file under its import path, from the output root.
    generate(gopath / "src")
    go = tool("go", "golang-go")
    env = {
        **os.environ,
        "GO111MODULE": "off",
        "GOPATH": f"{gopath}{os.pathsep}{DEBIAN_GOPATH}",
        "GOPROXY": "off",
        "GOFLAGS": "",
        "CGO_ENABLED": "0",
    }
    subprocess.run(
        [go, "build", "-o", str(binary.resolve()), f"{MODULE}/cmd/corral-example"],
        env=env,
        check=True,
        cwd=source,
    )


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("binary", type=Path, help="where to write the corral-example binary")
    parser.add_argument("--keep", type=Path, help="build in this GOPATH directory and keep it")
    args = parser.parse_args(argv)
    args.binary.parent.mkdir(parents=True, exist_ok=True)
    if args.keep is not None:
        build(args.binary, args.keep.resolve())
    else:
        with tempfile.TemporaryDirectory() as gopath:
            build(args.binary, Path(gopath))
    print(args.binary)
    return 0


if __name__ == "__main__":
    sys.exit(main())
