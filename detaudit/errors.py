"""One family of user-facing failures, turned into a one-line message and an exit code at the CLI boundary."""

from __future__ import annotations

# Exit codes are part of the public interface (README "Exit codes"); never renumber them.
EXIT_OK = 0
EXIT_GATE_FAILED = 1
EXIT_USAGE = 2
EXIT_ENDPOINT = 3
EXIT_INTERRUPTED = 130


class DetauditError(Exception):
    """A problem the user can fix: printed as one line, no traceback (unless --debug)."""

    exit_code = EXIT_USAGE

    def __init__(self, message: str, *, exit_code: int | None = None) -> None:
        super().__init__(message)
        if exit_code is not None:
            self.exit_code = exit_code


class UsageError(DetauditError):
    """Bad arguments, bad input files, bad run directories (exit 2)."""


class RunDirError(UsageError):
    """A path that is not a readable detaudit run directory (exit 2)."""


class EndpointError(DetauditError):
    """The endpoint could not be used at all, or failed too often to judge (exit 3 unless given)."""

    exit_code = EXIT_ENDPOINT


class GateFailed(DetauditError):
    """A release gate rule failed (exit 1)."""

    exit_code = EXIT_GATE_FAILED


class RecordingFailed(DetauditError):
    """Finished rows could not be recorded as given (a shard that cannot be written, a value Parquet refuses): the
    run stops at once, its manifest says `failed`, and `--resume` finishes it once the cause is fixed (exit 3)."""

    exit_code = EXIT_ENDPOINT
