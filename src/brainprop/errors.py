"""The one error type users see, and its case for a name this process has not registered.

Anything that is the user's to fix (a missing file, a bad name, a nonsense hyperparameter)
raises :class:`BrainPropError` with a single line that says what was wrong and how to fix it.
The CLI prints that line and exits with status 2; any other exception is a bug.
"""


class BrainPropError(Exception):
    """A user-facing error whose message is one line: what went wrong, and the fix."""


class UnknownName(BrainPropError):
    """A rule, network, feedback pathway, preset table or dataset that is not registered in this
    process: a typo, or a registration of one's own whose code has not run here."""
