"""One error type for user mistakes: the CLI prints it on one line and exits 2, no traceback."""

from __future__ import annotations


class UserError(Exception):
    """A problem with the user's input (file, option, data) that the user can fix.

    ``message`` names the problem; ``hint`` names the fix.
    """

    def __init__(self, message: str, hint: str | None = None) -> None:
        super().__init__(message)
        self.message = message
        self.hint = hint

    def __str__(self) -> str:
        return self.message if not self.hint else f"{self.message} ({self.hint})"
