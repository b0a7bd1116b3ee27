"""The one exception type for problems a user can fix.

Raise it where the problem is known, with a message that says what is wrong and what to do;
the CLI prints the message (no traceback unless ``--debug``) and Slicer shows it in a dialog.
"""


class RefSAM3DError(Exception):
    """A user-facing problem: bad input, missing file, unknown option, cancelled run."""


class Cancelled(RefSAM3DError):
    """The user asked to stop; no output was written."""
