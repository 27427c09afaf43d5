"""The typed errors of `compilers`: each says what went wrong and what to do next."""
from __future__ import annotations


def brief(e: BaseException, limit: int = 400) -> str:
    """`Type: message` of an exception on one line, cut at `limit` characters: how a message quotes an error
    from the user's code or a backend library."""
    text = " ".join(str(e).split())
    return f"{type(e).__name__}: {text[:limit]}" if text else type(e).__name__


class CompilerError(Exception):
    """Base of every error this package raises on purpose."""


class TargetError(CompilerError):
    """A target name, descriptor file or override is unknown or malformed."""


class BackendUnavailable(CompilerError):
    """The target's backend cannot run on this machine (missing package, device or clash)."""


class ExportError(CompilerError):
    """Every lowering route failed; the message lists each route and why it failed."""


class InputError(CompilerError, TypeError):
    """Inputs do not match the compiled signature (count, names, dtype, rank or shape)."""


class ValidationError(CompilerError):
    """The compiled model disagrees with the eager model beyond the target's tolerance.

    `report` holds the per-output table (a `ValidationReport`)."""

    def __init__(self, message: str, report=None):
        super().__init__(message)
        self.report = report


class ConfigError(CompilerError):
    """A model repository's layout or a serving.toml is malformed; the message names the file and the key."""


class ArtifactError(CompilerError):
    """A saved artifact is missing a file, fails its hash check or was built by other library versions."""


class EngineError(CompilerError, RuntimeError):
    """The compiled engine failed on a call's inputs (the backend's own error is its `__cause__`): usually inputs
    eager rejects too, such as an index out of range."""
