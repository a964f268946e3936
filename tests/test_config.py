"""Configuration: file, then V2T_* environment, then flags; unknown keys and bad values name the key."""

from pathlib import Path

import pytest

from v2t_node.config import load
from v2t_node.errors import ConfigError


def test_defaults() -> None:
    c = load(env={})
    assert (c.api.host, c.api.port, c.redis.url, c.models.default) == ("127.0.0.1", 8750, "", "tiny.en")
    assert c.jobs.max_attempts == 3 and c.jobs.retry_initial == 1.0 and c.jobs.retry_max == 60.0
    assert c.jobs.heartbeat_timeout == 30.0 and c.jobs.attempt_timeout == 1800 and c.jobs.job_timeout == 7200
    assert [c.jobs.retry_delay(n) for n in (1, 2, 3, 7, 8)] == [1, 2, 4, 60, 60]
    assert c.pool.sizes(cores=2) == (1, 2) and c.pool.sizes(cores=16) == (14, 1) and c.pool.sizes(cores=1) == (1, 1)
    assert c.client_url == "http://127.0.0.1:8750"


def test_precedence_file_env_flags(tmp_path: Path) -> None:
    f = tmp_path / "v2t.toml"
    f.write_text('[api]\nport = 9000\nhost = "127.0.0.2"\n[jobs]\nmax_attempts = 7\n[pool]\nthreads = 3\n')
    c = load(f, env={"V2T_API_PORT": "9001", "V2T_POOL_THREADS": "4"}, overrides={"api": {"port": 9002}})
    assert (c.api.port, c.api.host, c.jobs.max_attempts, c.pool.threads) == (9002, "127.0.0.2", 7, 4)
    assert load(env={"V2T_CONFIG": str(f)}).api.port == 9000


@pytest.mark.parametrize(
    ("env", "overrides", "message"),
    [
        ({"V2T_API_PORT": "eighty"}, {}, "api.port"),
        ({}, {"api": {"port": 70000}}, "api.port"),
        ({}, {"pool": {"processes": -1}}, "pool.processes"),
        ({}, {"jobs": {"heartbeat_timeout": 0}}, "jobs.heartbeat_timeout"),
        ({}, {"api": {"colour": "red"}}, "unknown field `colour`"),
        ({"V2T_BOGUS_KEY": "1"}, {}, "V2T_BOGUS_KEY"),
        ({}, {"node": {"log_level": "loud"}}, "node.log_level"),
        ({}, {"redis": {"url": "http://x"}}, "redis.url"),
        ({}, {"api": {"host": "0.0.0.0"}}, "api.token"),
    ],
)
def test_bad_values_name_the_key(env: dict[str, str], overrides: dict, message: str) -> None:
    with pytest.raises(ConfigError, match=message.replace(".", r"\.").replace("`", ".")):
        load(env=env, overrides=overrides)


def test_bad_file(tmp_path: Path) -> None:
    f = tmp_path / "bad.toml"
    f.write_text("[api\nport=1")
    with pytest.raises(ConfigError, match="not valid TOML"):
        load(f, env={})
    with pytest.raises(ConfigError, match="cannot read config file"):
        load(tmp_path / "missing.toml", env={})


def test_token_file_and_public_bind(tmp_path: Path) -> None:
    token = tmp_path / "token"
    token.write_text("s3cret\n")
    c = load(env={"V2T_API_HOST": "0.0.0.0", "V2T_API_TOKEN_FILE": str(token)})
    assert c.api_token == "s3cret" and c.client_url == "http://127.0.0.1:8750"


def test_data_dir_defaults(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.delenv("STATE_DIRECTORY", raising=False)
    monkeypatch.setenv("XDG_DATA_HOME", str(tmp_path / "xdg"))
    c = load(env={})
    assert c.data_dir == tmp_path / "xdg" / "v2t-node"
    assert c.models_dir == c.data_dir / "models" and c.storage_dir == c.data_dir / "objects"
    monkeypatch.setenv("STATE_DIRECTORY", "/var/lib/v2t-node")  # systemd's StateDirectory=
    assert load(env={}).data_dir == Path("/var/lib/v2t-node")
