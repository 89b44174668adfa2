"""Standard output for the commands, whose write errors are not errors in an operand.

Commands catch OSError around the work on each operand and report it
against that operand.  A failed write to standard output (a full disk, a
closed pipe) concerns no operand, so :class:`StandardOutput` raises it as
:class:`OutputError`, which those handlers let through to the CLI's main.
"""

from __future__ import annotations


class OutputError(Exception):
    """Writing to standard output failed; ``cause`` is the OSError."""

    def __init__(self, cause: OSError):
        super().__init__(str(cause))
        self.cause = cause
        self.exit_status = 1   # fsck, whose status 1 means "all repaired", sets its own


class StandardOutput:
    """A stream (text or binary) whose write and flush raise OutputError instead of OSError."""

    def __init__(self, stream):
        self.stream = stream

    def write(self, data) -> None:
        try:
            if isinstance(data, str):
                self.stream.write(data)
                return
            # Python 3.11's BufferedWriter returns a short count instead of
            # raising when the reader of a pipe goes away during a large
            # write.  Writing the rest raises the error.
            view = memoryview(data)
            while view:
                view = view[self.stream.write(view):]
        except OSError as exc:
            raise OutputError(exc) from exc

    def flush(self) -> None:
        try:
            self.stream.flush()
        except OSError as exc:
            raise OutputError(exc) from exc
