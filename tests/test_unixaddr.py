"""vdisk.unixaddr: Unix sockets at paths longer than a socket address holds."""

import errno
import os
import socket

import pytest

from vdisk import unixaddr


@pytest.mark.parametrize("depth", [0, 3])
def test_bind_and_connect_at_short_and_long_paths(tmp_path, depth):
    d = tmp_path.joinpath(*(["x" * 40] * depth))
    d.mkdir(parents=True, exist_ok=True)
    path = str(d / "ctl.sock")
    assert (len(path) > unixaddr.MAX_PATH) == (depth > 0)
    srv = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    cli = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        unixaddr.bind(srv, path)
        srv.listen(1)
        assert os.path.exists(path)  # made where the long path says, not in /proc
        unixaddr.connect(cli, path)
        conn, _ = srv.accept()
        cli.sendall(b"ping")
        assert conn.recv(4) == b"ping"
        conn.close()
    finally:
        cli.close()
        srv.close()


def test_a_socket_name_too_long_by_itself_is_enametoolong(tmp_path):
    s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        with pytest.raises(OSError) as e:
            unixaddr.bind(s, str(tmp_path / ("n" * 120)))
        assert e.value.errno == errno.ENAMETOOLONG
    finally:
        s.close()


def test_nobody_listening_at_a_long_path_is_connection_refused_or_missing(tmp_path):
    d = tmp_path / ("y" * 60) / ("z" * 60)
    d.mkdir(parents=True)
    s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        with pytest.raises(FileNotFoundError):
            unixaddr.connect(s, str(d / "none.sock"))
    finally:
        s.close()
