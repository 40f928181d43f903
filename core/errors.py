"""The one exception type users see: a clear, one-line message."""


class BenchError(Exception):
    """A user-facing error (bad input, bad config, missing file).

    The command line prints ``error: <message>`` on one line and exits non-zero;
    the traceback is shown only with ``--debug``.
    """
