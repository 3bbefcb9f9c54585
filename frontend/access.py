"""Who may use the HTTP API: API keys, the Host check against DNS rebinding, and the browser Origin policy.

The dispatcher calls ``AccessPolicy.admit`` before it routes any request, so no route, present
or added later, can skip these checks, and ``add_cors_headers`` on every answer.

- API keys: when any is configured, every path but ``/health`` (and the web page's files, which
  the server names) needs ``Authorization: Bearer KEY`` or ``x-api-key: KEY`` (compared in
  constant time against every key).
- Host: without an API key, a web page on a foreign domain whose name was made to resolve to this
  machine (DNS rebinding) would be same-origin with it. So without a key, ``Host`` must name a
  loopback address, the address the server is bound to, or an entry of ``allowed_hosts``.
- Origin: browsers send ``Origin`` on every cross-origin POST, and a "simple" one (a text/plain
  or multipart body) is sent without a CORS preflight. A state-changing request whose Origin is
  neither this server's own nor listed in ``cors_origins`` is refused before any work. CORS headers
  are only ever sent to listed origins.
"""

from __future__ import annotations

import hashlib
import hmac
import ipaddress
import re
from collections.abc import Callable, Iterable

from werkzeug.wrappers import Request, Response

from frontend.errors import APIError

ANY = "*"  # in cors_origins or allowed_hosts: every origin, every host name
PUBLIC_PATHS = frozenset({"/health"})  # answered without an API key (with less detail)
SAFE_METHODS = frozenset({"GET", "HEAD", "OPTIONS"})  # read-only: no Origin check
ALLOWED_HEADERS = ("Authorization", "Content-Type", "X-API-Key")  # always allowed in a preflight
PREFLIGHT_MAX_AGE = 600  # seconds a browser may cache a preflight answer
_MAX_REQUESTED_HEADERS = 32  # extra header names echoed in a preflight answer, at most
_WILDCARD_BINDS = frozenset({"", "0.0.0.0", "::"})
_DEFAULT_PORTS = {"http": 80, "https": 443}

_HOST = re.compile(r"(?:\[(?P<ip6>[0-9a-fA-F:.]{2,45})\]|(?P<name>[A-Za-z0-9._-]{1,253}))(?::(?P<port>[0-9]{1,5}))?")
_ORIGIN = re.compile(r"(?P<scheme>[A-Za-z][A-Za-z0-9+.-]{0,31})://(?P<host>[^/?#@\s]{1,300})")
_TOKEN = re.compile(r"[A-Za-z0-9!#$%&'*+.^_`|~-]{1,64}")  # an HTTP header name
_API_KEY = re.compile(r"[\x21-\x2b\x2d-\x7e]{1,512}")  # visible ASCII but the comma (the flag's separator)


def parse_host(text: str | None) -> tuple[str, int | None] | None:
    """A Host header value (or a host name) as (lower-case name without brackets or final dot, port);
    None if malformed."""
    match = _HOST.fullmatch(text or "")
    if not match:
        return None
    port = int(match["port"]) if match["port"] else None
    if port is not None and not 0 < port < 65536:
        return None
    if match["ip6"]:
        try:
            return str(ipaddress.IPv6Address(match["ip6"])), port
        except ValueError:
            return None
    name = match["name"].lower()
    name = name[:-1] if name.endswith(".") else name  # one final dot: the fully qualified form
    if not all(0 < len(label) <= 63 for label in name.split(".")):  # DNS labels: no empty or long one
        return None
    return name, port


def canonical_origin(text: str | None) -> str | None:
    """An Origin header value (scheme://host[:port]) in the form browsers send, without a default port;
    None if malformed (``null`` included)."""
    match = _ORIGIN.fullmatch(text or "")
    host = parse_host(match["host"]) if match else None
    if host is None:
        return None
    scheme, (name, port) = match["scheme"].lower(), host
    shown = f"[{name}]" if ":" in name else name
    return f"{scheme}://{shown}" if port in (None, _DEFAULT_PORTS.get(scheme)) else f"{scheme}://{shown}:{port}"


def is_loopback(name: str) -> bool:
    """localhost, 127.0.0.0/8 or ::1."""
    if name == "localhost":
        return True
    try:
        return ipaddress.ip_address(name).is_loopback
    except ValueError:
        return False


def api_key_problem(key: str) -> str | None:
    """What is wrong with a configured API key, in words; None when it is usable."""
    if not _API_KEY.fullmatch(key):
        return ("an API key must be 1 to 512 visible ASCII characters, without spaces or commas "
                f"(got {len(key)} characters)")
    return None


def origin_setting_problem(origin: str) -> str | None:
    if origin == ANY or canonical_origin(origin):
        return None
    return f"cors origin {origin[:100]!r} must be scheme://host[:port], e.g. http://localhost:3000, or {ANY}"


def host_setting_problem(host: str) -> str | None:
    parsed = None if host == ANY else parse_host(host)
    if host == ANY or (parsed and parsed[1] is None):
        return None
    return f"allowed host {host[:100]!r} must be a host name or IP address without a port, or {ANY}"


def exposure_warnings(bind_host: str, api_keys: Iterable[str], cors_origins: Iterable[str]) -> list[str]:
    """What to tell the operator at start-up about who can reach this server."""
    warnings = []
    keyed = bool(list(api_keys))
    if not keyed and not is_loopback(bind_host.strip("[]")):
        warnings.append(
            f"listening on {bind_host} without an API key: anyone who can reach this port can use the API "
            "and read and delete its files. Set --api-key (or --api-key-file, or EDGELLM_API_KEY), or listen "
            "on 127.0.0.1 only (--host 127.0.0.1). Until a key is set, clients must name this machine by "
            "an address given in --allowed-hosts (a guard against DNS rebinding)")
    if not keyed and ANY in cors_origins:
        warnings.append(f"cors_origins is {ANY} without an API key: any web page a user of this machine "
                        "opens can use the API. Set --api-key, or list the origins that may")
    return warnings


class AccessPolicy:
    """The access rules of one server, built once from its settings."""

    def __init__(self, *, api_keys: Iterable[str] = (), cors_origins: Iterable[str] = (),
                 allowed_hosts: Iterable[str] = (), bind_host: str = "127.0.0.1",
                 public_paths: Iterable[str] = ()):
        self.public_paths = PUBLIC_PATHS | frozenset(public_paths)
        self.api_keys = tuple(_digest(k.encode()) for k in api_keys)
        origins = set(cors_origins)
        self.cors_any = ANY in origins
        self.cors_origins = frozenset(canonical_origin(o) for o in origins - {ANY})
        hosts = set(allowed_hosts)
        bind = bind_host.strip("[]")
        bound = parse_host(bind) if bind not in _WILDCARD_BINDS else None
        self.any_host = ANY in hosts
        self.allowed_hosts = frozenset(parsed[0] for h in hosts - {ANY} if (parsed := parse_host(h)))
        if bound:
            self.allowed_hosts |= {bound[0]}

    # -- the rules, one each -------------------------------------------------------------
    def authorized(self, request: Request) -> bool:
        """True when no key is configured or the request presents one of them."""
        if not self.api_keys:
            return True
        presented = [request.headers.get("X-API-Key", "")]
        scheme, _, token = request.headers.get("Authorization", "").partition(" ")
        if scheme.lower() == "bearer":
            presented.append(token.strip())
        found = False
        for candidate in (_digest(p.encode("latin-1", "replace")) for p in presented if p):
            for key in self.api_keys:  # every key, no early exit: the time taken says nothing about any
                found |= hmac.compare_digest(candidate, key)
        return found

    def host_allowed(self, host_header: str | None) -> bool:
        """Whether a Host header names this server; a request without one comes from no browser."""
        if host_header is None or self.any_host:
            return True
        parsed = parse_host(host_header)
        return parsed is not None and (is_loopback(parsed[0]) or parsed[0] in self.allowed_hosts)

    def cors_allowed(self, origin: str | None) -> bool:
        """Whether a web page from this origin may use the API (cors_origins)."""
        canonical = canonical_origin(origin)
        return canonical is not None and (self.cors_any or canonical in self.cors_origins)

    def trusted_origin(self, request: Request, origin: str) -> bool:
        """Whether a request carrying Origin comes from this server's own pages or an allowed origin."""
        own = canonical_origin(f"{request.scheme}://{request.environ.get('HTTP_HOST', '')}")
        return self.cors_allowed(origin) or (own is not None and canonical_origin(origin) == own)

    # -- what the dispatcher calls -------------------------------------------------------
    def admit(self, request: Request, allowed_methods: Callable[[], Iterable[str]]) -> Response | None:
        """Raises APIError for a request that may go no further; returns the answer to a CORS preflight;
        None lets the request through to its route. ``allowed_methods`` lists the methods of its path."""
        host = request.environ.get("HTTP_HOST")
        if not self.api_keys and not self.host_allowed(host):
            raise APIError("host_not_allowed", f"Host {_shown(host)} is not a name of this server: add it to "
                           "--allowed-hosts (allowed_hosts in the config file), or set an API key (--api-key); "
                           "without a key only loopback names and listed hosts are answered, against DNS "
                           "rebinding")
        origin = request.headers.get("Origin")
        if request.method == "OPTIONS" and origin is not None and "Access-Control-Request-Method" in request.headers:
            if not self.cors_allowed(origin):
                raise _origin_refused(origin)
            methods = set(allowed_methods())
            if methods:
                return self._preflight(request, methods)
        if origin is not None and request.method not in SAFE_METHODS and not self.trusted_origin(request, origin):
            raise _origin_refused(origin)
        if request.path not in self.public_paths and not self.authorized(request):
            presented = "Authorization" in request.headers or "X-API-Key" in request.headers
            raise APIError("invalid_api_key", ("the API key is not valid" if presented else "an API key is required")
                           + ": send 'Authorization: Bearer KEY' (or 'x-api-key: KEY') with a key this server "
                           "was started with")
        return None

    def add_cors_headers(self, request: Request, response: Response) -> Response:
        """CORS headers for a listed origin; none at all otherwise."""
        if self.cors_any or self.cors_origins:
            response.vary.add("Origin")
        origin = request.headers.get("Origin")
        if self.cors_allowed(origin):  # validated: safe to echo
            response.headers["Access-Control-Allow-Origin"] = origin
        return response

    @staticmethod
    def _preflight(request: Request, methods: set[str]) -> Response:
        base = {h.lower() for h in ALLOWED_HEADERS}
        requested = request.headers.get("Access-Control-Request-Headers", "")[:4096].split(",")
        extra = []
        for name in (h.strip().lower() for h in requested[:_MAX_REQUESTED_HEADERS]):
            if _TOKEN.fullmatch(name) and name not in base and name not in extra:
                extra.append(name)
        return Response(status=204, headers={
            "Access-Control-Allow-Methods": ", ".join(sorted(methods | {"OPTIONS"})),
            "Access-Control-Allow-Headers": ", ".join([*ALLOWED_HEADERS, *extra]),
            "Access-Control-Max-Age": str(PREFLIGHT_MAX_AGE)})


def _digest(key: bytes) -> bytes:
    """Keys are compared as digests, so that not even their lengths show in the time taken."""
    return hashlib.sha256(key).digest()


def _shown(value: str | None) -> str:
    return repr((value or "")[:100])


def _origin_refused(origin: str) -> APIError:
    return APIError("origin_not_allowed", f"requests from web pages at origin {_shown(origin)} are not allowed: "
                    "add the origin to --cors-origins (cors_origins in the config file) to let its pages use "
                    "this server")
