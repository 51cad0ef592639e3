"""Errors the user can fix, and the command-line wrapper that prints them as one line."""

import functools
import sys


class UserError(Exception):
    """Bad input or a missing prerequisite; the message says what to do. No traceback is shown."""


def cli(main):
    """Wraps a command's main(): a UserError becomes one line on stderr and exit status 2."""

    @functools.wraps(main)
    def wrapper(*args, **kwargs):
        try:
            return main(*args, **kwargs)
        except UserError as e:
            print(f"error: {e}", file=sys.stderr)
            sys.exit(2)

    return wrapper
