"""User-facing errors: one clear line and exit status 1. Anything else is a bug and keeps its traceback."""
import functools
import sys


class UserError(Exception):
    """A mistake the user can fix (bad path, bad config, missing class). Printed as one line, exit 1."""


def exit_on_user_error(main):
    """Wrap an entry point so a UserError prints `error: <message>` to stderr and exits with status 1."""

    @functools.wraps(main)
    def wrapped(*args, **kwargs):
        try:
            return main(*args, **kwargs)
        except UserError as e:
            print(f"error: {e}", file=sys.stderr, flush=True)
            sys.exit(1)

    return wrapped
