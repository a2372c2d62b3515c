"""A stranger on the LAN with no certificate, as tests/test_attacks.py scripts it (its own process,
so its sends do not compete with the test's own calls for the interpreter).

    python tests/attacker.py --tls HOST:PORT [--tls ...] --join HOST:PORT --half-open N
                             --big N --big-mb M

- ``--half-open N``: N connections spread over every target that start a call and never finish
  it: a TLS ClientHello cut short on the TLS ports; on the join port (plaintext HTTP/2) the
  connection preface, SETTINGS and a HEADERS frame for JoinService/Join, and no DATA.
- ``--big N``: N connections at once, each sending one message of M MB without credentials: on
  a join port an HTTP/2 DATA stream whose gRPC prefix declares M MB, on a TLS port M MB of an
  HTTP/2 stream as plaintext (what it would send if TLS were not there).
- ``--flood N``: after those, N more half-open TLS connections to the first TLS port, as fast as
  they open (the server may close those past its bound at once).
Prints ``{"event": "half-open", "open": n}`` once the half-open calls are up, ``{"event": "big",
"sent": [bytes per connection]}`` when the big sends are done, ``{"event": "flood", "opened": n}``
after a flood, then holds every socket open until stdin closes.
"""

from __future__ import annotations

import argparse
import json
import socket
import struct
import sys
import threading

PREFACE = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n"


def frame(kind: int, flags: int, stream: int, payload: bytes) -> bytes:
    return struct.pack(">I", len(payload))[1:] + bytes([kind, flags]) + struct.pack(
        ">I", stream) + payload


def _literal(name: bytes, value: bytes) -> bytes:
    """HPACK: a literal header field without indexing, new name, no Huffman (RFC 7541 6.2.2)."""
    assert len(name) < 127 and len(value) < 127
    return b"\x00" + bytes([len(name)]) + name + bytes([len(value)]) + value


def grpc_headers(path: bytes, authority: bytes) -> bytes:
    block = b"".join(_literal(k, v) for k, v in (
        (b":method", b"POST"), (b":scheme", b"http"), (b":path", path),
        (b":authority", authority), (b"content-type", b"application/grpc"), (b"te", b"trailers")))
    return frame(0x1, 0x4, 1, block)  # HEADERS, END_HEADERS, stream 1 (no END_STREAM)


def connect(target: str) -> socket.socket:
    host, port = target.rsplit(":", 1)
    return socket.create_connection((host, int(port)), timeout=10)


def half_open(target: str, tls: bool) -> socket.socket:
    s = connect(target)
    if tls:
        # A TLS record header announcing a 512-byte ClientHello, and 4 bytes of it.
        s.sendall(b"\x16\x03\x01\x02\x00" + b"\x01\x00\x01\xfc")
    else:
        s.sendall(PREFACE + frame(0x4, 0, 0, b"")
                  + grpc_headers(b"/herd.v1.JoinService/Join", target.encode()))
    return s


def big(target: str, tls: bool, megabytes: int, sent: list[int], i: int) -> None:
    total = megabytes * 1024 * 1024
    try:
        s = connect(target)
        s.sendall(PREFACE + frame(0x4, 0, 0, b"")
                  + grpc_headers(b"/herd.v1.JoinService/Join", target.encode()))
        sent[i] += len(PREFACE)
        chunk = 16 * 1024  # HTTP/2's default largest frame
        first = b"\x00" + struct.pack(">I", total)  # gRPC: not compressed, M MB follow
        body = b"\xab" * chunk
        s.sendall(frame(0x0, 0, 1, first + body[: chunk - 5]))
        left = total - (chunk - 5)
        while left > 0:
            n = min(chunk, left)
            s.sendall(frame(0x0, 0, 1, body[:n]))
            sent[i] += n + 9
            left -= n
    except OSError:
        pass  # the server closed it: that is the point
    del tls


def main() -> int:
    p = argparse.ArgumentParser()
    p.add_argument("--tls", action="append", default=[], help="a mutual-TLS port")
    p.add_argument("--join", action="append", default=[], help="a plaintext join port")
    p.add_argument("--half-open", type=int, default=200)
    p.add_argument("--big", type=int, default=20)
    p.add_argument("--big-mb", type=int, default=60)
    p.add_argument("--flood", type=int, default=0)
    args = p.parse_args()
    targets = [(t, True) for t in args.tls] + [(t, False) for t in args.join]
    held = []
    for i in range(args.half_open):
        target, tls = targets[i % len(targets)]
        try:
            held.append(half_open(target, tls))
        except OSError:
            pass
    print(json.dumps({"event": "half-open", "open": len(held)}), flush=True)
    sent = [0] * args.big
    threads = [threading.Thread(target=big, args=(*targets[i % len(targets)], args.big_mb,
                                                  sent, i)) for i in range(args.big)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    print(json.dumps({"event": "big", "sent": sent}), flush=True)
    if args.flood:
        import resource

        soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
        resource.setrlimit(resource.RLIMIT_NOFILE, (min(hard, args.flood + 4096), hard))
        tls_target = next(t for t, tls in targets if tls)
        for _ in range(args.flood):
            try:
                held.append(half_open(tls_target, True))
            except OSError:
                pass
        print(json.dumps({"event": "flood", "opened": args.flood}), flush=True)
    sys.stdin.read()  # hold the half-open connections until told to go
    return 0


if __name__ == "__main__":
    sys.exit(main())
