"""The OpenAPI (Swagger 2.0) documents of Corral's REST surface, from the protos' HTTP rules.

    python openapi/generate.py          # (re)write openapi/corral/<context>/v1/*.swagger.json
    python openapi/generate.py --check  # exit 1 if a committed document is stale

The generator is grpc-gateway's protoc-gen-swagger, from Debian's golang-grpc-gateway package
(``apt-get install golang-grpc-gateway``; no newer generator is packaged for Debian 12 or on
PyPI). This script plays protoc's part: it compiles protos/ with grpcio-tools' protoc (the
pinned one the Python code is generated with) and hands the plugin its request directly, which
also lets the plugin read proto3 ``optional`` fields (it predates them; they are plain fields to
it). One document per public service (the runtime is internal, not routed by the edge).

The generator knows grpc-gateway's conventions, not Envoy's, so the documents are completed
here with what the edge does (``EDGE_NOTES``): bearer tokens and the public methods, every error
as a ``google.rpc.Status`` JSON body, server streams as newline-delimited JSON messages.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Any

from google.protobuf import descriptor_pb2
from google.protobuf.compiler import plugin_pb2

ROOT = Path(__file__).resolve().parents[1]
PROTOS = ROOT / "protos"
OUT = ROOT / "openapi"
CONTEXTS = ("identity", "session", "task", "storage")
PLUGIN = "protoc-gen-swagger"
# Public methods: no token needed (the edge's jwt_authn rules, deploy/envoy/envoy.yaml.template).
PUBLIC = {"Login", "RefreshToken", "Logout", "ExchangeApiKey", "GetJwks"}
STATUS = {
    "type": "object",
    "description": "google.rpc.Status: every error, from a service or from the edge. details"
    " always holds a google.rpc.ErrorInfo (reason, domain corral.dev); also BadRequest for"
    " INVALID_ARGUMENT, QuotaFailure and RetryInfo for RESOURCE_EXHAUSTED.",
    "properties": {
        "code": {"type": "integer", "format": "int32", "description": "google.rpc.Code"},
        "message": {"type": "string"},
        "details": {"type": "array", "items": {"$ref": "#/definitions/protobufAny"}},
    },
}
ANY = {
    "type": "object",
    "properties": {"@type": {"type": "string"}},
    "additionalProperties": {},
    "description": "A message of the type its @type names, its fields alongside.",
}


def plugin() -> str | None:
    return shutil.which(PLUGIN)


def missing_plugin(check: bool) -> int:
    """Without the generator, a check is skipped locally (as tests are without their servers)
    and fails under CI=true; regenerating always fails."""
    message = f"{PLUGIN} not found: apt-get install golang-grpc-gateway"
    in_ci = os.environ.get("CI", "").lower() in {"1", "true", "yes"}
    if check and not in_ci:
        print(f"{message}; the OpenAPI freshness check is skipped", file=sys.stderr)
        return 0
    print(message, file=sys.stderr)
    return 1


def descriptor_set() -> descriptor_pb2.FileDescriptorSet:
    from grpc_tools import protoc  # type: ignore[import-untyped]

    well_known = Path(protoc.__file__).parent / "_proto"
    files = sorted(str(p.relative_to(PROTOS)) for p in (PROTOS / "corral").rglob("*.proto"))
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp) / "all.pb"
        status = protoc.main(
            [
                "protoc",
                f"-I{PROTOS}",
                f"-I{well_known}",
                "--include_imports",
                "--include_source_info",
                f"--descriptor_set_out={out}",
                *files,
            ]
        )
        if status != 0:
            sys.exit(f"protoc failed ({status})")
        return descriptor_pb2.FileDescriptorSet.FromString(out.read_bytes())


def generate(files: descriptor_pb2.FileDescriptorSet, context: str) -> dict[str, Any]:
    target = f"corral/{context}/v1/{context}_service.proto"
    request = plugin_pb2.CodeGeneratorRequest(
        file_to_generate=[target], parameter="json_names_for_fields=true"
    )
    request.proto_file.extend(files.file)  # dependencies first, as protoc orders them
    generator = plugin()
    assert generator is not None
    reply = subprocess.run(
        [generator], input=request.SerializeToString(), capture_output=True, check=False
    )
    if reply.returncode != 0:
        sys.exit(f"{PLUGIN} failed for {target}: {reply.stderr.decode()}")
    response = plugin_pb2.CodeGeneratorResponse.FromString(reply.stdout)
    if response.error:
        sys.exit(f"{PLUGIN}: {response.error}")
    (generated,) = response.file
    return complete(json.loads(generated.content), context)


def complete(document: dict[str, Any], context: str) -> dict[str, Any]:
    """Add what the edge does and the generator cannot know (see the module's docstring)."""
    document["info"] = {
        "title": f"Corral {context} API",
        "version": "v1",
        "description": f"REST/JSON surface of corral.{context}.v1, transcoded by the edge"
        " (Envoy) from the gRPC API. Field names are lowerCamelCase; fields at their default"
        " value are left out of responses; int64 values are strings. Generated by"
        " openapi/generate.py from protos/: do not edit.",
    }
    document["schemes"] = ["http", "https"]
    document["securityDefinitions"] = {
        "bearer": {
            "type": "apiKey",
            "name": "Authorization",
            "in": "header",
            "description": "'Bearer <access token>' from Login, RefreshToken or ExchangeApiKey",
        }
    }
    document["security"] = [{"bearer": []}]
    definitions = document.setdefault("definitions", {})
    definitions["googlerpcStatus"] = STATUS
    definitions["protobufAny"] = ANY
    for path in document.get("paths", {}).values():
        for operation in path.values():
            if operation["operationId"] in PUBLIC:
                operation["security"] = []
            responses = operation["responses"]
            responses["default"] = {
                "description": "An error: a google.rpc.Status (HTTP status from its code).",
                "schema": {"$ref": "#/definitions/googlerpcStatus"},
            }
            ok = responses.get("200", {})
            if "(streaming responses)" in ok.get("description", ""):
                ok["description"] = (
                    "A stream: one JSON object per line (application/json), each a message"
                    " of this schema, for as long as the stream lasts."
                )
                operation["x-corral-stream"] = "newline-delimited JSON"
    return document


def render(document: dict[str, Any]) -> str:
    return json.dumps(document, indent=2, sort_keys=True) + "\n"


def documents() -> dict[Path, str]:
    files = descriptor_set()
    return {
        OUT / "corral" / c / "v1" / f"{c}_service.swagger.json": render(generate(files, c))
        for c in CONTEXTS
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--check", action="store_true", help="exit 1 if a document is stale")
    args = parser.parse_args(argv)
    if plugin() is None:
        return missing_plugin(args.check)
    stale = []
    for path, text in documents().items():
        if args.check:
            if not path.exists() or path.read_text() != text:
                stale.append(path.relative_to(ROOT))
            continue
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(text)
        print(f"wrote {path.relative_to(ROOT)}")
    for path in stale:
        print(f"{path} is stale: run `make openapi` and commit it", file=sys.stderr)
    return 1 if stale else 0


if __name__ == "__main__":
    sys.exit(main())
