"""The exceptions of the engine, one class per kind of fault (`LoraxferError.kind` names it).

Their messages are the command line's: what `loraxfer` prints after "error: "."""


class LoraxferError(Exception):
    """Any fault the engine reports: a bad input, a refused output, an unusable device.

    `kind` is the engine's word for it: io, safetensors, config, missing_tensor, bad_tensor,
    unknown_architecture, unsupported_adapter, invalid_argument, flags, output_exists,
    numerical, unavailable, device, cancelled or internal."""

    def __init__(self, message: str, kind: str = "internal", errno=None, filename=None):
        super().__init__(message)
        self.kind = kind
        if isinstance(self, OSError):
            # What `except OSError as e` code reads: the system's error number and the path.
            # Set after construction so that the message stays the command line's.
            self.errno = errno
            self.filename = filename
            self.strerror = _strerror(errno) if errno is not None else None

    def __str__(self) -> str:
        return str(self.args[0]) if self.args else ""


class InvalidArgumentError(LoraxferError, ValueError):
    """An option that cannot be used: a value of the wrong type, out of range or not a choice."""


class OutputExistsError(LoraxferError, FileExistsError):
    """`out` exists; pass `force=True` to replace it. `errno` is `errno.EEXIST` and `filename`
    the output's path."""

    def __init__(self, message: str, kind: str = "output_exists", errno=None, filename=None):
        import errno as codes

        super().__init__(message, kind, codes.EEXIST if errno is None else errno, filename)


class InputError(LoraxferError, OSError):
    """The operating system refused a read or a write (kind `io`, the only kind raised as this
    class): a file that could not be opened, read or written, such as the config.json of a model
    directory. A path that does not exist, or an adapter directory without adapter_config.json,
    is a `config` error, and an adapter without its weights an `unsupported_adapter` one: both
    raise `LoraxferError` itself. `errno` is the system's error number (None where the system
    gave none) and `filename` the path that was being read or written."""


_BY_KIND = {
    "invalid_argument": InvalidArgumentError,
    "flags": InvalidArgumentError,
    "output_exists": OutputExistsError,
    "io": InputError,
}


def _strerror(number: int) -> str:
    import os

    return os.strerror(number)


def error_class(kind: str) -> type:
    """The class of an engine error of this kind (called by the native module)."""
    return _BY_KIND.get(kind, LoraxferError)
