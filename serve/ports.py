"""Ports: taking one with an error that says why not (shared by the gRPC, HTTP and metrics listeners)."""

from __future__ import annotations

import errno
import socket


def address(host: str, port: int) -> str:
    return f"{host}:{port}" if ":" not in host else f"[{host}]:{port}"


def check_port_free(host: str, port: int) -> None:
    """Raises OSError, in one line that says why, when `host:port` is in use (another server or program
    listens there) or not ours to bind. gRPC's own refusal says only "Failed to bind" and first writes a
    C-core error line of its own to stderr, so the port is tried here first."""
    if port == 0:
        return
    where = address(host, port)
    try:
        infos = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE)
    except socket.gaierror as e:
        raise OSError(f"cannot listen on {where}: {e.strerror}") from None
    for family, kind, proto, _, sockaddr in infos:
        try:
            s = socket.socket(family, kind, proto)
        except OSError:
            continue  # a family this machine lacks (IPv6 off): gRPC leaves it out too
        with s:
            s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # as gRPC binds: a port in TIME_WAIT is free
            try:
                s.bind(sockaddr)
            except OSError as e:
                # Other errors (one of localhost's addresses missing, say) are gRPC's to judge: it binds what it can.
                if e.errno == errno.EADDRINUSE:
                    raise OSError(f"cannot listen on {where}: the port is already in use "
                                  "(by another server or program)") from None
                if e.errno == errno.EACCES:
                    raise OSError(f"cannot listen on {where}: {e.strerror}") from None
