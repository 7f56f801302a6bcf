"""families/ and covstructs/ install as tmbx.families and tmbx.covstructs (package-dir
mapping), from a built wheel as well as from the source tree; never as top-level packages."""

import os
import subprocess
import sys
import zipfile

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_plugin_libraries_import_under_tmbx():
    import tmbx.covstructs
    import tmbx.families

    assert tmbx.families.__name__ == "tmbx.families"
    assert tmbx.covstructs.__name__ == "tmbx.covstructs"
    assert "families" not in sys.modules and "covstructs" not in sys.modules


def test_a_python_started_in_the_checkout_finds_the_plugin_libraries():
    # sys.path[0] == "" (python -c in the repository's root) imports ./tmbx, not the installed copy
    code = "import tmbx, tmbx.families, tmbx.covstructs; print(tmbx.families.__name__, len(tmbx.load_dataset('cbpp')))"
    res = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT,
                         env={k: v for k, v in os.environ.items() if k != "PYTHONPATH"})
    assert res.returncode == 0, res.stderr[-2000:]
    assert res.stdout.split() == ["tmbx.families", "56"]


def test_built_wheel_maps_the_plugin_libraries(tmp_path):
    out = subprocess.run(
        [sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-q", "-w", str(tmp_path), ROOT],
        capture_output=True, text=True,
    )
    if out.returncode != 0:
        pytest.skip(f"could not build a wheel here: {out.stderr[-500:]}")
    wheel = next(p for p in os.listdir(tmp_path) if p.endswith(".whl"))
    names = zipfile.ZipFile(tmp_path / wheel).namelist()
    assert any(n.startswith("tmbx/families/") for n in names)
    assert any(n.startswith("tmbx/covstructs/") for n in names)
    assert any(n.startswith("tmbx/data/") and n.endswith(".csv") for n in names)
    assert not any(n.startswith(("families/", "covstructs/")) for n in names)
    target = tmp_path / "site"
    subprocess.run([sys.executable, "-m", "pip", "install", "--no-deps", "-q", "--target", str(target),
                    str(tmp_path / wheel)], check=True)
    code = ("import sys; sys.path.insert(0, sys.argv[1]); import tmbx, tmbx.families, tmbx.covstructs; "
            "assert tmbx.__file__.startswith(sys.argv[1]), tmbx.__file__; "
            "print(len(tmbx.load_dataset('cbpp')))")
    res = subprocess.run([sys.executable, "-c", code, str(target)], capture_output=True, text=True, cwd=str(tmp_path))
    assert res.returncode == 0, res.stderr[-2000:]
    assert res.stdout.strip() == "56"
