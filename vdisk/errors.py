"""The one error hierarchy of vdisk.

Every error that vdisk raises on purpose is a :class:`VdiskError`.  Each class
carries an ``exit_code`` that the CLI uses and a one-line message meant for a
person; the CLI prints ``vdisk: <message>`` and exits, never a traceback.
"""

from __future__ import annotations


class VdiskError(Exception):
    """Base of every error vdisk raises on purpose."""

    exit_code = 1
    #: a way out that a command-line option gives: (parameter name, text).  The CLI
    #: appends the text only when the failing command has that option, so a hint
    #: never names an option the command lacks.
    option_hint: tuple[str, str] | None = None

    def __init__(self, message: str, *, option_hint: tuple[str, str] | None = None):
        super().__init__(message)
        self.message = message
        if option_hint is not None:
            self.option_hint = option_hint

    def __str__(self) -> str:
        return self.message


class UsageError(VdiskError):
    """The caller asked for something that makes no sense (bad size, bad option)."""

    exit_code = 1


class ImageNotFound(VdiskError):
    """An image file (or a backing file it names) does not exist."""


class ImageExists(VdiskError):
    """Refusing to overwrite an existing file."""


class CorruptImage(VdiskError):
    """The image's metadata is inconsistent or fails its checksum."""

    exit_code = 2


class ChecksumMismatch(CorruptImage):
    """A data cluster does not match the checksum stored in its mapping entry."""

    def __init__(self, message: str, guest_offset: int):
        super().__init__(message)
        self.guest_offset = guest_offset


class UnsupportedFeature(VdiskError):
    """The image uses a feature (or version) this vdisk does not implement."""


class ImageLocked(VdiskError):
    """Another process holds a conflicting lock on the image."""


class ReadOnlyImage(VdiskError):
    """A write was attempted on an image opened read-only."""


class OutOfBounds(VdiskError):
    """A request reaches outside the virtual disk."""


class SnapshotNotFound(VdiskError):
    """No snapshot of that name or id exists."""


class SnapshotExists(VdiskError):
    """A snapshot of that name exists already."""


class BackingError(VdiskError):
    """A backing chain cannot be opened: loop, too deep, missing, or not allowed."""


class HostIOError(VdiskError):
    """The host storage failed an operation (EIO, ENOSPC, ...)."""

    def __init__(self, message: str, errno: int | None = None):
        super().__init__(message)
        self.errno = errno


class NotSupported(VdiskError):
    """The driver does not implement an optional operation."""


class ResourceLimit(VdiskError):
    """Opening or using an image would need more memory (or another resource) than
    vdisk allows it: a clear refusal instead of an out-of-memory kill."""
