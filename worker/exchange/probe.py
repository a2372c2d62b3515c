"""A short measurement of the link to the next rank, made before the ring forms.

Each rank listens on its own exchange address for a moment, sends zeros to the next rank's for
``seconds``, and the receiver answers with the byte count it read, so the rate counts only what
crossed the link (a sender's clock alone would count its socket buffer). Every rank sends and
receives once, so a 2-rank probe runs both directions at once, like the ring's traffic.

Plain sockets, written by hand: a TCP stream and one reply is all it takes, and a benchmark tool
(iperf3) is not something a Mac or a venv has. The exchange port is free at this point: the gRPC
exchange binds it only after the probe, and the MLX ring uses its own port. A failed probe (a peer
slow to start, a port taken) is reported and never fails the job.
"""

from __future__ import annotations

import errno
import ipaddress
import socket
import struct
import threading
import time
from dataclasses import dataclass

from herd import netif
from herd.netif import family, split_hostport

CHUNK = 1 << 20


@dataclass(frozen=True)
class LinkRate:
    peer: int               # the rank probed
    address: str            # its host:port
    bits_per_second: float
    bytes: int
    seconds: float


class _Sink(threading.Thread):
    """Accepts one connection from ``expect`` (the previous rank's host, or an address on the
    subnets listed there: the cable from it), reads until EOF (for at most ``read_s``), answers
    with the count."""

    def __init__(self, address: str, expect: list, timeout_s: float, read_s: float):
        super().__init__(daemon=True, name="link-probe-sink")
        host, port = split_hostport(address)
        self.sock = socket.socket(family(host), socket.SOCK_STREAM)
        self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        self.sock.bind((host, port))
        self.sock.listen(4)
        self.expect, self.timeout_s, self.read_s = expect, timeout_s, read_s

    def run(self) -> None:
        deadline = time.monotonic() + self.timeout_s
        try:
            while time.monotonic() < deadline:
                self.sock.settimeout(max(0.01, deadline - time.monotonic()))
                conn, peer = self.sock.accept()
                with conn:
                    source = peer[0].removeprefix("::ffff:")
                    if not any(source == e if isinstance(e, str)
                               else ipaddress.ip_address(source) in e for e in self.expect):
                        continue  # not the previous rank: not ours to measure
                    conn.settimeout(self.read_s)
                    got, stop = 0, time.monotonic() + self.read_s
                    while time.monotonic() < stop and (data := conn.recv(CHUNK)):
                        got += len(data)
                    conn.sendall(struct.pack("!Q", got))
                    return
        except OSError:
            return  # timed out or the peer went away: the sender reports it
        finally:
            self.sock.close()


def probe_next(rank: int, peers: list[str], seconds: float = 0.3,
               timeout_s: float = 20.0) -> LinkRate:
    """Measures rank -> rank+1 while rank-1 measures its link to us. OSError when it fails."""
    n = len(peers)
    nxt, prev = (rank + 1) % n, (rank - 1) % n
    own = split_hostport(peers[rank])[0]
    host, port = split_hostport(peers[nxt])
    # A cable ring (coordinator/planner/network.py): this rank is listed at its end of the cable
    # from the previous rank, which dials from its own end of that cable (an address the list
    # does not hold), and the next rank is reached over another cable, from this rank's end of
    # that one.
    expect: list = [split_hostport(peers[prev])[0]]
    source = own
    if (own_net := netif.local_network(own)) is not None:
        if ipaddress.ip_address(expect[0]) not in own_net:
            expect.append(own_net)
        if ipaddress.ip_address(host) not in own_net:
            source = netif.address_on_link(host) or own
    sink = _Sink(peers[rank], expect, timeout_s, seconds + 5.0)
    sink.start()
    try:
        deadline = time.monotonic() + timeout_s
        while True:
            try:
                conn = _connect(host, port, source)
                break
            except OSError:
                if time.monotonic() > deadline:
                    raise
                time.sleep(0.1)  # the next rank is still starting
        with conn:
            conn.settimeout(seconds + 10.0)
            zeros = bytes(CHUNK)
            t0 = time.monotonic()
            while time.monotonic() - t0 < seconds:
                conn.sendall(zeros)
            conn.shutdown(socket.SHUT_WR)
            reply = b""
            while len(reply) < 8 and (data := conn.recv(8 - len(reply))):
                reply += data
            elapsed = time.monotonic() - t0
        if len(reply) != 8:
            raise OSError(f"rank {nxt} at {peers[nxt]} did not report what it received")
        got = struct.unpack("!Q", reply)[0]
        return LinkRate(nxt, peers[nxt], got * 8 / elapsed, got, elapsed)
    finally:
        sink.join(timeout_s)


def _connect(host: str, port: int, own: str) -> socket.socket:
    """A connection from this rank's own ring address, so the next rank's sink sees the host it
    expects: the kernel picks the source by route, which on a machine with several addresses (two
    on one interface, or a route through another) is not always the address peers know it by.
    Then the sink refused the connection and waited out its deadline: 20 s at every start on Ray
    nodes sharing one loopback (bench/results/ray-vs-zeroconf-2026-12-01.md)."""
    try:
        return socket.create_connection((host, port), timeout=2.0, source_address=(own, 0))
    except OSError as e:
        if e.errno != errno.EADDRNOTAVAIL:
            raise
        return socket.create_connection((host, port), timeout=2.0)  # not an address of ours
