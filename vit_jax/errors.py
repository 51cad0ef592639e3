"""Errors the user can fix, and the command-line wrapper that prints them as one line."""

import functools
import os
import sys


class UserError(Exception):
    """Bad input or a missing prerequisite; the message says what to do. No traceback is shown."""


def reason(error: BaseException, limit: int = 200, last: bool = False) -> str:
    """One line saying what went wrong: the first (or last) line of the message, else the type's name.

    Libraries raise many kinds of exception for one cause that matters to the user (an unreadable
    file, no network); this is the part of theirs worth quoting in ours.
    """
    lines = str(error).strip().splitlines() or [type(error).__name__]
    line = lines[-1] if last else lines[0]
    return line if len(line) <= limit else line[:limit - 3] + "..."


def cli(main):
    """Wraps a command's main(): a UserError becomes one line on stderr and exit status 2, Ctrl+C one
    word and status 130, output that nobody reads any more (`| head`) one line and status 1."""

    @functools.wraps(main)
    def wrapper(*args, **kwargs):
        try:
            result = main(*args, **kwargs)
            sys.stdout.flush()  # a closed pipe shows here, not in Python's own message at exit
            return result
        except UserError as e:
            print(f"error: {e}", file=sys.stderr)
            sys.exit(2)
        except KeyboardInterrupt:  # Ctrl+C in a command that has nothing to save (training has its own)
            print("\nInterrupted.", file=sys.stderr)
            sys.exit(130)
        except BrokenPipeError:
            # Python would print a traceback, then fail a second time flushing stdout at exit.
            os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
            print("error: the output was closed before the command ended (the program reading it exited); "
                  "a training run continues from its last checkpoint when run again", file=sys.stderr)
            sys.exit(1)

    return wrapper
