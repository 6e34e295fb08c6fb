"""Errors the package raises on bad input. Each message names the file or row at fault."""


class MSTCLIPIQAError(Exception):
    """Base class of the package's own errors."""


class BadImageError(MSTCLIPIQAError, ValueError):
    """An image file is missing, unreadable, truncated or too large (decompression bomb)."""


class BadRowError(MSTCLIPIQAError, ValueError):
    """A row of an annotation table is unusable: non-numeric or missing MOS, duplicate name, missing prompt."""


class BadCheckpointError(MSTCLIPIQAError, ValueError):
    """A checkpoint file is truncated or corrupted, or holds pickled objects that only running code could rebuild."""


class OptionError(MSTCLIPIQAError, ValueError):
    """An option has a value the command cannot use; the message names the option and what it accepts."""


class BadModelError(MSTCLIPIQAError, ValueError):
    """A saved model is incomplete or damaged (config.json, weights, encoders), or its encoders cannot be found."""


class WriteError(MSTCLIPIQAError, OSError):
    """A file cannot be written: its folder is read-only or not the user's, the disk is full, or a file-size or quota
    limit is reached. The message names the file and the cause."""


def write_error(path: str | object, err: OSError) -> WriteError:
    """`err`, met writing `path`, as a `WriteError` naming the path and the cause."""
    error = WriteError(f"cannot write {path}: {(err.strerror or str(err)).lower()}")
    error.errno = err.errno
    return error
