"""Errors the user can fix, the command-line wrapper that prints them as one line, the parser whose
mistakes are one line too, and Ctrl+C in a command."""

import argparse
import functools
import os
import signal
import sys

EXIT_INTERRUPTED = 130  # Ctrl+C, as a shell reports it


class UserError(Exception):
    """Bad input or a missing prerequisite; the message says what to do. No traceback is shown."""


class CommandParser(argparse.ArgumentParser):
    """Every command's parser: a mistyped flag or a bad value is one `error: ...` line, with where to
    look, and exit status 2, as a UserError is; argparse would print the whole usage first, dozens of
    lines that bury the one that matters. A prefix of a flag is a typo, not that flag (--epoch is not
    --epochs)."""

    def __init__(self, *args, allow_abbrev: bool = False, **kwargs):
        super().__init__(*args, allow_abbrev=allow_abbrev, **kwargs)

    def error(self, message: str):
        self.exit(2, f"error: {message} ({self.prog} --help lists the flags)\n")


def reason(error: BaseException, limit: int = 200, last: bool = False) -> str:
    """One line saying what went wrong: the first (or last) line of the message, else the type's name.

    Libraries raise many kinds of exception for one cause that matters to the user (an unreadable
    file, no network); this is the part of theirs worth quoting in ours.
    """
    lines = str(error).strip().splitlines() or [type(error).__name__]
    line = lines[-1] if last else lines[0]
    return line if len(line) <= limit else line[:limit - 3] + "..."


def started_as_command(argv: list[str]) -> bool:
    """Whether the interpreter's command line (sys.orig_argv) is `python [options] -m vit_jax.X ...` or
    `-m parity.X`: one of this project's commands, not a program that imports the package."""
    args = iter(argv[1:])
    for arg in args:
        if arg == "-m":
            return next(args, "").split(".")[0] in ("vit_jax", "parity")
        if arg in ("-W", "-X"):
            next(args, None)  # the option's value
        elif arg == "-c" or not arg.startswith("-"):
            return False  # code or a script: what follows are its arguments
    return False


def quit_on_ctrl_c_while_starting():
    """Until a command's main() begins (`cli` then hands Ctrl+C back to Python), Ctrl+C ends the process
    at once. Python's KeyboardInterrupt, raised while jax imports, crashes the process as jaxlib's
    library loads (SIGSEGV), shows a traceback through jax's internals, or lands in one of jax's
    garbage-collection callbacks, which swallow it (jax issue 18246): the command then runs to its end
    as if Ctrl+C had not been pressed. Installed by vit_jax/__init__.py, before any import of jax."""
    signal.signal(signal.SIGINT, _quit_while_starting)


def _quit_while_starting(signum, frame):
    print("\nInterrupted.", file=sys.stderr, flush=True)
    os._exit(EXIT_INTERRUPTED)


def cli(main):
    """Wraps a command's main(): a UserError becomes one line on stderr and exit status 2, Ctrl+C one
    word and status 130, output that nobody reads any more (`| head`) one line and status 1."""

    @functools.wraps(main)
    def wrapper(*args, **kwargs):
        if signal.getsignal(signal.SIGINT) is _quit_while_starting:
            signal.signal(signal.SIGINT, signal.default_int_handler)  # from here on, KeyboardInterrupt (below)
        try:
            result = main(*args, **kwargs)
            sys.stdout.flush()  # a closed pipe shows here, not in Python's own message at exit
            return result
        except UserError as e:
            print(f"error: {e}", file=sys.stderr)
            sys.exit(2)
        except KeyboardInterrupt:  # Ctrl+C in a command that has nothing to save (training has its own)
            print("\nInterrupted.", file=sys.stderr)
            sys.exit(EXIT_INTERRUPTED)
        except BrokenPipeError:
            # Python would print a traceback, then fail a second time flushing stdout at exit.
            os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
            print("error: the output was closed before the command ended (the program reading it exited); "
                  "a training run continues from its last checkpoint when run again", file=sys.stderr)
            sys.exit(1)

    return wrapper
