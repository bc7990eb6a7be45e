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
        install_unraisable_filter()
        try:
            return main(*args, **kwargs)
        except UserError as e:
            print(f"error: {e}", file=sys.stderr, flush=True)
            sys.exit(1)

    return wrapped


def is_numba_finalizer_keyerror(unraisable):
    """The KeyError numba's dispatcher finalizer raises at interpreter exit: harmless
    (it fires only while the interpreter shuts down), but it can bury a real error in a log."""
    frames = traceback.extract_tb(unraisable.exc_traceback) if unraisable.exc_traceback else []
    return unraisable.exc_type is KeyError and any(
        "numba" in frame.filename and frame.name == "finalizer" for frame in frames)


def install_unraisable_filter():
    """Drop exactly that message; everything else goes to the hook that was there before (once)."""
    previous = sys.unraisablehook
    if getattr(previous, "drops_numba_finalizer_keyerror", False):
        return

    def hook(unraisable):
        if not is_numba_finalizer_keyerror(unraisable):
            previous(unraisable)

    hook.drops_numba_finalizer_keyerror = True
    sys.unraisablehook = hook
