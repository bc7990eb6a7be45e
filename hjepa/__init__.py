"""H-JEPA pretraining fed by FFCV.

Importing this package makes every later `import ffcv` about 5 s cheaper. ffcv 1.0.2's
ffcv/fields/rgb_image.py fills a numba typed Dict when it is imported (IMAGE_MODES = {"jpg": 0,
"raw": 1}), and numba compiles a typed dict's methods again in every process (numba issue #5713:
4.7 s of each process's start on a 2-core VM: every CLI, torchrun rank and test subprocess). FFCV
reads IMAGE_MODES from Python only (its decoders' generate_code and its writer; compiled code gets
the two ints), so a plain dict does the same job. The hook below swaps numba.typed.Dict for dict
while that one module runs, puts it back, and removes itself. It imports nothing but importlib:
processes that never touch ffcv pay nothing.
"""
import importlib.abc
import importlib.util
import sys

FFCV_MODULE_WITH_TYPED_DICT = "ffcv.fields.rgb_image"


class _PlainDictForFfcvImageModes(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path=None, target=None):
        if name != FFCV_MODULE_WITH_TYPED_DICT:
            return None
        sys.meta_path.remove(self)
        spec = importlib.util.find_spec(name)
        if spec is None or not hasattr(spec.loader, "exec_module"):  # another ffcv: import it as it is
            return spec
        run_module = spec.loader.exec_module

        def exec_module(module):
            import numba.typed

            typed_dict, numba.typed.Dict = numba.typed.Dict, dict
            try:
                run_module(module)
            finally:
                numba.typed.Dict = typed_dict

        spec.loader.exec_module = exec_module
        return spec


if FFCV_MODULE_WITH_TYPED_DICT not in sys.modules:
    sys.meta_path.insert(0, _PlainDictForFfcvImageModes())
