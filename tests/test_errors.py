"""The one piece of stderr hygiene every entry point installs: numba's exit-time KeyError is dropped,
nothing else is."""
import sys
import types

from hjepa.errors import _ignore_numba_finalizer_keyerror


def raised_in(filename, function_name, exc_type):
    namespace = {}
    exec(compile(f"def {function_name}():\n    raise {exc_type.__name__}('x')\n", filename, "exec"), namespace)
    try:
        namespace[function_name]()
    except exc_type as e:
        return types.SimpleNamespace(exc_type=exc_type, exc_value=e, exc_traceback=e.__traceback__,
                                     err_msg=None, object=None)


def test_numba_finalizer_keyerror_is_dropped_and_other_unraisables_pass_on(monkeypatch):
    passed_on = []
    monkeypatch.setattr(sys, "__unraisablehook__", passed_on.append)
    numba_noise = raised_in("/venv/site-packages/numba/core/dispatcher.py", "finalizer", KeyError)
    real_keyerror = raised_in("/repo/hjepa/data.py", "finalizer", KeyError)
    other_numba_error = raised_in("/venv/site-packages/numba/core/dispatcher.py", "finalizer", ValueError)
    for unraisable in (numba_noise, real_keyerror, other_numba_error):
        _ignore_numba_finalizer_keyerror(unraisable)
    assert passed_on == [real_keyerror, other_numba_error]
