"""Errors the user can fix, the command-line wrapper that prints them as one line, the parser whose
mistakes are one line too, and Ctrl+C and SIGTERM."""

import argparse
import contextlib
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


# Ctrl+C and SIGTERM: one handler for both, in every command. Inside a training run's loop
# (`stoppable`), the first signal asks the loop to stop: it saves and exits with status 130. Anywhere
# else (while a command starts, in a command with nothing to save, at a second signal) the process
# ends at once with one line and status 130; nothing is lost that a kill would not lose, since every
# file and checkpoint appears whole or not at all. Python's KeyboardInterrupt is never raised in a
# command: raised while jax imports, it crashes the process as jaxlib loads, shows a traceback from
# jax's internals, or is swallowed by one of jax's garbage-collection callbacks (jax issue 18246).


class _Stop:
    """Whether a training loop is running that can stop cleanly, and whether it was asked to."""

    active = False
    requested = False

    def __bool__(self):
        return self.requested


_stop = _Stop()
SIGNALS = (signal.SIGINT, signal.SIGTERM)


def _on_signal(signum, frame):
    if _stop.active and not _stop.requested:
        _stop.requested = True
        print("\nStopping after the steps under way; saving a checkpoint (a second Ctrl+C quits at once without "
              "saving)...", file=sys.stderr, flush=True)
        return
    message = ("Second signal: quitting without saving; the previous checkpoint stays the latest. Run the same "
               "command again to resume from it." if _stop.requested else "Interrupted.")
    print(f"\n{message}", file=sys.stderr, flush=True)
    os._exit(EXIT_INTERRUPTED)


def handle_signals():
    """Installs the one handler; vit_jax/__init__.py does so in a command before anything imports jax."""
    for s in SIGNALS:
        signal.signal(s, _on_signal)


@contextlib.contextmanager
def stoppable():
    """The training loop's span: the first Ctrl+C or SIGTERM in it sets the flag it yields (true once
    asked to stop) instead of ending the process. Also for runs started from Python, not as a command:
    the handlers in place before are put back after."""
    before = {s: signal.getsignal(s) for s in SIGNALS}
    handle_signals()
    _stop.active, _stop.requested = True, False
    try:
        yield _stop
    finally:
        _stop.active = False
        for s, handler in before.items():
            signal.signal(s, handler)


def cli(main):
    """Wraps a command's main(): a UserError becomes one line on stderr and exit status 2, output that
    nobody reads any more (`| head`) one line and status 1."""

    @functools.wraps(main)
    def wrapper(*args, **kwargs):
        try:
            result = main(*args, **kwargs)
            sys.stdout.flush()  # a closed pipe shows here, not in Python's own message at exit
            return result
        except UserError as e:
            print(f"error: {e}", file=sys.stderr)
            sys.exit(2)
        except BrokenPipeError:
            # Python would print a traceback, then fail a second time flushing stdout at exit.
            os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
            print("error: the output was closed before the command ended (the program reading it exited); "
                  "a training run continues from its last checkpoint when run again", file=sys.stderr)
            sys.exit(1)

    return wrapper
