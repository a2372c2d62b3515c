"""gRPC plumbing both planes share: the cluster-secret auth, channel options and deadlines, the one
map between herd's errors and status codes, chunked checksummed file transfer, zeroconf discovery
and free ports."""
