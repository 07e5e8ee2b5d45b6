"""User-facing errors: the CLI prints these as one message, with no traceback.

Framework-free; every module may raise them. A message names the place (file, spec
key or parameter path), what was found against what was expected, and the fix.
"""


class JaxboothError(ValueError):
    """Bad user input or a checkpoint mismatch; the message is meant for the user."""
