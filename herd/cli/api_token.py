"""``herd api-token``: print a bearer token of the coordinator's HTTP side (the dashboard login,
``Authorization: Bearer`` for /metrics and the job API, the ``openai`` client's ``api_key``); the
read token (--read-only) for a Prometheus server; --rotate makes new ones (herd/rpc/api_token.py).

Printed only when asked, to stdout: the token is never written to a log, a page or a URL. It is
derived from the cluster CA's key, so it is printed where the CA is (the coordinator's machine).
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from herd.errors import HerdError
from herd.rpc import api_token as tokens
from herd.rpc import pki
from herd.usage import HelpFormatter

DESCRIPTION = """\
Print the bearer token of the coordinator's HTTP side: the dashboard's login, the
`Authorization: Bearer` header for /metrics and the job API, the openai client's api_key.

The full token does everything the HTTP side offers (the job API included); the read token
(--read-only) only reads (the dashboard, /metrics): give that one to a Prometheus server or a
wall screen. Both are derived from the cluster CA's key (so they are printed on the CA's machine)
and open the HTTP side only; printed only when asked, never written to a log, a page or a URL.

--rotate makes new tokens: the coordinator refuses the old ones (and ends every dashboard
session) from its next request on, without a restart."""


def main(argv: list[str]) -> int:
    p = argparse.ArgumentParser(prog="herd api-token", description=DESCRIPTION,
                                formatter_class=HelpFormatter)
    p.add_argument("--tls-dir", type=Path, default=None,
                   help="the cluster CA (default: $HERD_HOME/tls, made by `herd init`)")
    p.add_argument("--read-only", action="store_true",
                   help="print the read token (the dashboard and /metrics, no job API)")
    p.add_argument("--rotate", action="store_true",
                   help="make new tokens, ending the old ones' use (then prints the new one)")
    args = p.parse_args(argv[1:])
    try:
        ca = pki.Authority.load(args.tls_dir or pki.default_dir())
        if args.rotate:
            gen = tokens.rotate(ca.folder)
            print(f"new API tokens (generation {gen}): the coordinator refuses the old ones "
                  "and their dashboard sessions from now on", file=sys.stderr)
        print(tokens.api_token(ca.api_secret(), tokens.generation(ca.folder), args.read_only))
    except HerdError as e:
        print(f"herd api-token: {e}", file=sys.stderr)
        return e.exit_code
    return 0
