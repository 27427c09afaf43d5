"""The network addresses the commands take, checked before anything is built from them: a server's HTTP URL and
gRPC address (`compilers perf`: tritonclient's clients, half-built from a malformed one, end in a ValueError and
a stray error from their `__del__`), and the host and port a server listens on (`compilers serve`: uvicorn binds
a port past 65535 modulo 65536). Each malformed one is an InputError that names its flag and the expected form.

Syntax and name resolution only: nothing here connects, binds or imports the server.
"""
from __future__ import annotations

import ipaddress
import re
import socket
import urllib.parse

from ..errors import InputError

HTTP_FORM = ("http://HOST:PORT, e.g. http://127.0.0.1:8000 (or HOST:PORT; https:// and a path prefix too; an IPv6 "
             "host in brackets, http://[::1]:8000)")
METRICS_FORM = "http://HOST:PORT/metrics, e.g. http://127.0.0.1:8000/metrics (an IPv6 host in brackets)"
GRPC_FORM = "HOST:PORT, e.g. 127.0.0.1:8001 (an IPv6 host in brackets, [::1]:8001)"
LISTEN_FORM = ("an IP address of this machine or a name for one, e.g. 127.0.0.1 (this machine only), 0.0.0.0 (every "
               "interface), ::1 or :: (IPv6, without brackets); the port goes in --port")
NAME = r"[A-Za-z0-9_][A-Za-z0-9._-]*"                 # a DNS name or an IPv4 address
NETLOC = re.compile(rf"(?:\[(?P<ipv6>[^\]]*)\]|(?P<name>{NAME}))(?::(?P<port>.*))?")   # IPv6 in brackets


def http_url(url: str, flag: str = "URL", form: str = HTTP_FORM) -> urllib.parse.SplitResult:
    """http(s)://host[:port][/path], or host:port (http) -> its parts, the scheme filled in; InputError naming
    `flag` and the expected `form` for anything else."""
    return _url(url, flag, ("http", "https"), form, port_needed=False, path=True)


def grpc_address(address: str) -> str:
    """host:port (or grpc://host:port) -> host:port, as tritonclient.grpc takes it; InputError as http_url."""
    return _url(address, "--grpc-url", ("grpc",), GRPC_FORM, port_needed=True, path=False).netloc


def listen_address(host: str, port: int, *, resolve: bool = True) -> None:
    """InputError unless `port` is a port number (0: a free one) and `host` an IP address or a name, that
    resolves to an address to listen on where `resolve` (not for a remote cluster's nodes)."""
    if not 0 <= port <= 65535:
        raise InputError(f"--port must be a port number (0-65535; 0 picks a free one), not {port}")
    if not host.strip():
        raise InputError(f"--host is empty; expected {LISTEN_FORM}")
    try:
        ipaddress.ip_address(host)
        return
    except ValueError:
        pass
    if not re.fullmatch(NAME, host):
        raise InputError(f"--host {host!r} is neither an IP address nor a name; expected {LISTEN_FORM}")
    if resolve:
        try:
            socket.getaddrinfo(host, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE)
        except (OSError, UnicodeError) as e:
            raise InputError(f"--host {host!r} does not resolve ({e}); expected {LISTEN_FORM}") from None


def _url(text: str, flag: str, schemes: tuple[str, ...], form: str, *, port_needed: bool,
         path: bool) -> urllib.parse.SplitResult:
    """A URL's parts: one of `schemes` (the first when none is given), a host, a port in 1-65535 (or none, the
    scheme's default, unless `port_needed`), a path only where `path`, and no user, query or fragment."""
    def refuse(why: str) -> InputError:
        return InputError(f"{flag} {text!r} {why}; expected {form}")

    if not text.strip():
        raise refuse("is empty")
    try:
        parsed = urllib.parse.urlsplit(text if "://" in text else f"{schemes[0]}://{text}")
    except ValueError as e:                                  # an unclosed bracket, no IPv6 address in brackets
        raise refuse(f"is malformed ({e})") from None
    if parsed.scheme not in schemes:
        raise refuse(f"has scheme {parsed.scheme}://, not {' or '.join(s + '://' for s in schemes)}")
    if "@" in parsed.netloc:
        raise refuse("has a user or password, which is never sent")
    if parsed.query or parsed.fragment:
        raise refuse("has a query or a fragment")
    if parsed.path.strip("/") and not path:
        raise refuse(f"has a path, {parsed.path}")
    if not parsed.netloc or parsed.netloc.startswith(":"):
        raise refuse("names no host")
    netloc = NETLOC.fullmatch(parsed.netloc)
    if not netloc:
        host = parsed.netloc.rpartition(":")[0] or parsed.netloc
        raise refuse(f"has host {host!r}, which is neither a name nor an IP address")
    if netloc["ipv6"] is not None:
        try:
            ipaddress.IPv6Address(netloc["ipv6"])
        except ValueError:
            raise refuse(f"has {netloc['ipv6']!r} in brackets, which is not an IPv6 address") from None
    port = netloc["port"]
    if port is not None and not (re.fullmatch(r"[0-9]{1,5}", port) and 1 <= int(port) <= 65535):
        raise refuse(f"has port {port!r}, which is not a number in 1-65535")
    if port is None and port_needed:
        raise refuse("has no port")
    return parsed
