"""``flotilla keys``: the router's API keys, kept in the registry (the controller's CreateKey, RevokeKey, ListKeys).

    flotilla keys create NAME --models 'efficientnet-*' [--rate 100/s] [--burst N] [--expires 30d]
    flotilla keys revoke NAME
    flotilla keys list

``create`` prints the key once: nothing keeps it (the registry holds a salted hash). A revoked key
stops on every router as soon as its fleet watch hears (under a second). ``create`` and ``revoke``
need the admin key: ``$FLOTILLA_ADMIN_KEY``, else the local stack's stack file.
"""

from __future__ import annotations

import argparse
import re
import sys
import time
from pathlib import Path
from typing import TYPE_CHECKING

from flotilla.errors import FlotillaError

if TYPE_CHECKING:
    from flotilla.clients.models import ModelsClient

RATE_UNITS = {"s": 1.0, "sec": 1.0, "m": 60.0, "min": 60.0, "h": 3600.0}
DURATION_UNITS = {"s": 1.0, "m": 60.0, "h": 3600.0, "d": 86400.0, "w": 7 * 86400.0}
_RATE = re.compile(r"\s*(\d+(?:\.\d*)?|\.\d+)\s*(?:/\s*([a-z]+))?\s*")
_DURATION = re.compile(r"\s*(\d+(?:\.\d*)?)\s*([a-z])\s*")


def parse_rate_per_s(text: str) -> float:
    """``100/s``, ``6000/min``, ``100`` (per second) → requests per second (0: unlimited)."""
    match = _RATE.fullmatch(text.lower())
    if match is None or (match.group(2) or "s") not in RATE_UNITS:
        raise argparse.ArgumentTypeError(f"rate {text!r}: give requests per unit, e.g. 100/s, 6000/min or 0 (unlimited)")
    return float(match.group(1)) / RATE_UNITS[match.group(2) or "s"]


def parse_duration_s(text: str) -> float:
    """``30d``, ``12h``, ``90m``, ``3600s``, ``2w`` → seconds."""
    match = _DURATION.fullmatch(text.lower())
    if match is None or match.group(2) not in DURATION_UNITS or float(match.group(1)) <= 0:
        raise argparse.ArgumentTypeError(f"duration {text!r}: give a number and a unit of s, m, h, d, w (e.g. 30d)")
    return float(match.group(1)) * DURATION_UNITS[match.group(2)]


def add_parser(sub: argparse._SubParsersAction[argparse.ArgumentParser], default_state: Path) -> argparse.ArgumentParser:
    keys = sub.add_parser("keys", help="API keys of a running stack's routers (scoped, rate-limited)")
    keys.add_argument("--state", type=Path, default=default_state, help="stack.json written by `flotilla up`")
    keys.add_argument("--controller", help="controller host:port (default: from --state)")
    ksub = keys.add_subparsers(dest="action", required=True)
    create = ksub.add_parser("create", help="make a key and print it (once)")
    create.add_argument("name")
    create.add_argument("--models", required=True,
                        help="comma-separated globs of the models it may call: 'efficientnet-*', '*' for all")
    create.add_argument("--rate", type=parse_rate_per_s, default=0.0,
                        help="request quota: 100/s, 6000/min (default 0: unlimited)")
    create.add_argument("--burst", type=int, default=0, help="requests at once (default: one second's worth)")
    create.add_argument("--expires", type=parse_duration_s, help="lifetime: 30d, 12h, 90m (default: never expires)")
    revoke = ksub.add_parser("revoke", help="stop a key on every router")
    revoke.add_argument("name")
    ksub.add_parser("list", help="names, scopes, quotas, expiry and last use (never a key)")
    return keys


def cmd_keys(args: argparse.Namespace, client: ModelsClient) -> None:
    from flotilla.clients.models import format_keys

    try:
        with client:
            if args.action == "list":
                print(format_keys(client.list_keys()))
            elif args.action == "revoke":
                client.revoke_key(args.name)
                print(f"revoked {args.name}")
            elif args.action == "create":
                patterns = [p.strip() for p in args.models.split(",") if p.strip()]
                expires = time.time() + args.expires if args.expires else 0.0
                created = client.create_key(
                    args.name, patterns, rate_per_s=args.rate, burst=args.burst, expires_unix_s=expires
                )
                print(f"created API key {created.key.name!r} (models {', '.join(created.key.models)}); "
                      "it is shown only this once:", file=sys.stderr)
                print(created.token)
    except FlotillaError as exc:
        raise SystemExit(f"{exc.code.name}: {exc.message}") from exc
