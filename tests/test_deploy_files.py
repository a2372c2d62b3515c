"""The service files in deploy/ run commands this herd still takes, and give a stopping process
the time it needs (a Ray node drains for up to 30 s: a 20 s stop timeout killed it mid-drain,
an outside run)."""

from __future__ import annotations

import configparser
import plistlib
import shlex
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent
UNITS = sorted((REPO / "deploy" / "systemd").glob("*.service"))
PLISTS = sorted((REPO / "deploy" / "launchd").glob("*.plist"))
RAY_DRAIN_S = 30  # `ray stop`'s default drain


def _unit(path: Path) -> configparser.SectionProxy:
    parser = configparser.ConfigParser(strict=False, interpolation=None)
    parser.optionxform = str
    parser.read(path)
    return parser["Service"]


def _herd_argv(argv: list[str]) -> list[str]:
    return argv[argv.index("herd") + 1:]


def _commands() -> list[tuple[str, list[str], int]]:
    """(file, herd's arguments, stop timeout in seconds) for every service file."""
    out = [(p.name, _herd_argv(shlex.split(_unit(p)["ExecStart"])),
            int(_unit(p)["TimeoutStopSec"])) for p in UNITS]
    for p in PLISTS:
        plist = plistlib.loads(p.read_bytes())
        # (launchd's ExitTimeOut is 20 s when unsaid)
        out.append((p.name, _herd_argv(plist["ProgramArguments"]), plist.get("ExitTimeOut", 20)))
    return out


def test_there_are_service_files_for_each_role():
    names = {name for name, *_ in _commands()}
    assert {"herd-coordinator.service", "herd-worker.service", "herd-ray-node.service",
            "dev.herd.coordinator.plist", "dev.herd.worker.plist",
            "dev.herd.ray-node.plist"} <= names, names


@pytest.mark.parametrize("name,argv,stop_s", _commands(), ids=lambda v: v if isinstance(v, str)
                         else None)
def test_a_service_files_command_and_flags_exist(name, argv, stop_s):
    helped = subprocess.run([sys.executable, "-m", "herd", argv[0], "--help"], cwd=REPO,
                            capture_output=True, text=True, timeout=60)
    assert helped.returncode == 0, (name, helped.stderr)
    for flag in (a for a in argv[1:] if a.startswith("--")):
        assert flag in helped.stdout, f"{name}: herd {argv[0]} has no {flag}"
    if "--ray" in argv:
        assert stop_s > RAY_DRAIN_S, f"{name}: a stop timeout of {stop_s}s cuts Ray's drain"
