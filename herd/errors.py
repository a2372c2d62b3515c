"""herd's error hierarchy. Raised early with a hint; caught only at boundaries
(CLI entry, gRPC servicer, control loop, rank runner). gRPC carries the class across the wire
(herd/rpc/status.py), so a client raises what the server raised, with the same exit code."""

import errno


class HerdError(Exception):
    """Base of every error herd raises on purpose. ``hint`` says how to fix it."""

    exit_code = 1

    def __init__(self, message: str, hint: str | None = None):
        super().__init__(message)
        self.message = message
        self.hint = hint

    def __str__(self) -> str:
        return f"{self.message}\n  hint: {self.hint}" if self.hint else self.message

    def __reduce__(self):
        # Pickled whole, hint included: Ray carries a rank actor's error to the coordinator.
        return type(self), (self.message, self.hint)


class ConfigError(HerdError):
    """The job config is invalid: names the key, the bad value and the fix."""

    exit_code = 2


class DatasetError(HerdError):
    """The dataset is invalid: names the file, the line and how many lines are affected."""

    exit_code = 3


class PlacementError(HerdError):
    """A job cannot be placed on the workers at hand: says what is missing."""

    exit_code = 4


class DoesNotFitError(PlacementError):
    """The job cannot fit in the memory of the workers at hand, whichever are free: refused at
    submit with numbers and fixes (a job that only lacks workers waits instead)."""


class PeerLostError(HerdError):
    """A peer of a collective died or stalled past its deadline."""

    exit_code = 5


class AuthError(HerdError):
    """A call carried no certificate of this cluster, one revoked, or one not allowed to make it."""

    exit_code = 6


class NotFoundError(HerdError):
    """A job, worker or checkpoint that does not exist."""

    exit_code = 7


class StorageError(HerdError):
    """A disk herd writes to is full or failing (checkpoints, the job database): names the disk,
    what it holds free and what was needed."""

    exit_code = 8


# The errnos of a write that failed for the disk's sake (full, over quota, failing, read-only):
# a StorageError where they are caught, any other OSError stays what it is.
DISK_ERRNOS = frozenset({errno.ENOSPC, errno.EDQUOT, errno.EIO, errno.EROFS})


class NumericalError(HerdError):
    """Training produced a non-finite loss or gradient: names the step and the value. The update
    of that step is never applied, so the last checkpoint is still good."""

    exit_code = 9


class ChecksumError(HerdError):
    """Bytes that do not hash to the sha256 they were sent with (or a stream that does not match
    its own header): the transfer is refused whole and the sender retries."""


class ProtocolError(HerdError):
    """A request that breaks the contract (a stream without its header, a report without a
    kind): a bug in the peer that sent it, never something the user can fix in a config."""
