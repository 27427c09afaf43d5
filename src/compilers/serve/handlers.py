"""Custom handlers: a model's own Python code around its versions, for what a pipeline's data cannot express.

Code, so opt-in twice: a model's serving.toml names the file and its sha256,

    [handler]
    file = "handler.py"          # in the model's directory, beside its versions
    sha256 = "9f86d08..."        # the file's digest: `sha256sum handler.py`

and the server runs it only when started with `compilers serve REPO --handlers`; a file whose bytes have another
digest is not run (the model's load fails and says so). The bytes that were checked are the bytes executed.

The hooks, each optional (TorchServe's life cycle, per request):

    INPUTS = [{"name": "prompt", "datatype": "BYTES", "shape": [-1]}]     # what clients send (default: the model's)
    OUTPUTS = [{"name": "answer", "datatype": "BYTES", "shape": [-1]}]    # what they get (default: the model's)

    def initialize(context): ...                  # once per loaded version: context.model, .version, .model_dir,
                                                  # .version_dir, .inputs / .outputs (the version's own, as metadata)
    def preprocess(inputs, context): ...          # {name: numpy array} as clients sent them -> the version's inputs
    def postprocess(outputs, context): ...        # the version's outputs by name -> {name: array} of OUTPUTS

Each hook runs in a worker thread; requests are still batched between them (after preprocess, before
postprocess). A hook that raises `compilers.InputError` answers 400 with its message; any other exception 500.
"""
from __future__ import annotations

import hashlib
import hmac
import types
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Mapping, Sequence

import numpy as np

from ..errors import CompilerError, ConfigError, InputError
from .protocol import tensor_metadata

MAX_HANDLER_BYTES = 1 << 20


class HandlerError(CompilerError):
    """A handler's hook failed or answered something other than its declared outputs (HTTP 500)."""


@dataclass(frozen=True)
class HandlerConfig:
    """serving.toml's [handler] table."""

    file: str
    sha256: str


@dataclass(frozen=True)
class Declared:
    """A tensor a handler declares in INPUTS / OUTPUTS (the protocol's metadata form)."""

    name: str
    datatype: str
    shape: tuple[int, ...]


@dataclass(frozen=True)
class Context:
    """What a handler's hooks are told about the version they wrap."""

    model: str
    version: int
    model_dir: Path
    version_dir: Path
    inputs: tuple[dict[str, Any], ...]       # the version's own inputs and outputs, as model metadata shows them
    outputs: tuple[dict[str, Any], ...]


def parse_handler(table: Mapping[str, Any], where: str) -> HandlerConfig:
    unknown = sorted(set(table) - {"file", "sha256"})
    if unknown:
        raise ConfigError(f"{where} [handler]: unknown key(s) {unknown}; it takes file and sha256")
    file, digest = table.get("file"), table.get("sha256")
    if not isinstance(file, str) or not file or Path(file).is_absolute() or ".." in Path(file).parts:
        raise ConfigError(f"{where} [handler]: file must name a file in the model's directory, like \"handler.py\"")
    if not isinstance(digest, str) or len(digest) != 64 or not all(c in "0123456789abcdef" for c in digest.lower()):
        raise ConfigError(f"{where} [handler]: sha256 must be the file's digest, 64 hex digits (`sha256sum {file}`)")
    return HandlerConfig(file, digest.lower())


class Handler:
    """A loaded handler: its module, run only after its digest matched (`load`)."""

    def __init__(self, module: types.ModuleType, context: Context):
        self.module, self.context = module, context
        self.inputs = _declared(module, "INPUTS")
        self.outputs = _declared(module, "OUTPUTS")
        self._pre = getattr(module, "preprocess", None)
        self._post = getattr(module, "postprocess", None)
        initialize = getattr(module, "initialize", None)
        if initialize is not None:
            _call(initialize, "initialize", context)

    @classmethod
    def load(cls, config: HandlerConfig, context: Context) -> "Handler":
        """Read the file once, check its digest, run those bytes; ConfigError for a missing file or another
        digest (nothing of it runs then)."""
        path = context.model_dir / config.file
        try:
            if not path.is_file() or path.stat().st_size > MAX_HANDLER_BYTES:
                raise ConfigError(f"handler {path}: not a file of at most {MAX_HANDLER_BYTES} bytes")
            code = path.read_bytes()
        except OSError as e:
            raise ConfigError(f"handler {path} cannot be read ({e})") from None
        digest = hashlib.sha256(code).hexdigest()
        if not hmac.compare_digest(digest, config.sha256):
            raise ConfigError(f"handler {path} has sha256 {digest}, not the {config.sha256} its serving.toml pins: "
                              "it was not run. If the change is yours, put its new digest in [handler] sha256")
        module = types.ModuleType(f"compilers_handler_{context.model}_{context.version}")
        module.__file__ = str(path)
        try:
            exec(compile(code, str(path), "exec"), module.__dict__)
        except Exception as e:
            raise ConfigError(f"handler {path} failed when run: {type(e).__name__}: {e}") from None
        return cls(module, context)

    def preprocess(self, inputs: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        return inputs if self._pre is None else _arrays(_call(self._pre, "preprocess", inputs, self.context), "preprocess")

    def postprocess(self, outputs: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        if self._post is None:
            return outputs
        return _arrays(_call(self._post, "postprocess", outputs, self.context), "postprocess")


def context_of(model: str, version: int, model_dir: Path, inputs: Sequence[Any], outputs: Sequence[Any]) -> Context:
    return Context(model, version, model_dir, model_dir / str(version), tuple(map(tensor_metadata, inputs)),
                   tuple(map(tensor_metadata, outputs)))


def _declared(module: types.ModuleType, name: str) -> tuple[Declared, ...] | None:
    value = getattr(module, name, None)
    if value is None:
        return None
    try:
        specs = tuple(Declared(d["name"], d["datatype"], tuple(int(n) for n in d["shape"])) for d in value)
    except (KeyError, TypeError, ValueError) as e:
        raise ConfigError(f"handler {module.__file__}: {name} must be a list of {{'name', 'datatype', 'shape'}} "
                          f"({type(e).__name__}: {e})") from None
    if not specs or not all(isinstance(s.name, str) and isinstance(s.datatype, str) for s in specs):
        raise ConfigError(f"handler {module.__file__}: {name} must name at least one tensor, names and datatypes "
                          "as strings")
    return specs


def _call(hook: Any, name: str, *args: Any) -> Any:
    try:
        return hook(*args)
    except InputError:
        raise
    except Exception as e:
        raise HandlerError(f"the model's handler failed in {name}: {type(e).__name__}: {e}") from e


def _arrays(value: Any, hook: str) -> dict[str, np.ndarray]:
    if not isinstance(value, Mapping) or not all(isinstance(k, str) for k in value):
        raise HandlerError(f"the model's handler's {hook} returned a {type(value).__name__}, not a dict of named "
                           "arrays")
    try:
        return {k: np.asarray(v) for k, v in value.items()}
    except Exception as e:
        raise HandlerError(f"the model's handler's {hook} returned something that is no array ({e})") from None
