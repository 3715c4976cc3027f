"""What a Redis URL names: one server (``redis://``, ``rediss://``, ``unix://``), or a primary found through
Redis Sentinel::

    sentinel://[user:password@]host1:26379;sentinel://host2:26379;sentinel://host3:26379/0?master_name=belle

- one ``sentinel://host:port`` per sentinel, joined by ``;`` (kombu's form); the database after the last;
- ``master_name``: the name the sentinels monitor the primary under (``sentinel monitor NAME ...``);
- ``user:password@``: the primary's (and its replicas') credentials;
- ``sentinel_password`` (and ``sentinel_username``): the sentinels' own, when they have ``requirepass``;
- ``sentinels://``: TLS to the sentinels and the primary, with ``ssl_ca_certs``, ``ssl_certfile``,
  ``ssl_keyfile`` and ``ssl_cert_reqs`` as in a ``rediss://`` URL.

Clients made from such a URL ask the sentinels for the primary, and ask again whenever a connection to it
is lost or it answers READONLY (it was demoted): commands, Lua scripts and pub/sub follow a failover.
"""

from __future__ import annotations

import socket
from dataclasses import dataclass, field
from urllib.parse import parse_qsl, quote, unquote, urlsplit

SENTINEL_SCHEMES = ("sentinel", "sentinels")
DEFAULT_SENTINEL_PORT = 26379
TLS_OPTIONS = ("ssl_ca_certs", "ssl_certfile", "ssl_keyfile", "ssl_cert_reqs")
OPTIONS = ("master_name", "sentinel_password", "sentinel_username", *TLS_OPTIONS)
# How long one sentinel may take to answer before the next is asked.
SENTINEL_TIMEOUT_S = 1.0
# A primary whose host is gone (no reset from its kernel) is noticed within about 5 + 2 × 3 s of silence.
KEEPALIVE = {"socket_keepalive": True,
             "socket_keepalive_options": {option: value for name, value in (("TCP_KEEPIDLE", 5), ("TCP_KEEPINTVL", 2), ("TCP_KEEPCNT", 3))
                                          if (option := getattr(socket, name, None)) is not None}}


class RedisURLError(ValueError):
    """A Redis URL that cannot be used; the message says what is wrong with it."""


def is_sentinel_url(url: str) -> bool:
    return url.split("://", 1)[0].lower() in SENTINEL_SCHEMES


@dataclass(frozen=True)
class SentinelURL:
    sentinels: tuple[tuple[str, int], ...]
    master_name: str
    db: int = 0
    username: str | None = None
    password: str | None = None
    tls: bool = False
    options: dict[str, str] = field(default_factory=dict)

    @property
    def tls_options(self) -> dict[str, str]:
        return {name: self.options[name] for name in TLS_OPTIONS if name in self.options}

    def sentinel_kwargs(self, *, asynchronous: bool = False) -> dict:
        """How to reach the sentinels themselves: once each (redis-py would retry each with a back-off of
        seconds; the next sentinel is asked instead, and the caller's own retries ask them all again)."""
        if asynchronous:
            from redis.asyncio.retry import Retry
        else:
            from redis.retry import Retry
        from redis.backoff import NoBackoff

        kwargs: dict = {"socket_timeout": SENTINEL_TIMEOUT_S, "socket_connect_timeout": SENTINEL_TIMEOUT_S, "retry": Retry(NoBackoff(), 0)}
        if "sentinel_password" in self.options:
            kwargs["password"] = self.options["sentinel_password"]
        if "sentinel_username" in self.options:
            kwargs["username"] = self.options["sentinel_username"]
        if self.tls:
            kwargs.update(ssl=True, **self.tls_options)
        return kwargs

    def primary_kwargs(self) -> dict:
        """How to reach the primary, once the sentinels have named it."""
        kwargs: dict = {"db": self.db, **KEEPALIVE}
        if self.username is not None:
            kwargs["username"] = self.username
        if self.password is not None:
            kwargs["password"] = self.password
        if self.tls:
            kwargs.update(ssl=True, **self.tls_options)
        return kwargs

    def kombu(self) -> tuple[str, dict, dict | None]:
        """The broker URL, the transport options and ``broker_use_ssl`` of kombu's sentinel transport (as
        producer/sentinel_transport.py takes them)."""
        auth = ""
        if self.password is not None:
            auth = f"{quote(self.username or '', safe='')}:{quote(self.password, safe='')}@"
        elif self.username is not None:
            auth = f"{quote(self.username, safe='')}@"
        # One sentinel in the URL, all of them in the options: kombu would take more URLs as alternates (producer/sentinel_transport.py).
        host, port = self.sentinels[0]
        options = {"master_name": self.master_name, "sentinels": [list(s) for s in self.sentinels], "sentinel_kwargs": self.sentinel_kwargs(), **KEEPALIVE}
        return f"sentinel://{auth}{_host(host)}:{port}/{self.db}", options, (self.tls_options or {"ssl_cert_reqs": "required"}) if self.tls else None


def parse_sentinel_url(url: str) -> SentinelURL:
    parts = [part for part in url.split(";") if part.strip()]
    if not parts:
        raise RedisURLError("it names no sentinel")
    schemes = {part.split("://", 1)[0].lower() for part in parts}
    if len(schemes) > 1 or not schemes <= set(SENTINEL_SCHEMES):
        raise RedisURLError(f"every part of a sentinel URL starts with the same sentinel:// or sentinels://, not {sorted(schemes)}")
    sentinels: list[tuple[str, int]] = []
    credentials: set[tuple[str | None, str | None]] = set()
    paths: set[str] = set()
    options: dict[str, str] = {}
    for part in parts:
        pieces = urlsplit(part.strip())
        if not pieces.hostname:
            raise RedisURLError(f"{pieces.scheme}://{pieces.netloc} names no host")
        try:
            port = pieces.port or DEFAULT_SENTINEL_PORT
        except ValueError:
            raise RedisURLError(f"the port of {pieces.hostname} is not a number from 1 to 65535") from None
        sentinels.append((pieces.hostname, port))
        if pieces.username is not None or pieces.password is not None:
            credentials.add((unquote(pieces.username) if pieces.username else None, unquote(pieces.password) if pieces.password is not None else None))
        if pieces.path.strip("/"):
            paths.add(pieces.path.strip("/"))
        for name, value in parse_qsl(pieces.query, keep_blank_values=True):
            if name not in OPTIONS:
                raise RedisURLError(f"unknown option {name!r}; a sentinel URL takes {', '.join(OPTIONS)}")
            if options.setdefault(name, value) != value:
                raise RedisURLError(f"option {name!r} is given twice, differently")
    if len(credentials) > 1:
        raise RedisURLError("its parts carry different user:password@; give the primary's credentials once, on the first sentinel")
    if len(paths) > 1:
        raise RedisURLError(f"its parts name different databases {sorted(paths)}; give the database once, after the last sentinel")
    db_text = paths.pop() if paths else "0"
    if not db_text.isdigit():
        raise RedisURLError(f"the database {db_text!r} is not a number")
    master_name = options.pop("master_name", "")
    if not master_name:
        raise RedisURLError("it does not say which primary to ask the sentinels for: add ?master_name=NAME "
                            "(the NAME of `sentinel monitor NAME host port quorum`)")
    username, password = credentials.pop() if credentials else (None, None)
    return SentinelURL(tuple(sentinels), master_name, int(db_text), username, password, schemes.pop() == "sentinels", options)


def sentinel_primary(url: SentinelURL, *, asynchronous: bool = False, **connection_kwargs):
    """A redis-py client of the primary that ``url``'s sentinels name (``redis.asyncio`` with ``asynchronous``)."""
    if asynchronous:
        import redis.asyncio
        from redis.asyncio.sentinel import Sentinel as AsyncSentinel

        sentinel = AsyncSentinel(url.sentinels, sentinel_kwargs=url.sentinel_kwargs(asynchronous=True))
        return sentinel.master_for(url.master_name, redis_class=redis.asyncio.Redis, **url.primary_kwargs(), **connection_kwargs)
    import redis
    from redis.sentinel import Sentinel

    sentinel = Sentinel(url.sentinels, sentinel_kwargs=url.sentinel_kwargs())
    return sentinel.master_for(url.master_name, redis_class=redis.Redis, **url.primary_kwargs(), **connection_kwargs)


def where(url: str) -> str:
    """The URL without its password or query, to name in messages."""
    if is_sentinel_url(url):
        try:
            parsed = parse_sentinel_url(url)
        except RedisURLError:
            return "(a malformed sentinel URL)"
        hosts = ",".join(f"{_host(host)}:{port}" for host, port in parsed.sentinels)
        user = f"{parsed.username}@" if parsed.username else ""
        return f"the primary {parsed.master_name!r} of sentinels {user}{hosts}/{parsed.db}"
    try:
        parts = urlsplit(url)
    except ValueError:
        return "(a malformed URL)"
    host = parts.hostname or ""
    try:
        port = f":{parts.port}" if parts.port else ""
    except ValueError:  # not a number, or out of range: shown as given
        port = ":" + parts.netloc.rpartition(":")[2]
    user = f"{parts.username}@" if parts.username else ""
    return f"{parts.scheme}://{user}{host}{port}{parts.path}"


def _host(host: str) -> str:
    return f"[{host}]" if ":" in host else host
