"""The CLI's verbs: `<verb>.py` exposes `register(subparsers)` and `run(args) -> int`."""


class CLIError(Exception):
    """An error with an actionable message; printed without a traceback, exit code 2."""
