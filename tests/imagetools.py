"""Small image helpers shared by the CLI and ops tests."""

import os

import vdisk


def make_raw(path, size, writes=()):
    """A sparse raw image of ``size`` bytes with ``writes`` = [(offset, bytes)]."""
    vdisk.create(path, size, format="raw")
    with vdisk.open(path, format="raw") as img:
        for off, data in writes:
            img.write(off, data)
        img.flush()
    return str(path)


def read_all(path, fmt):
    with vdisk.open(path, format=fmt, read_only=True) as img:
        return img.read(0, img.size)


def allocated(path) -> int:
    return os.stat(path).st_blocks * 512


def flip_byte(path, offset):
    """Corrupt one byte of a file in place."""
    with open(path, "r+b") as f:
        f.seek(offset)
        b = f.read(1)
        f.seek(offset)
        f.write(bytes([b[0] ^ 0xFF]))


def run(*args, code=0):
    """Invoke the CLI in-process; assert the exit code; return the Result."""
    from click.testing import CliRunner

    from vdisk.cli import cli

    result = CliRunner().invoke(cli, [str(a) for a in args])
    assert result.exit_code == code, (
        f"vdisk {' '.join(map(str, args))} exited {result.exit_code}, expected {code}\n"
        f"stdout: {result.stdout}\nstderr: {result.stderr}\nexception: {result.exception!r}"
    )
    return result


def jrun(*args, code=0):
    """``run`` with ``--output json``; the parsed output."""
    import json

    return json.loads(run(*args, "--output", "json", code=code).stdout)
