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


def test_the_sonic_decoder_without_its_extra_names_what_to_install():
    """Without the [gpu] extra (diffusers), asking for the sonic decoder was a ModuleNotFoundError."""
    code = ("import sys\n"
            "class NoDiffusers:\n"
            "    def find_spec(self, name, path=None, target=None):\n"
            "        if name.split('.')[0] == 'diffusers':\n"
            "            raise ModuleNotFoundError(f'No module named {name!r}', name=name)\n"
            "sys.meta_path.insert(0, NoDiffusers())\n"
            "import sonic\n"
            "try:\n"
            "    sonic.load_pipeline({'decoder': 'sonic'})\n"
            "except sonic.SonicError as e:\n"
            "    print(e.code, e)\n")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd="/", timeout=60)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == ('setup_failed the sonic decoder needs diffusers, not installed: '
                                  'pip install "sonic-talking-head[gpu]" (or the requirements file)'), out.stdout


SERVER_MODULES = ("sonic_server", "flask", "werkzeug", "waitress", "redis", "rq", "boto3", "sqlalchemy", "jwt",
                  "prometheus_client")


def test_the_library_renders_without_loading_any_server_module(tmp_path):
    """`pip install sonic-talking-head` alone renders from Python: a real render (the bundled
    portrait, half a second of its speech) loads none of the service's modules or packages."""
    out_path = tmp_path / "lib.mp4"
    code = (
        "import os, sys, sonic\n"
        "settings = sonic.load_settings()\n"
        "with sonic.load_pipeline(settings) as pipe:\n"
        "    opts = sonic.GenerateOptions.from_dict({'min_resolution': 256, 'duration': 0.5}, settings)\n"
        f"    result = pipe({str(ROOT / 'examples' / 'portrait.jpg')!r}, {str(ROOT / 'examples' / 'speech.flac')!r}, "
        f"opts, out_path={str(out_path)!r})\n"
        "print(result.frames)\n"
        f"print(sorted(m for m in sys.modules if m.split('.')[0] in {SERVER_MODULES!r}))\n"
        # the with block closed the pipeline: its render helpers are gone
        "print(open(f'/proc/self/task/{os.getpid()}/children').read().split())\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd="/", timeout=180)
    assert out.returncode == 0, out.stderr[-2000:]
    frames, loaded, children = out.stdout.strip().splitlines()[-3:]
    assert int(frames) == 12 and out_path.stat().st_size > 1000
    assert loaded == "[]", f"server modules loaded by a library render: {loaded}"
    assert children == "[]", f"processes left after the with block: {children}"


def test_no_library_module_imports_the_server_package():
    """The layering: sonic/ names sonic_server only in the command dispatcher's table, which
    imports it by name when a server command is asked for."""
    import re
    offenders = []
    for path in (ROOT / "sonic").rglob("*.py"):
        for n, line in enumerate(path.read_text().splitlines(), 1):
            if re.match(r"\s*(from sonic_server|import sonic_server)", line):
                offenders.append(f"{path.relative_to(ROOT)}:{n}")
    assert not offenders, offenders


def test_a_type_checker_sees_every_name_the_package_exports():
    """The names load on first use (a module __getattr__), which a type checker cannot follow:
    each is imported under TYPE_CHECKING too (a user's `from sonic import load_pipeline` was Any)."""
    import ast

    import sonic

    tree = ast.parse((ROOT / "sonic" / "__init__.py").read_text())
    block = next(node for node in tree.body if isinstance(node, ast.If) and getattr(node.test, "id", "") == "TYPE_CHECKING")
    seen = {alias.name for node in block.body if isinstance(node, ast.ImportFrom) for alias in node.names}
    assert seen == set(sonic.__all__)
    from importlib import metadata

    assert sonic.__version__ == metadata.version("sonic-talking-head")  # as pip knows it
