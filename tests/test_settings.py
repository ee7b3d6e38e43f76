"""Settings: the YAML file, then SONIC_* variables, then flags; typed, paths resolved."""
import pytest
import yaml

from sonic.settings import SettingsError
from sonic_server.settings import load_settings, settings_from


def test_shipped_defaults_are_typed():
    s = load_settings(env={})
    assert isinstance(s.server.queue_size, int) and isinstance(s.limits.max_duration_s, float)
    assert s.server.cors_origins == ("loopback",) and s.defaults["fps"] == 25


def test_job_time_limit_and_output_limits_are_settings():
    s = load_settings(env={})
    assert s.server.job_timeout_s == 900.0 and isinstance(s.server.job_timeout_s, float)
    assert s.limits.max_output_pixels == 2048 * 2048 and s.limits.max_output_pixel_frames == 12_000_000_000
    # the longest clip at the largest short side and the default frame rate fits, 4:3 or 3:4
    assert 1024 * 1368 * 300 * 25 <= s.limits.max_output_pixel_frames
    s = load_settings(env={"SONIC_JOB_TIMEOUT_S": "30", "SONIC_MAX_OUTPUT_PIXELS": "1000000"})
    assert (s.server.job_timeout_s, s.limits.max_output_pixels) == (30.0, 1_000_000)
    with pytest.raises(SettingsError, match='server.job_timeout_s must be a number, got "soon"'):
        settings_from({"server": {"job_timeout_s": "soon"}})


def test_layers_file_then_environment_then_flags(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    f = tmp_path / "s.yaml"
    f.write_text(yaml.safe_dump({"server": {"port": 6000, "queue_size": 2}, "defaults": {"seed": 3}}))
    s = load_settings(f, env={})
    assert (s.server.port, s.server.queue_size, s.defaults["seed"]) == (6000, 2, 3)
    assert s.defaults["fps"] == 25 and s.server.sync_wait_s == 120    # the rest keeps the shipped values
    s = load_settings(f, env={"SONIC_PORT": "6001", "SONIC_MAX_DURATION_S": "60", "SONIC_CORS_ORIGINS": "http://a, https://b:8443"})
    assert (s.server.port, s.limits.max_duration_s, s.server.cors_origins) == (6001, 60.0, ("http://a", "https://b:8443"))
    assert load_settings(f, env={"SONIC_CORS_ORIGINS": "loopback,https://app.example"}).server.cors_origins == (
        "loopback", "https://app.example")
    assert load_settings(f, env={"SONIC_CORS_ORIGINS": "http://[::1]:3000,http://localhost,https://xn--bcher-kva.example"}
                         ).server.cors_origins[0] == "http://[::1]:3000"
    # an origin written as a URL never equals what a browser sends: said at the start
    for wrong in ("https://app.example/", "https://app.example/page", "app.example", "https://*.app.example",
                  "https://app.example:99999", "https://u:p@app.example", "http://a:b", "https://bücher.example"):
        with pytest.raises(SettingsError, match="cors_origins: .* is not an origin"):
            load_settings(f, env={"SONIC_CORS_ORIGINS": wrong})
    s = load_settings(f, env={"SONIC_PORT": "6001"}, flags={"server.port": 6002, "server.host": None})
    assert s.server.port == 6002 and s.server.host == "127.0.0.1"
    assert load_settings(f, env={}, flags={"render_processes": 0}).render_processes == 0
    with pytest.raises(SettingsError, match="render_processes must be 64 or fewer"):  # 200 helpers: 8.5 GB
        load_settings(f, env={"SONIC_RENDER_PROCESSES": "200"})
    with pytest.raises(SettingsError, match="device must be one of"):
        load_settings(f, env={}, flags={"device": "gpu"})
    with pytest.raises(SettingsError, match="unknown setting server.prot"):
        load_settings(f, env={}, flags={"server.prot": 1})


def test_a_bare_string_is_a_one_item_list():
    assert settings_from({"server": {"cors_origins": "*"}}).server.cors_origins == ("*",)
    assert settings_from({"server": {"api_keys": "k1, k2"}}).server.api_keys == ("k1", "k2")


def test_api_keys_variable_adds_to_the_file():
    s = settings_from({"server": {"api_keys": ["k1"]}}, env={"SONIC_API_KEYS": "k2, k3"})
    assert s.server.api_keys == ("k1", "k2", "k3")


def test_relative_paths_resolve_against_the_working_directory(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    s = load_settings(env={"SONIC_OUTPUT_DIR": "videos", "SONIC_DATA_DIR": "state"})
    assert s.output_dir == str(tmp_path / "videos") and s.server.data_dir == str(tmp_path / "state")
    assert s.server.upload_dir == str(tmp_path / "uploads")
    s = settings_from({"server": {"data_dir": "state"}})
    assert s.server.jobs_db is None and s.server.jobs_db_path == str(tmp_path / "state" / "jobs.sqlite3")
    assert settings_from({"server": {"jobs_db": ""}}).server.jobs_db_path == ""           # in memory
    assert settings_from({"server": {"jobs_db": "/x/j.db"}}).server.jobs_db_path == "/x/j.db"


@pytest.mark.parametrize("raw, env, needle", [
    ({"server": {"queue_size": "many"}}, {}, 'server.queue_size must be a whole number, got "many"'),
    ({"server": {"queue_sise": 3}}, {}, "unknown setting server.queue_sise"),
    ({"output": "x"}, {}, "unknown setting output"),
    ({"live": {"host_adresses": []}}, {}, r"unknown setting live.host_adresses \(did you mean host_addresses\?"),
    ({"webhook": {}}, {}, r"did you mean webhooks\?"),
    ({1: 2, "a": 3}, {}, "unknown setting 1 "),                     # YAML keys that are numbers
    ({"POSITIVE": ["port"]}, {}, r"unknown setting POSITIVE \(known: allow_unsafe_pickle,"),  # a table, not a setting
    ({}, {"SONIC_PORT": "80a"}, 'SONIC_PORT must be a whole number, got "80a"'),
    ({"limits": {"max_upload_mb": True}}, {}, "limits.max_upload_mb must be a number, got true"),
    ({"live": {"max_sessions": None}}, {}, "live.max_sessions must be a whole number, got null"),
    ({"server": {"cors_origins": 5}}, {}, "server.cors_origins must be a list, got 5"),
    ({"defaults": [1]}, {}, "defaults must be a mapping"),
    ({}, {"SONIC_DEVICE": "gpu"}, "device must be one of auto, cpu, cuda"),
    ({"live": {"public_host": "example.org"}}, {}, "live.public_host must be an IP address"),
    ({}, {"SONIC_WEBHOOK_SECRET": "whsec_not*base64"}, "must be base64"),
    # a TURN secret with no TURN URL to make credentials for; relay with nothing to relay through
    ({}, {"SONIC_LIVE_TURN_SECRET": "s" * 16}, "live.turn_secret is set, but live.ice_servers names no turn: URL with"),
    ({"live": {"turn_secret": "s" * 16, "ice_servers": ["turn:u:p@10.0.0.1:3478"]}}, {}, "names no turn: URL without"),
    # a page's one credential is enough to guess a short secret offline
    ({"live": {"turn_secret": "hunter2", "ice_servers": ["turn:10.0.0.1:3478"]}}, {},
     "live.turn_secret must be at least 16 bytes, got 7"),
    ({"live": {"ice_transport_policy": "relay", "ice_servers": ["stun:10.0.0.1:3478"]}}, {},
     "live.ice_transport_policy is relay, but live.ice_servers names no turn: URL"),
    ({}, {"SONIC_LIVE_ICE_TRANSPORT_POLICY": "Relay"}, 'ice_transport_policy must be one of all, relay, got "Relay"'),
    # a TURN URL without credentials and no secret to make them: every client's connection refused it
    ({"live": {"ice_servers": ["turn:10.0.0.1:3478"]}}, {}, '"turn:10.0.0.1:3478" has no credentials: set live.turn_secret'),
    # what aiortc cannot parse stopped every session's open; a written password is not repeated
    ({"live": {"ice_servers": ["turn:u:hunter2@[::1]:3478"]}}, {}, r'"turn:u:\*\*\*@\[::1\]:3478" an IPv6 address cannot'),
    ({"live": {"ice_servers": ["TURN:u:hunter2@h:3478"]}}, {}, r'"TURN:u:\*\*\*@h:3478" is not a stun:, turn: or turns: URL'),
    ({"live": {"ice_servers": ["turn:u@h:3478"]}}, {}, "names a user without a password"),
    ({"live": {"ice_servers": ["turn:h:3478?transport=sctp"]}}, {}, r"is not stun:host\[:port\] or turn:host"),
    # a number out of range would refuse, fail or lose every request while the service says ready
    ({"server": {"queue_size": -3}}, {}, "server.queue_size must be a number more than 0, got -3"),
    ({"server": {"queue_size": 0}}, {}, "server.queue_size must be a number more than 0, got 0"),
    ({"server": {"output_ttl_s": -1}}, {}, "server.output_ttl_s must be a number 0 or more"),
    ({}, {"SONIC_MAX_UPLOAD_MB": "-1"}, "limits.max_upload_mb must be a number more than 0, got -1"),
    ({}, {"SONIC_MAX_DURATION_S": "nan"}, "limits.max_duration_s must be a number more than 0, got nan"),
    ({}, {"SONIC_MAX_DURATION_S": "inf"}, "limits.max_duration_s must be a number more than 0, got inf"),
    ({"server": {"rate_limit_per_s": 0}}, {}, "server.rate_limit_per_s must be a number more than 0"),
    ({}, {"SONIC_PORT": "70000"}, "server.port must be 1 to 65535"),
    ({}, {"SONIC_RENDER_PROCESSES": "-1"}, "render_processes must be a number 0 or more"),
    ({"defaults": {"fps": 500}}, {}, "defaults.fps: fps must be in"),
    ({"defaults": {"sead": 3}}, {}, "defaults.sead: no such parameter"),
    ({}, {"SONIC_DECODER": "wrap"}, 'decoder must be one of auto, warp, sonic, got "wrap"'),
    ({"server": {"rate_limit_burst": 0.5}}, {}, "server.rate_limit_burst must be at least 1"),
    ({"credits": {"ledger_page": 0}}, {}, "credits.ledger_page must be at least 1, got 0"),
    ({"credits": {"recharge_burst": 0.5}}, {}, "credits.recharge_burst must be at least 1, got 0.5"),
    ({}, {"SONIC_LIVE_MAX_SPEAK_S": "0"}, "live.max_speak_s must be a number more than 0"),
    # the Redis client's own refusal was a traceback at start; the URL's password is not repeated
    ({}, {"SONIC_REDIS_URL": "http://:pw@127.0.0.1:6379"}, r"redis_url must start with redis://, rediss://, unix:// "
                                                          r"\(e.g. redis://127.0.0.1:6379/0\), got http://$"),
    ({"server": {"redis_url": "127.0.0.1:6379"}}, {}, "redis_url must start with .*, got no scheme"),
])
def test_bad_settings_are_named(raw, env, needle):
    with pytest.raises(SettingsError, match=needle):
        settings_from(raw, env=env)


def test_a_default_of_none_where_the_parameter_has_none_is_taken():
    assert settings_from({"defaults": {"duration": None, "fps": 30}}).defaults["fps"] == 30


def test_bad_settings_file_is_named(tmp_path):
    with pytest.raises(SettingsError, match="not found"):
        load_settings(tmp_path / "missing.yaml", env={})
    with pytest.raises(SettingsError, match="cannot be read: Is a directory"):
        load_settings(tmp_path, env={})
    (tmp_path / "bad.yaml").write_text("server: [1, 2\n")
    with pytest.raises(SettingsError, match="not valid YAML"):
        load_settings(tmp_path / "bad.yaml", env={})


def test_an_output_ttl_of_0_keeps_videos_and_records_and_a_sweep_says_what_it_deleted(tmp_path, caplog):
    from sonic_server.expiry import OutputExpiry
    from sonic_server.jobs import SUCCEEDED, JobRecord
    from sonic_server.store import MemoryStore

    caplog.set_level("INFO", "sonic.jobs")
    video = tmp_path / "old.mp4"
    video.write_bytes(b"x")
    store = MemoryStore()
    rec = JobRecord.new("generate", {})
    rec.status, rec.finished = SUCCEEDED, video.stat().st_mtime
    store.save(rec)
    later = video.stat().st_mtime + 10 * 86400
    OutputExpiry(store, tmp_path, 0).sweep(now=later)
    assert video.exists() and store.load(rec.id) is not None
    assert "expired" not in caplog.text
    OutputExpiry(store, tmp_path, 86400).sweep(now=later)
    assert not video.exists() and store.load(rec.id) is None
    # a status URL that now answers 404 has its reason in the log (an upgrade from a release that
    # kept records deleted a whole history at its first sweep, silently)
    assert "expired 1 finished job records and 1 videos older than server.output_ttl_s (86400 s)" in caplog.text


@pytest.mark.parametrize("setting", ["output_dir", "server.upload_dir", "server.data_dir"])
def test_a_folder_that_cannot_be_written_stops_the_start_naming_its_setting(tmp_path, setting):
    """Every job would render, then fail (or the database not open): the start says which."""
    from sonic.errors import SetupError
    from sonic_server.storage import open_storage

    (tmp_path / "a-file").write_text("")
    section, _, name = setting.rpartition(".")
    folders = {"output_dir": str(tmp_path / "o"), "server": {"upload_dir": str(tmp_path / "u"),
                                                             "data_dir": str(tmp_path / "d")}}
    (folders[section] if section else folders)[name] = str(tmp_path / "a-file" / "inside")
    with pytest.raises(SetupError, match=f"setting {setting}: the folder .* cannot be written: Not a directory"):
        open_storage(settings_from(folders))
    folders = {"output_dir": str(tmp_path / "o"), "server": {"upload_dir": str(tmp_path / "u"),
                                                             "data_dir": str(tmp_path / "d")}}
    open_storage(settings_from(folders))
    assert (tmp_path / "o").is_dir() and (tmp_path / "u").is_dir()


def test_the_checkpoints_variable_is_the_one_the_docs_name(tmp_path):
    """SONIC_CHECKPOINTS (docs/gpu.md, the set-up error's advice); it was SONIC_SONIC_CHECKPOINTS."""
    from sonic.settings import settings_from as library_settings
    for load in (library_settings, settings_from):
        assert load({}, env={"SONIC_CHECKPOINTS": str(tmp_path)}).sonic_checkpoints == str(tmp_path)


def test_the_library_names_a_misspelt_variable_too_and_no_server_variable_is_close_to_its_own(caplog):
    """`sonic generate` loads only the library's settings: a misspelt SONIC_MAX_DURATON_S was
    silently ignored there. It knows no server name, so none may be close to its own."""
    import dataclasses
    import difflib
    from sonic.settings import Settings, env_vars, settings_from as library_settings
    library_settings({}, env={"SONIC_MAX_DURATON_S": "1", "SONIC_QUEUE_SIZE": "8"})
    told = [r.getMessage() for r in caplog.records if r.name == "sonic.settings"]
    assert told == ["SONIC_MAX_DURATON_S is not a setting (ignored); did you mean SONIC_MAX_DURATION_S?"]
    from sonic_server.settings import ServerConfig
    library = env_vars(Settings)
    assert {f.name for f in dataclasses.fields(Settings)} <= {f.name for f in dataclasses.fields(ServerConfig)}
    close = {v: difflib.get_close_matches(v, library, n=1, cutoff=0.85) for v in env_vars(ServerConfig) - library}
    assert not {v: c for v, c in close.items() if c}


def test_a_misspelt_variable_is_named_with_the_setting_it_is_close_to(caplog):
    # a section's name written in too: the server's variables have none (SONIC_SERVER_REDIS_URL
    # left the service in single-process mode, unsaid); other tools' variables are left alone
    settings_from({}, env={"SONIC_WEBHOOKS_SECRET": "x", "SONIC_QUEUE_SIZ": "8", "SONIC_PYTHON": "/usr/bin/python3",
                           "SONIC_SERVER_REDIS_URL": "redis://127.0.0.1:1/0", "SONIC_SERVER_NAME": "x"})
    told = sorted(r.getMessage() for r in caplog.records if r.name == "sonic.settings")
    assert told == ["SONIC_QUEUE_SIZ is not a setting (ignored); did you mean SONIC_QUEUE_SIZE?",
                    "SONIC_SERVER_REDIS_URL is not a setting (ignored); did you mean SONIC_REDIS_URL?",
                    "SONIC_WEBHOOKS_SECRET is not a setting (ignored); did you mean SONIC_WEBHOOK_SECRET?"]


def test_a_single_service_with_no_live_session_to_give_does_not_start(tmp_path):
    """live.max_sessions 0 on `sonic serve` (a worker takes it for "hosts none"): every session was
    refused as busy, with a Retry-After its clients followed for ever. Live mode off is said so."""
    from server_helpers import FakePipeline
    from server_helpers import settings as test_settings

    from sonic.errors import SetupError
    from sonic_server import create_app

    cfg = test_settings(tmp_path)
    cfg["live"]["max_sessions"] = 0
    with pytest.raises(SetupError, match=r"live.max_sessions is 0: .* set live.enabled: false"):
        create_app(cfg, pipeline=FakePipeline())
    cfg["live"]["enabled"] = False
    create_app(cfg, pipeline=FakePipeline()).extensions["sonic"].queue.close()
