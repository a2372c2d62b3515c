"""Who belongs to the cluster: ``herd init | join | token | revoke``.

- ``herd init`` (once, on the coordinator's machine): the cluster CA, and certificates for the
  coordinator and the CLI on this machine, in $HERD_HOME/tls (keys mode 0600).
- ``herd token [--role worker|client] [--ttl 15m]`` (on the CA's machine): a short-lived join token.
  ``herd coordinator`` prints one for workers when it starts.
- ``herd join TOKEN [--id NAME]`` (on a new Mac or laptop): a key made here and a certificate for
  it, signed by the CA through the coordinator's join port; the key never leaves this machine.
- ``herd revoke ROLE/NAME`` (on the CA's machine): that member is refused from now on, without a
  restart, and its name is never issued again.
"""

from __future__ import annotations

import argparse
import re
import sys
from pathlib import Path

from herd.errors import ConfigError, HerdError
from herd.netif import hostport
from herd.rpc import discovery, pki
from herd.rpc.join import (
    DEFAULT_TTL_S,
    JOIN_ROLES,
    MAX_TTL_S,
    JoinToken,
    clock_skew_s,
    join,
    make_token,
    skew_warning,
)
from herd.rpc.token_ledger import TokenLedger
from herd.usage import HelpFormatter

DEFAULT_JOIN_PORT = 7452  # coordinator/main.py: its default port + 2


def _dir(args) -> Path:
    return args.tls_dir or pki.default_dir()


def cmd_init(args) -> int:
    folder = _dir(args)
    if pki.Authority.exists(folder) and not args.force:
        print(f"the cluster CA is already in {folder} (--force makes a new one: every machine "
              "must then join again)")
        return 0
    ca = pki.Authority.create(folder)
    for role in ("coordinator", "client"):
        ca.issue(role, pki.host_label()).save(folder)
    for sub in ("coordinator", "worker"):
        (folder.parent / sub).mkdir(parents=True, exist_ok=True)
    print(f"made the cluster CA and this machine's certificates in {folder} "
          f"(CA fingerprint sha256:{ca.fingerprint[:32]}...)\n"
          "next: `herd coordinator` here; it prints a join token for each other machine "
          "(`herd join TOKEN`)")
    return 0


def _seconds(text: str) -> float:
    m = re.fullmatch(r"(\d+(?:\.\d+)?)([smhd]?)", text.strip())
    if not m:
        raise ConfigError(f"--ttl {text!r} is not a duration", hint="e.g. 90s, 15m, 2h, 1d")
    seconds = float(m[1]) * {"": 1, "s": 1, "m": 60, "h": 3600, "d": 86400}[m[2]]
    if not 0 < seconds <= MAX_TTL_S:  # (an argument's range: exit 2, not an auth failure)
        raise ConfigError(f"--ttl {text}: a join token lives 1 s to {MAX_TTL_S // 86400} days")
    return seconds


def _running_join_address() -> str | None:
    """The join address a coordinator of this HERD_HOME wrote when it started (`herd coordinator`
    or `herd up`'s, whose join port is a free one: a token for the default port did not reach
    it, an outside run)."""
    home = pki.default_home()
    for folder in (home / "coordinator", home / "local" / "coordinator"):
        try:
            return (folder / "join.address").read_text().strip() or None
        except OSError:
            continue
    return None


def cmd_token(args) -> int:
    ca = pki.Authority.load(_dir(args))
    address = (args.join or _running_join_address()
               or hostport(discovery.local_ip(), DEFAULT_JOIN_PORT))  # IPv6: [addr]
    token = make_token(ca, address, args.role, _seconds(args.ttl))
    print(token.encode())
    ttl = args.ttl.strip() + ("s" if args.ttl.strip()[-1:].isdigit() else "")  # (60 -> 60s)
    print(f"(a {args.role} token for {address}, valid {ttl}: run `herd join TOKEN` on the "
          "new machine)", file=sys.stderr)
    return 0


def cmd_join(args) -> int:
    token = JoinToken.decode(args.token)
    ident = join(token, args.id or pki.host_label(), _dir(args))
    print(f"joined as {ident.label}; certificate and key in {_dir(args)}")
    if warning := skew_warning(clock_skew_s(ident)):
        print(f"warning: {warning}", file=sys.stderr)
    if ident.role == "worker":
        second = (_dir(args) / f"worker-{ident.name}.pem").is_file()
        print(f"next: `herd worker --id {ident.name}` (a second worker of this machine)" if second
              else "next: `herd worker` (its id is the name above)")
    return 0


def cmd_revoke(args) -> int:
    ca = pki.Authority.load(_dir(args))
    done = ca.revoke(args.member, unissued=args.unissued)
    voided = TokenLedger(ca.folder).void_for(args.member)
    print(f"{args.member} {'revoked' if done else 'was already revoked'}: the coordinator using "
          f"{_dir(args)} refuses it from now on"
          + ("; the join token it joined with is void (other machines need a new one)"
             if voided else ""))
    return 0


DESCRIPTIONS = {
    "init": "Make the cluster CA and this machine's coordinator and client certificates, once, "
            "on the coordinator's machine. Other machines join with a token (herd token, herd "
            "join); no key is ever copied between machines.",
    "token": "Print a short-lived token that lets one machine join this cluster (run where the "
             "cluster CA is). `herd coordinator` prints a worker token when it starts.",
    "join": "Join this machine to a cluster with a token from `herd token`: a key is made here, "
            "and the coordinator's join port signs a certificate for it (the key never leaves).",
    "revoke": "Revoke a member's certificate (run where the cluster CA is): it is refused from "
              "now on, without a restart, and its name is never issued again.",
}


def _parser(cmd: str) -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog=f"herd {cmd}", description=DESCRIPTIONS[cmd],
                                formatter_class=HelpFormatter)
    p.add_argument("--tls-dir", type=Path, default=None,
                   help="the CA / this machine's certificates (default: $HERD_HOME/tls)")
    if cmd == "init":
        p.add_argument("--force", action="store_true",
                       help="replace an existing CA (every machine must then join again)")
    elif cmd == "token":
        p.add_argument("--role", choices=JOIN_ROLES, default="worker",
                       help="what the joining machine will be")
        p.add_argument("--ttl", default=f"{DEFAULT_TTL_S // 60}m", help="how long it is valid")
        p.add_argument("--join", metavar="HOST:PORT", default=None,
                       help="the coordinator's join address (default: the one the coordinator "
                       "of this HERD_HOME, or its `herd up`, is serving; else this machine's "
                       f"LAN address, port {DEFAULT_JOIN_PORT})")
    elif cmd == "join":
        p.add_argument("token")
        p.add_argument("--id", default=None,
                       help="this machine's member name, e.g. its worker id (default: host name)")
    elif cmd == "revoke":
        p.add_argument("member", metavar="ROLE/NAME", help="e.g. worker/mac-studio-2")
        p.add_argument("--unissued", action="store_true",
                       help="revoke a name no certificate was issued for yet")
    return p


COMMANDS = {"init": cmd_init, "token": cmd_token, "join": cmd_join, "revoke": cmd_revoke}


def main(argv: list[str]) -> int:
    cmd = argv[0]
    args = _parser(cmd).parse_args(argv[1:])
    try:
        return COMMANDS[cmd](args)
    except HerdError as e:
        print(f"herd {cmd}: {e}", file=sys.stderr)
        return e.exit_code
