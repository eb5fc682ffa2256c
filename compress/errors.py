"""The one exception type the library raises; the CLI turns it into a single red line."""


class TorchslimError(Exception):
    """A failure the user can act on. The message says what was wrong and what to do."""

    exit_code = 1


class UsageError(TorchslimError):
    """The command line itself was wrong (bad option value, bad combination): exit 2."""

    exit_code = 2
