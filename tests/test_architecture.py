"""docs/architecture.md is the map a newcomer reads first: every path it names for what exists
today must exist (the section on coming features names places still to be made)."""
import re

from conftest import ROOT

PATH = re.compile(r"`((?:sonic|sonic_server|integrations|scripts|tests|docs|configs)/[^`\s]*)`")


def test_every_path_the_architecture_page_names_exists():
    text = (ROOT / "docs" / "architecture.md").read_text()
    today = text.split("## Where each coming feature goes")[0]
    named = set(PATH.findall(today))
    assert len(named) > 40
    missing = sorted(p for p in named if not (ROOT / p).exists())
    assert not missing, f"docs/architecture.md names paths that do not exist: {missing}"


def test_the_page_maps_live_sessions_on_workers_and_webhooks_and_says_where_url_inputs_go():
    page = (ROOT / "docs" / "architecture.md").read_text()
    today, coming = page.split("## Where each coming feature goes")
    assert all(name in today for name in ("relay.py", "remote.py", "host.py", "webhooks.py", "idempotency.py"))
    assert "Inputs by URL" in coming and "outbound.py" in today


def test_no_module_puts_folders_on_the_import_path_itself():
    """Scripts and tests import the installed package; the examples' client and the scripts'
    measures reach the tests through pytest.ini's `pythonpath`, and a script that needs them or
    the tests' helpers says which PYTHONPATH it runs with. A `sys.path.insert` let a script run
    the checkout's files beside a different installed package without a word."""
    found = []
    for folder in ("sonic", "sonic_server", "scripts", "tests", "examples", "integrations"):
        for path in (ROOT / folder).rglob("*.py"):
            if ".venv" in path.parts or path.name == "test_architecture.py":  # (this file names it)
                continue
            text = path.read_text(encoding="utf-8")
            if re.search(r"sys\.path\s*(\.insert|\.append|\.extend|\[|\+=|=)", text):
                found.append(str(path.relative_to(ROOT)))
    assert not found, found
