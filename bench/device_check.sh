#!/usr/bin/env bash
# Every GPU figure in one call (bench/device_check.py --help): the repo's venv python (else python3), the
# repo on PYTHONPATH, an nvidia-smi summary first. Arguments go to device_check.py (--out, default
# device_check.json; --smoke for the CPU toy run; --sections; --budget-s).
#
#   bench/device_check.sh --bundle DIR   (on the machine with the venv) copy into DIR what a GPU machine
#                                        whose python has torch but not FFCV needs: ffcv, fastargs,
#                                        terminaltables and the shared libraries ffcv's C part links.
# A run uses $DEVICE_CHECK_BUNDLE (default <repo>/.device_bundle) when that folder exists.
set -euo pipefail
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
python="$root/.venv/bin/python"
[ -x "$python" ] || python="$(command -v python3)"

if [ "${1:-}" = "--bundle" ]; then
    dest="${2:?--bundle needs a folder}"
    mkdir -p "$dest/site" "$dest/lib"
    site="$("$python" -c 'import ffcv, os; print(os.path.dirname(os.path.dirname(ffcv.__file__)))')"
    cp -r "$site/ffcv" "$site/fastargs" "$site/terminaltables" "$dest/site/"
    find "$dest/site" -name __pycache__ -prune -exec rm -rf {} +
    # ffcv's extension calls only PyModule_Create2 of the C API (a stable-ABI function), so one build
    # loads under any CPython 3: name it .abi3.so and a 3.12 interpreter imports it too.
    for so in "$dest"/site/ffcv/_libffcv.cpython-*.so; do mv "$so" "$dest/site/ffcv/_libffcv.abi3.so"; done
    # What it links (OpenCV core/imgproc, libturbojpeg and theirs), except the C/C++ runtimes and zlib,
    # which every Linux has in a newer version than a library built here needs.
    ldd "$dest/site/ffcv/_libffcv.abi3.so" | awk '/=> \// {print $3}' | while read -r lib; do
        case "$(basename "$lib")" in
            libc.so.*|libm.so.*|libstdc++.so.*|libgcc_s.so.*|libz.so.*|ld-linux*) ;;
            *) cp -L "$lib" "$dest/lib/" ;;
        esac
    done
    du -sh "$dest"
    exit 0
fi

bundle="${DEVICE_CHECK_BUNDLE:-$root/.device_bundle}"
pythonpath="$root"
if [ -d "$bundle/site" ]; then
    pythonpath="$bundle/site:$root"
    export LD_LIBRARY_PATH="$bundle/lib${LD_LIBRARY_PATH:+:$LD_LIBRARY_PATH}"
fi
if command -v nvidia-smi >/dev/null 2>&1; then
    nvidia-smi --query-gpu=name,memory.total,driver_version,clocks.max.sm,power.limit,pstate --format=csv || true
fi
export PYTHONPATH="$pythonpath${PYTHONPATH:+:$PYTHONPATH}"
export PYTHONUNBUFFERED=1
exec "$python" "$root/bench/device_check.py" "$@"
