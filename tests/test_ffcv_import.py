"""hjepa's package import hook: ffcv imports without numba compiling a typed dict, and numba is left as it was."""
import json
import subprocess
import sys

CHECK = """
import json, sys
import hjepa
import numba.typed, numba.typed.typeddict as typeddict
import ffcv
from ffcv.fields.rgb_image import IMAGE_MODES
print(json.dumps({
    "image_modes": dict(IMAGE_MODES), "plain_dict": type(IMAGE_MODES) is dict,
    "typed_dict_setitem_compiled_for": [str(s) for s in typeddict._setitem.signatures],
    "numba_typed_dict_restored": numba.typed.Dict is typeddict.Dict,
    "hook_left_in_meta_path": any(type(f).__module__ == "hjepa" for f in sys.meta_path),
}))
"""


def test_ffcv_imported_after_hjepa_gets_plain_image_modes_and_compiles_no_typed_dict():
    # A fresh process: the pytest process imported ffcv long ago. Without `import hjepa` the same
    # script reports one compiled signature, (DictType(unicode_type, int64), unicode_type, int64).
    done = subprocess.run([sys.executable, "-c", CHECK], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    assert json.loads(done.stdout) == {
        "image_modes": {"jpg": 0, "raw": 1}, "plain_dict": True, "typed_dict_setitem_compiled_for": [],
        "numba_typed_dict_restored": True, "hook_left_in_meta_path": False}
