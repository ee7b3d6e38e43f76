"""The container files, checked without Docker (no daemon on this project's machines): the compose
files against the Compose Specification's schema, every SONIC_* variable they and the Dockerfile
set against the settings, and the Dockerfile's promises (non-root, port 8080, health check)."""
import gzip
import json
import re

import pytest
import yaml
from jsonschema import Draft7Validator

from conftest import ROOT
from sonic.settings import SettingsError, read_yaml
from sonic_server.settings import settings_from

COMPOSE = ROOT / "deploy" / "compose.yaml"
COMPOSE_S3 = ROOT / "deploy" / "compose.s3.yaml"
DOCKERFILE = ROOT / "Dockerfile"


def compose_schema() -> dict:
    with gzip.open(ROOT / "tests" / "data" / "compose-spec.json.gz", "rt") as f:
        return json.load(f)


def load(path) -> dict:
    return yaml.safe_load(path.read_text())


def dockerfile_env() -> dict:
    text = DOCKERFILE.read_text().replace("\\\n", " ")
    env = {}
    for line in text.splitlines():
        if line.startswith("ENV "):
            env.update(dict(re.findall(r"(\w+)=(\S+)", line)))
    return env


@pytest.mark.parametrize("path", [COMPOSE, COMPOSE_S3], ids=["compose", "compose.s3"])
def test_the_compose_files_follow_the_compose_specification(path):
    errors = sorted(Draft7Validator(compose_schema()).iter_errors(load(path)), key=str)
    assert not errors, [f"{'/'.join(map(str, e.path))}: {e.message}" for e in errors]


def test_a_schema_violation_is_caught():
    broken = load(COMPOSE)
    broken["services"]["worker"]["comand"] = broken["services"]["worker"].pop("command")     # a typo
    assert list(Draft7Validator(compose_schema()).iter_errors(broken))


def test_every_variable_the_containers_set_is_a_setting_with_a_valid_value():
    base, s3 = load(COMPOSE), load(COMPOSE_S3)
    image = dockerfile_env()
    for service in ("api", "worker"):
        for env in (base["x-sonic"]["environment"], s3["services"][service]["environment"]):
            merged = {**image, **env}
            names = [k for k in merged if k.startswith("SONIC_")]
            settings = settings_from(read_yaml(None), env=merged)      # unknown values raise SettingsError
            assert settings.server.redis_url == "redis://redis:6379/0" and names
    s = settings_from(read_yaml(None), env={**image, **s3["services"]["worker"]["environment"]})
    assert (s.storage, s.s3.bucket, s.s3.endpoint_url) == ("s3", "sonic", "http://minio:9000")
    assert s.server.port == 8080 and s.server.host == "0.0.0.0" and s.output_dir == "/srv/sonic/outputs"
    with pytest.raises(SettingsError, match="storage"):                 # the check above can fail
        settings_from(read_yaml(None), env={"SONIC_STORAGE": "s4"})


def test_the_dockerfile_runs_waitress_on_8080_as_a_user_with_a_health_check():
    text = DOCKERFILE.read_text()
    assert re.search(r"^EXPOSE 8080$", text, re.M)
    user = re.findall(r"^USER (\S+)$", text, re.M)
    assert user and user[-1] not in ("root", "0")
    assert re.search(r"^HEALTHCHECK .*\n?.*127\.0\.0\.1:8080/health", text, re.M)
    cmd = json.loads(re.search(r"^CMD (\[.*\])$", text, re.M).group(1))
    assert cmd[0] == "waitress-serve" and "--listen=0.0.0.0:8080" in cmd
    module, _, factory = cmd[-1].partition(":")
    assert callable(getattr(__import__(module), factory))
    assert "pip install --no-cache-dir -r requirements.txt" in text and "torch==2.13.0" in text
    worker = load(COMPOSE)["services"]["worker"]["command"]
    assert worker[:2] == ["sonic", "worker"]
