"""gRPC plumbing both planes share: the cluster CA and certificates (pki), joining (join), who may
call what (auth), channel options and deadlines, the one map between herd's errors and status
codes, names from the wire (names), chunked checksummed file transfer, zeroconf discovery and free
ports."""
