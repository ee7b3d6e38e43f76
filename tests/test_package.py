"""The installable package: every package folder ships, the library never imports flask."""
import subprocess
import sys
import tomllib

from conftest import ROOT


def test_every_package_folder_is_listed_in_pyproject():
    listed = set(tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["setuptools"]["packages"])
    found = {".".join(p.parent.relative_to(ROOT).parts)
             for top in ("sonic", "sonic_server") for p in (ROOT / top).rglob("__init__.py")}
    assert found - listed == set(), "add these to [tool.setuptools] packages in pyproject.toml"


def test_library_imports_no_web_framework_and_no_model():
    """What a web process needs from the library (settings, options, input checks) loads
    without flask and without the face detector."""
    code = ("import sys, sonic; from sonic.settings import load_settings; from sonic.options import schema; "
            "from sonic.checks import check_inputs; from sonic.decoders import get_decoder; get_decoder('warp'); "
            "schema(load_settings()); print(sorted(m for m in ('flask', 'mediapipe', 'torch') if m in sys.modules))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd="/", timeout=60)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "[]"
