"""The one piece of stderr hygiene every entry point installs: numba's exit-time KeyError is dropped,
nothing else is."""
import sys
import types

from hjepa.errors import install_unraisable_filter, is_numba_finalizer_keyerror


def raised_in(filename, function_name, exc_type):
    namespace = {}
    exec(compile(f"def {function_name}():\n    raise {exc_type.__name__}('x')\n", filename, "exec"), namespace)
    try:
        namespace[function_name]()
    except exc_type as e:
        return types.SimpleNamespace(exc_type=exc_type, exc_value=e, exc_traceback=e.__traceback__,
                                     err_msg=None, object=None)


NUMBA_FILE = "/venv/site-packages/numba/core/dispatcher.py"


def test_only_numbas_finalizer_keyerror_counts_as_noise():
    assert is_numba_finalizer_keyerror(raised_in(NUMBA_FILE, "finalizer", KeyError))
    assert not is_numba_finalizer_keyerror(raised_in("/repo/hjepa/loaders.py", "finalizer", KeyError))
    assert not is_numba_finalizer_keyerror(raised_in(NUMBA_FILE, "finalizer", ValueError))


def test_filter_passes_everything_else_to_the_previous_hook_and_installs_once(monkeypatch):
    passed_on = []
    monkeypatch.setattr(sys, "unraisablehook", passed_on.append)
    install_unraisable_filter()
    install_unraisable_filter()
    noise, real = raised_in(NUMBA_FILE, "finalizer", KeyError), raised_in("/repo/x.py", "f", KeyError)
    sys.unraisablehook(noise)
    sys.unraisablehook(real)
    assert passed_on == [real]
