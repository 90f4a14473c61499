"""User-facing errors.

Library code raises `UserError` for anything the user can fix (bad path, bad scheme, missing
calibration data). The CLI prints its message as one line and exits with code 2; no traceback.
"""


class UserError(Exception):
    """A problem in the user's input; the message names the fix."""

    exit_code = 2
