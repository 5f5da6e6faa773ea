"""The corral command.

Running the platform: dev, serve, migrate, health. Using it: sessions (ls, show, archive, rm),
events tail, approvals (ls, answer), chat, workspaces ls, files (ls, put, get, rm), reports (ls,
show, get, create). Operating it: admin (works on identity's database directly). completion prints
a shell completion script. Every command that prints takes --json (one JSON document, or one
JSON line per event for streams); colour only on a terminal, never with NO_COLOR set or
--no-color.
"""

from __future__ import annotations

import argparse
import asyncio
from collections.abc import Sequence

import argcomplete
from argcomplete.shell_integration import shellcode

from corral.libs.config import SERVICE_NAMES, Settings
from corral.services.cli import api, storage
from corral.services.cli.output import Output


def _common(top: bool) -> argparse.ArgumentParser:
    """Options every command that prints takes, before or after its name. A subcommand's copy
    has no defaults, so it never undoes what was given before the subcommand (separate
    instances: argparse shares an option's object between a parent and its children)."""
    common = argparse.ArgumentParser(add_help=False)
    unset = argparse.SUPPRESS
    common.add_argument(
        "--json", action="store_true", default=False if top else unset, help="print JSON"
    )
    common.add_argument(
        "--no-color", action="store_true", default=False if top else unset, help="no colour"
    )
    common.add_argument(
        "--target",
        default=None if top else unset,
        metavar="HOST:PORT",
        help="reach every service at this address, e.g. the edge 127.0.0.1:8080"
        " (default: CORRAL_TARGET, else each service's CORRAL_<SERVICE>_TARGET)",
    )
    return common


def parser() -> argparse.ArgumentParser:
    common = _common(top=False)
    top = argparse.ArgumentParser(
        prog="corral",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
        parents=[_common(top=True)],
    )
    commands = top.add_subparsers(dest="area", required=True, metavar="COMMAND")

    commands.add_parser("dev", help="run every service in one process on SQLite (development)")
    serve = commands.add_parser("serve", help="run one or more services (production: one each)")
    serve.add_argument("services", nargs="+", choices=SERVICE_NAMES)
    migrate = commands.add_parser("migrate", help="upgrade the services' databases (default: all)")
    migrate.add_argument("services", nargs="*", help=f"of {', '.join(SERVICE_NAMES)}")
    health = commands.add_parser(
        "health", parents=[common], help="grpc.health.v1 of running services"
    )
    health.add_argument("services", nargs="*", help=f"of {', '.join(SERVICE_NAMES)}")

    api.register(commands, common)
    storage.register(commands, common)

    from corral.services.identity.admin import parser as admin_parser

    json_only = argparse.ArgumentParser(add_help=False)
    json_only.add_argument("--json", action="store_true", default=argparse.SUPPRESS)
    commands.add_parser(
        "admin",
        parents=[admin_parser(), json_only],
        add_help=False,
        help="operator commands on identity's database (organisations, users, keys)",
        description="Operator commands that work directly on identity's database; settings"
        " from CORRAL_* as for `corral serve identity`. Secrets are printed once.",
    )
    completion = commands.add_parser(
        "completion", help='print a shell completion script: eval "$(corral completion bash)"'
    )
    completion.add_argument("shell", choices=["bash", "zsh", "fish"])
    return top


def main(argv: Sequence[str] | None = None) -> int:
    top = parser()
    argcomplete.autocomplete(top)
    args = top.parse_args(argv)
    out = Output(json_mode=args.json, no_color=args.no_color)
    settings = Settings()
    if args.area == "completion":
        out.write(shellcode(["corral"], shell=args.shell))
        return 0
    if args.area == "admin":
        from corral.services.identity.admin import run_parsed

        return asyncio.run(run_parsed(args, settings, json_output=args.json))
    if hasattr(args, "handler"):
        return asyncio.run(api.run(args.handler, args, settings, out))
    return _platform(args, settings, out)


def _platform(args: argparse.Namespace, settings: Settings, out: Output) -> int:
    from corral.libs.observability import configure_logging, configure_tracing
    from corral.services.cli import platform

    if args.area == "dev":
        settings = settings.model_copy(update={"env": "development"})
    configure_logging(settings.log_level, settings.log_format)
    if args.area == "dev":
        configure_tracing("corral-dev", settings.otel_exporter_otlp_endpoint)
        asyncio.run(platform.serve(settings, list(SERVICE_NAMES), banner=True))
    elif args.area == "serve":
        configure_tracing(f"corral-{'-'.join(args.services)}", settings.otel_exporter_otlp_endpoint)
        asyncio.run(platform.serve(settings, platform.services(args.services), banner=False))
    elif args.area == "migrate":
        asyncio.run(platform.migrate(settings, platform.services(args.services)))
    elif args.area == "health":
        names = platform.services(args.services)
        status = asyncio.run(platform.check_health({n: settings.target_for(n) for n in names}))
        if out.json:
            out.document(status)
        else:
            for name, value in status.items():
                colour = "green" if value == "SERVING" else "red"
                out.line(f"{name}: {out.style(value, colour)}")
        return 0 if all(v == "SERVING" for v in status.values()) else 1
    return 0
