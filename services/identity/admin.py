"""``corral admin ...``: operator commands that work directly on identity's database.

Settings come from the environment (``CORRAL_*``), as for ``corral serve identity``. Secrets
(generated passwords, API keys) are printed once, on stdout, and never stored in the clear.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import secrets
import sys
import time
from collections.abc import Callable, Sequence
from contextlib import AsyncExitStack
from datetime import UTC, datetime

from corral.libs.app import Infrastructure
from corral.libs.config import Settings
from corral.libs.crypto import KeyRing, KeyRingError
from corral.libs.errors import CorralError
from corral.services.identity.base import SYSTEM_CONTEXT
from corral.services.identity.config import identity_settings
from corral.services.identity.domain import SERVICE_ACCOUNT, SIGNING_KEY, Role
from corral.services.identity.main import build_service, open_database
from corral.services.identity.service import IdentityService


def parser() -> argparse.ArgumentParser:
    """The ``corral admin`` command line (the ``corral`` CLI mounts it as a subcommand)."""
    parser = argparse.ArgumentParser(prog="corral admin", description=__doc__)
    commands = parser.add_subparsers(dest="command", required=True)
    org = commands.add_parser("create-org", help="create an organization")
    org.add_argument("organization_id", help="3-63 characters of [a-z0-9-]")
    org.add_argument("--display-name", default="")
    user = commands.add_parser("create-user", help="create a user (password printed if generated)")
    user.add_argument("--org", required=True, help="organization id, e.g. acme")
    user.add_argument("--email", required=True)
    user.add_argument("--role", choices=[r.value for r in Role], default=Role.USER.value)
    user.add_argument("--display-name", default="")
    user.add_argument("--password", default="", help="default: generate one and print it once")
    user.add_argument("--superuser", action="store_true", help="a platform operator")
    account = commands.add_parser("create-service-account", help="create a service account")
    account.add_argument("--org", required=True)
    account.add_argument("--display-name", required=True)
    account.add_argument("--role", choices=[r.value for r in Role], default=Role.USER.value)
    account.add_argument("--description", default="")
    account.add_argument(
        "--internal",
        action="store_true",
        help="a Corral service's own account (may reserve usage and write audit events)",
    )
    key = commands.add_parser("create-api-key", help="create an API key (printed once)")
    key.add_argument("service_account", help="organizations/{org}/serviceAccounts/{id}")
    key.add_argument("--display-name", default="")
    key.add_argument("--expires-in-days", type=float, default=None)
    commands.add_parser(
        "new-encryption-key",
        help="print a new id:key entry for CORRAL_ENCRYPTION_KEYS (first in the list: primary)",
    )
    rotate = commands.add_parser("rotate-keys", help="rotate the token signing keys")
    rotate.add_argument(
        "--revoke-previous",
        action="store_true",
        help="drop the previous key at once (after a compromise): every token it signed dies",
    )
    return parser


def new_encryption_key(clock: Callable[[], float] = time.time) -> str:
    """``id:base64key``: a fresh 256-bit key with an id naming the day it was made (plus a
    random suffix, so two made the same day differ)."""
    day = datetime.fromtimestamp(clock(), UTC).strftime("%Y%m%d")
    return f"k{day}-{secrets.token_hex(3)}:{KeyRing.generate_key()}"


# What a command made, as (label, value) pairs: printed as lines, or as JSON by ``corral admin
# --json``. Names and keys print alone, the rest as "label: value"; "(shown once)" follows secrets.
Result = list[tuple[str, str]]
SECRETS = {"password", "api_key"}


async def _run(settings: Settings, args: argparse.Namespace) -> Result:
    if args.command == "new-encryption-key":  # needs no database, no key ring
        return [("encryption_key", new_encryption_key())]
    config = identity_settings(settings)
    async with AsyncExitStack() as resources:
        engine = await open_database(config, None, resources)
        infra = Infrastructure(config, "identity", resources)
        # Revocations (rotate-keys --revoke-previous) reach the services through Redis; a
        # process-local feed would reach nobody.
        revocations = infra.revocation_store() if config.redis_url else None
        identity = build_service(config, engine, revocations=revocations)
        await identity.keys.ensure_signing_keys()
        return await _command(identity, args)


async def _command(identity: IdentityService, args: argparse.Namespace) -> Result:
    ctx = SYSTEM_CONTEXT
    if args.command == "create-org":
        org, _ = await identity.accounts.create_organization(
            ctx, args.organization_id, args.display_name or args.organization_id, None, "", ""
        )
        return [("name", org.name)]
    if args.command == "create-user":
        password = args.password or secrets.token_urlsafe(18)
        user = await identity.accounts.create_user(
            ctx,
            args.org,
            args.email,
            args.display_name,
            Role(args.role),
            password,
            "",
            superuser=args.superuser,
        )
        return [("name", user.name), *([] if args.password else [("password", password)])]
    if args.command == "create-service-account":
        account = await identity.service_accounts.create_service_account(
            ctx,
            args.org,
            args.display_name,
            args.description,
            Role(args.role),
            "",
            internal=args.internal,
        )
        return [("name", account.name)]
    if args.command == "create-api-key":
        ids = SERVICE_ACCOUNT.parse(args.service_account)
        if ids is None:
            raise SystemExit("service_account must be organizations/{org}/serviceAccounts/{id}")
        expires = (
            identity.clock() + args.expires_in_days * 86400
            if args.expires_in_days is not None
            else None
        )
        key, plaintext = await identity.service_accounts.create_api_key(
            ctx, ids[0], ids[1], args.display_name, expires, ""
        )
        return [("name", key.name), ("api_key", plaintext)]
    # rotate-keys
    rotation = await identity.keys.rotate_signing_keys(ctx, args.revoke_previous)
    previous = rotation.previous
    result = [
        ("active", SIGNING_KEY.format(rotation.active.kid)),
        ("pending", SIGNING_KEY.format(rotation.pending.kid)),
    ]
    if previous is not None:
        result += [
            ("previous", SIGNING_KEY.format(previous.kid)),
            ("previous_state", previous.state.value),
        ]
    return result


def _print(result: Result, json_output: bool) -> None:
    if json_output:
        print(json.dumps(dict(result)))
        return
    for label, value in result:
        if label in ("name", "encryption_key"):
            print(value)
        else:
            note = "  (shown once)" if label in SECRETS else ""
            print(f"{label.replace('_', ' ')}: {value}{note}")


async def run(argv: Sequence[str], settings: Settings, *, json_output: bool = False) -> int:
    return await run_parsed(parser().parse_args(list(argv)), settings, json_output=json_output)


async def run_parsed(
    args: argparse.Namespace, settings: Settings, *, json_output: bool = False
) -> int:
    """Run a parsed command line (the ``corral`` CLI parses it with ``parser()`` mounted)."""
    try:
        _print(await _run(settings, args), json_output)
    except CorralError as exc:
        print(f"corral admin: {exc.message} ({exc.reason})", file=sys.stderr)
        return 1
    except KeyRingError as exc:
        print(f"corral admin: {exc}", file=sys.stderr)
        return 1
    return 0


def main(
    argv: Sequence[str], settings: Settings | None = None, *, json_output: bool = False
) -> int:
    """Entry point of ``corral admin``; returns the exit status."""
    return asyncio.run(run(argv, settings or Settings(), json_output=json_output))
