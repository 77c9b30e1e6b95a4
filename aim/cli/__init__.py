"""`aim`: a thin command line over the Python API, one module per command.

Each module of COMMANDS registers its sub-command with a one-line help; those lines are the one list of
the commands: `aim --help` prints them, `glance()` formats them for the README's "CLI at a glance"
(tests/cli/test_command_list.py holds the README to it), and `aim COMMAND --help` gives the options.

A mistake of the user's (a bad argument, a missing file, a corrupt model, a path that cannot be
written, a full disk) ends with one `error:` line and exit code 2; a bug still shows its traceback.
Ctrl-C and SIGTERM remove what the process has half-written and exit with 130 and 143.
"""

from __future__ import annotations

import argparse
import errno
import importlib
import os
import signal
import sys
import threading

from aim.cli.args import Parser
from aim.errors import AimError
from aim.files import remove_pending

COMMANDS = (
    "models",
    "engine",
    "trt_check",
    "export",
    "modulate",
    "engine_file",
    "run",
    "verify",
    "generate",
    "train",
    "evaluate",
    "attack",
    "triton",
    "serve",
    "loadtest",
    "tiers",
)


def parser() -> argparse.ArgumentParser:
    top = Parser(
        prog="aim",
        description="AIM model modulation: export, modulate, build, run, verify, serve.",
        epilog="`aim COMMAND --help` gives a command's options.",
    )
    sub = top.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for name in COMMANDS:
        importlib.import_module(f"{__name__}.{name}").add(sub)
    return top


def commands() -> list[tuple[str, str]]:
    """(name, help) of every sub-command, in the order `aim --help` lists them."""
    (sub,) = (action for action in parser()._actions if isinstance(action, argparse._SubParsersAction))
    return [(choice.dest, choice.help or "") for choice in sub._choices_actions]


def glance() -> str:
    """The commands as the README's "CLI at a glance" shows them: one line each, `aim NAME  help`."""
    listed = commands()
    width = max(len(name) for name, _ in listed)
    return "\n".join(f"    aim {name.ljust(width)}  {text}".rstrip() for name, text in listed)


# Options whose value is free text that may start with "-" (`--focus "-import=100"`, a prompt
# "-x"): argparse would take such a value for an option, so "--focus VALUE" becomes "--focus=VALUE".
FREE_TEXT = ("--prompt", "--focus")

# OS errors that are the user's or the machine's, not the program's (a path missing, taken, unwritable
# or read-only, a full disk, a file-size limit), with what to do. Any other OSError is a bug and keeps
# its traceback.
_IN_THE_WAY = "a file or folder is in the way: pick another path, or move that one"
_NO_WRITE = "write somewhere you may write"
_NO_SPACE = "free some space (or raise the limit) and run again"
USER_ERRNOS = {
    errno.ENOENT: "check the path",
    errno.ENOTDIR: _IN_THE_WAY,
    errno.EISDIR: _IN_THE_WAY,
    errno.EEXIST: _IN_THE_WAY,
    errno.ENOTEMPTY: _IN_THE_WAY,
    errno.EACCES: _NO_WRITE,
    errno.EPERM: _NO_WRITE,
    errno.EROFS: _NO_WRITE,
    errno.ENOSPC: _NO_SPACE,
    errno.EDQUOT: _NO_SPACE,
    errno.EFBIG: _NO_SPACE,
    errno.ENAMETOOLONG: "use a shorter path",
    errno.ELOOP: "check the path's symbolic links",
}


def _free_text(argv: list[str]) -> list[str]:
    joined, args = [], iter(argv)
    for arg in args:
        value = next(args, None) if arg in FREE_TEXT else None
        joined.append(f"{arg}={value}" if value is not None else arg)
    return joined


def describe_os_error(error: OSError) -> str:
    """One line for an OS error on a user's path: what happened, where, and what to do."""
    where = " -> ".join(str(name) for name in (error.filename, error.filename2) if name is not None)
    what = error.strerror or errno.errorcode.get(error.errno, str(error))
    return f"{where + ': ' if where else ''}{what}: {USER_ERRNOS[error.errno]}"


def _stop(signum, frame):
    """Ctrl-C or SIGTERM (a timeout, a cancelled job): what this process has half-written is removed
    and it exits at once (130 for SIGINT, 143 for SIGTERM). Not by raising KeyboardInterrupt: raised
    where the signal lands, it is swallowed when that is a finalizer (a __del__), and the work goes on
    after a traceback."""
    remove_pending()
    os.write(2, b"interrupted\n")
    os._exit(128 + signum)


def main(argv: list[str] | None = None) -> int:
    args = parser().parse_args(_free_text(sys.argv[1:] if argv is None else list(argv)))
    handled = (signal.SIGINT, signal.SIGTERM) if threading.current_thread() is threading.main_thread() else ()
    # a signal the caller ignores (a background job's SIGINT) stays ignored
    previous = {
        number: signal.signal(number, _stop) for number in handled if signal.getsignal(number) is not signal.SIG_IGN
    }
    try:
        return args.func(args)
    except AimError as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    except OSError as error:
        if error.errno not in USER_ERRNOS:
            raise  # not a path or a machine limit: a bug, which keeps its traceback
        print(f"error: {describe_os_error(error)}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130
    finally:
        for number, handler in previous.items():
            signal.signal(number, handler)  # a caller in the same process (tests) gets its own back


if __name__ == "__main__":
    sys.exit(main())
