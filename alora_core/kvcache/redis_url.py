"""--redis-url -> the KVClient it names (redis_client.py, redis_cluster.py).

    redis://[user:password@]host:port/db, rediss://..., unix:///path    one standalone Redis
    redis+sentinel://[user:password@]h:p,h:p/<master set>[/db]        the master a Sentinel set names
    redis+cluster://[user:password@]h:p,h:p                            a Redis Cluster (seed nodes)
    rediss+sentinel://, rediss+cluster://                              the same over TLS

Any number of Sentinels or seed nodes (default ports 26379 and 6379); the password (percent-encoded
if needed) is the data nodes', Sentinels are asked without one. `parse` checks a URL without
connecting (the settings call it); `connect` builds the client.
"""

from dataclasses import dataclass, field
from typing import Any, Literal
from urllib.parse import unquote

import redis
from redis.backoff import NoBackoff
from redis.retry import Retry
from redis.sentinel import Sentinel

from alora_core.kvcache.redis_client import REDIS_ERRORS, KVClient, RedisClient
from alora_core.kvcache.redis_cluster import ClusterClient

SCHEMES = ("redis", "rediss", "unix", "redis+sentinel", "rediss+sentinel", "redis+cluster", "rediss+cluster")


@dataclass(frozen=True)
class RedisTarget:
    kind: Literal["standalone", "sentinel", "cluster"]
    addresses: list[tuple[str, int]] = field(default_factory=list)  # Sentinels or seed nodes
    master_set: str = ""
    db: int = 0
    options: dict[str, Any] = field(default_factory=dict)  # username, password, ssl


def parse(url: str) -> RedisTarget:
    """What a Redis URL names; ValueError with the expected form when it is malformed."""
    scheme, sep, rest = url.partition("://")
    if not sep or scheme not in SCHEMES:
        raise ValueError(
            f"unsupported Redis URL {url!r}: use redis://host:port/db, rediss://, unix:///path, "
            "redis+sentinel://host:port,host:port/<master set>/<db> or redis+cluster://host:port,host:port"
        )
    if scheme in ("redis", "rediss", "unix"):
        return RedisTarget("standalone")
    netloc, _, path = rest.partition("/")
    if "?" in netloc or "?" in path or "#" in rest:
        raise ValueError(f"query parameters are not supported in {url!r}")
    userinfo, _, hosts = netloc.rpartition("@")
    options: dict[str, Any] = {"ssl": True} if scheme.startswith("rediss") else {}
    if userinfo:
        user, has_password, password = userinfo.partition(":")
        if user:
            options["username"] = unquote(user)
        if has_password:
            options["password"] = unquote(password)
    path = path.strip("/")
    if scheme.endswith("+cluster"):
        if path not in ("", "0"):
            raise ValueError(f"a Redis Cluster has database 0 only: {url!r}")
        return RedisTarget("cluster", _addresses(hosts, 6379, url), options=options)
    name, _, db = path.partition("/")
    if not name or (db and not db.isdigit()):
        raise ValueError(
            f"a Sentinel URL names its master set: redis+sentinel://h:p,h:p/<name>/<db>, got {url!r}"
        )
    return RedisTarget("sentinel", _addresses(hosts, 26379, url), name, int(db or 0), options)


def _addresses(hosts: str, default_port: int, url: str) -> list[tuple[str, int]]:
    """host:port,host:port ([v6 address]:port too) -> [(host, port)], at least one."""
    found = []
    for part in filter(None, hosts.split(",")):
        host, colon, port = part.rpartition(":")
        if not colon or (host.count(":") and not host.endswith("]")):  # no port (a bare v6 address too)
            host, port = part, str(default_port)
        if not host or not port.isdigit():
            raise ValueError(f"bad host:port {part!r} in {url!r}")
        found.append((host.strip("[]"), int(port)))
    if not found:
        raise ValueError(f"no host in {url!r}")
    return found


def connect(url: str, timeout_s: float = 2.0) -> KVClient:
    """The client a --redis-url names. A bad URL, or a plain URL naming a Cluster node, raises
    ValueError; an unreachable Redis does not (the tier starts degraded and recovers on its own)."""
    target = parse(url)
    options: dict[str, Any] = {
        "socket_timeout": timeout_s,
        "socket_connect_timeout": timeout_s,
        "socket_read_size": 1 << 20,  # values are MBs: fewer, larger reads
        **target.options,
    }
    if target.kind == "cluster":
        return ClusterClient(target.addresses, options)
    if target.kind == "sentinel":
        sentinel_options = {k: v for k, v in options.items() if k.startswith("socket_") or k == "ssl"}
        sentinel = Sentinel(target.addresses, sentinel_kwargs=sentinel_options)
        master = sentinel.master_for(target.master_set, retry=Retry(NoBackoff(), 0), db=target.db, **options)
        return RedisClient(master, f"sentinel:{target.master_set}")
    client = redis.Redis.from_url(url, retry=Retry(NoBackoff(), 0), **options)
    kwargs = client.connection_pool.connection_kwargs
    node = kwargs.get("path") or f"{kwargs.get('host', 'localhost')}:{kwargs.get('port', 6379)}"
    _refuse_cluster_node(client, url)
    return RedisClient(client, str(node))


def _refuse_cluster_node(client: redis.Redis, url: str) -> None:
    """A plain URL naming a Redis Cluster node would serve only that node's slots (every other key
    answers MOVED): refused at start-up. Skipped when Redis is not reachable yet."""
    try:
        enabled = client.info("cluster").get("cluster_enabled")
    except REDIS_ERRORS:
        return
    if enabled:
        scheme = "rediss+cluster" if url.startswith("rediss") else "redis+cluster"
        raise ValueError(
            f"{url} is a Redis Cluster node: name the cluster as {scheme}://host:port[,host:port...] "
            "(docs/caching.md)"
        )
