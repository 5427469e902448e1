"""The one exception type the launcher raises for bad user input."""


class LaunchError(ValueError):
    """A user-facing error: the message names the flag that is wrong and how to fix it."""
