"""User-facing errors: one clear line and exit status 1. Anything else is a bug and keeps its traceback."""
import functools
import sys
import traceback


class UserError(Exception):
    """A mistake the user can fix (bad path, bad config, missing class). Printed as one line, exit 1."""


def exit_on_user_error(main):
    """Wrap an entry point so a UserError prints `error: <message>` to stderr and exits with status 1."""

    @functools.wraps(main)
    def wrapped(*args, **kwargs):
        sys.unraisablehook = _ignore_numba_finalizer_keyerror
        try:
            return main(*args, **kwargs)
        except UserError as e:
            print(f"error: {e}", file=sys.stderr, flush=True)
            sys.exit(1)

    return wrapped


def _ignore_numba_finalizer_keyerror(unraisable):
    """Drop exactly the KeyError numba's dispatcher finalizer raises at interpreter exit (harmless,
    ../shared/notes/stack.md pitfall 8) so it cannot bury a real error in a log; pass on the rest."""
    frames = traceback.extract_tb(unraisable.exc_traceback) if unraisable.exc_traceback else []
    if unraisable.exc_type is KeyError and any(
            "numba" in frame.filename and frame.name == "finalizer" for frame in frames):
        return
    sys.__unraisablehook__(unraisable)
