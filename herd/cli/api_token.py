"""``herd api-token``: print the bearer token of the coordinator's HTTP side (the dashboard login,
``Authorization: Bearer`` for /metrics and the job API, the ``openai`` client's ``api_key``).

Printed only when asked, to stdout: the token is never written to a log, a page or a URL. It is
derived from the cluster CA's key, so it is printed where the CA is (the coordinator's machine).
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from herd.errors import HerdError
from herd.rpc import pki
from herd.rpc.api_token import api_token
from herd.usage import HelpFormatter

DESCRIPTION = """\
Print the bearer token of the coordinator's HTTP side: the dashboard's login, the
`Authorization: Bearer` header for /metrics and the job API, the openai client's api_key.

It is derived from the cluster CA's key (so it is printed on the CA's machine) and opens the
HTTP side only; it is printed only when asked, never written to a log, a page or a URL."""


def main(argv: list[str]) -> int:
    p = argparse.ArgumentParser(prog="herd api-token", description=DESCRIPTION,
                                formatter_class=HelpFormatter)
    p.add_argument("--tls-dir", type=Path, default=None,
                   help="the cluster CA (default: $HERD_HOME/tls, made by `herd init`)")
    args = p.parse_args(argv[1:])
    try:
        print(api_token(pki.Authority.load(args.tls_dir or pki.default_dir()).api_secret()))
    except HerdError as e:
        print(f"herd api-token: {e}", file=sys.stderr)
        return e.exit_code
    return 0
