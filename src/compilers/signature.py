"""Call conventions, in one place: how `model(...)` maps to the flat tensor list an engine runs.

A Signature (found by `capture.capture` from the eager run) holds each forward argument as a pytree whose
tensor leaves are engine inputs and other leaves fixed constants, the inputs' dtypes and named dynamic dims,
and the output structure with the dims each output follows. At call time `Signature.flatten` checks the
inputs (names, count, structure, dtype, rank, static sizes, dynamic ranges, index ranges) and
`Signature.unflatten` rebuilds the model's own output type from the engine's flat outputs.
"""
from __future__ import annotations

import dataclasses
import functools
import inspect
from dataclasses import dataclass, field
from typing import Any, Iterator, Mapping, Sequence

import ml_dtypes
import numpy as np
import torch
from torch.utils import _pytree as pytree

from . import treespec
from .records import from_json
from .errors import InputError
from .target import DimRange

JSON_SCALARS = (type(None), bool, int, float, str)


BFLOAT16 = np.dtype(ml_dtypes.bfloat16)     # numpy's bfloat16 (ml_dtypes, a dependency of onnx)


@functools.lru_cache(maxsize=64)
def numpy_dtype(dtype: torch.dtype) -> np.dtype | None:
    """The numpy dtype of a torch dtype (bfloat16: ml_dtypes'); None for one numpy lacks."""
    if dtype == torch.bfloat16:
        return BFLOAT16
    try:
        return torch.empty((), dtype=dtype).numpy().dtype
    except TypeError:
        return None


def torch_dtype(dtype: np.dtype) -> torch.dtype | None:
    """The torch dtype of a numpy dtype (ml_dtypes' bfloat16 included); None for one torch lacks."""
    if dtype == BFLOAT16:
        return torch.bfloat16
    try:
        return torch.from_numpy(np.empty(0, dtype)).dtype
    except (TypeError, ValueError):       # object, string, non-native byte order
        return None


def to_torch(x: np.ndarray) -> torch.Tensor:
    """A numpy array as a CPU tensor sharing its memory (bfloat16 included)."""
    if x.dtype == BFLOAT16:
        return torch.from_numpy(x.view(np.int16)).view(torch.bfloat16)
    return torch.from_numpy(x)


def to_numpy(x: torch.Tensor) -> np.ndarray:
    """A CPU tensor (no grad) as a numpy array sharing its memory (bfloat16 included)."""
    if x.dtype == torch.bfloat16:
        return x.view(torch.int16).numpy().view(BFLOAT16)
    return x.numpy()


@dataclass(frozen=True)
class TensorSpec:
    """One flat engine input or output: its name, dtype and shape.

    A str in the shape names a dynamic dim (a key of `Signature.dims`); in an output, "?" marks a size that
    varies with the inputs but follows no single input dim."""

    name: str
    dtype: torch.dtype
    shape: tuple[int | str, ...]

    def to_dict(self) -> dict[str, Any]:
        return {"name": self.name, "dtype": str(self.dtype).removeprefix("torch."), "shape": list(self.shape)}

    @classmethod
    def from_dict(cls, d: Mapping[str, Any], where: str = "tensor") -> "TensorSpec":
        """The spec saved by `to_dict`; ValueError naming `where` when it is malformed."""
        name = from_json(str, _key(d, "name", where), f"{where}.name")
        dtype = getattr(torch, from_json(str, _key(d, "dtype", where), f"{where}.dtype"), None)
        if not isinstance(dtype, torch.dtype):
            raise ValueError(f"{where}.dtype: {d['dtype']!r} is not a torch dtype")
        shape = from_json(tuple[int | str, ...], _key(d, "shape", where), f"{where}.shape")
        return cls(name, dtype, shape)

    @property
    def numpy_dtype(self) -> np.dtype:
        dtype = numpy_dtype(self.dtype)
        if dtype is None:
            raise TypeError(f"{self.name}: numpy has no {self.dtype}")
        return dtype


@dataclass(frozen=True)
class Leaf:
    """A leaf of an argument or output tree: engine slot `index`, the constant `value`, or (outputs only)
    `size`: (slot, axis), the Python int size of that axis of that flat output (`x.shape[0]` returned by a
    model whose output has that dim)."""

    index: int | None = None
    value: Any = None
    size: tuple[int, int] | None = None

    def to_dict(self) -> dict[str, Any]:
        if self.size is not None:
            return {"size": list(self.size)}
        return {"index": self.index} if self.index is not None else {"const": self.value}

    @classmethod
    def from_dict(cls, d: Mapping[str, Any], where: str = "leaf") -> "Leaf":
        """The leaf saved by `to_dict`; ValueError naming `where` when it is malformed."""
        if not isinstance(d, dict):
            raise ValueError(f"{where}: expected an object, got {d!r}")
        if "size" in d:
            return cls(size=from_json(tuple[int, int], d["size"], f"{where}.size"))
        if "index" in d:
            return cls(index=from_json(int, d["index"], f"{where}.index"))
        return cls(value=_key(d, "const", where))

    def get(self, values: Sequence[Any]) -> Any:
        if self.index is not None:
            return values[self.index]
        return self.value if self.size is None else int(values[self.size[0]].shape[self.size[1]])


def _holds_size(spec: pytree.TreeSpec) -> bool:
    return spec.type is torch.Size or any(_holds_size(c) for c in spec.children())


def _unflatten(leaves: Iterator[Any], spec: pytree.TreeSpec) -> Any:
    """tree_unflatten that gives torch.Size nodes back as torch.Size."""
    if spec.is_leaf():
        return next(leaves)
    children = [_unflatten(leaves, c) for c in spec.children()]
    if spec.type is torch.Size:
        return torch.Size(children)
    return pytree.SUPPORTED_NODES[spec.type].unflatten_fn(children, spec.context)


@dataclass(frozen=True)
class Tree:
    """A pytree whose leaves are engine slots or constants (one forward argument, or the output)."""

    spec: pytree.TreeSpec
    leaves: tuple[Leaf, ...]
    _sized: bool = field(default=False, init=False, compare=False, repr=False)   # holds a torch.Size node
    _single: int | None = field(default=None, init=False, compare=False, repr=False)  # the slot of a lone tensor

    def __post_init__(self):
        object.__setattr__(self, "_sized", _holds_size(self.spec))
        object.__setattr__(self, "_single", self.leaves[0].index if self.is_single_tensor else None)

    @property
    def is_single_tensor(self) -> bool:
        return self.spec.is_leaf() and self.leaves[0].index is not None

    def build(self, values: Sequence[Any]) -> Any:
        if self._single is not None:   # the common case, without pytree's walk (several microseconds a call)
            return values[self._single]
        leaves = [l.get(values) for l in self.leaves]
        if self._sized:       # pytree rebuilds a torch.Size as a plain tuple; eager returns a Size
            return _unflatten(iter(leaves), self.spec)
        return pytree.tree_unflatten(leaves, self.spec)

    def to_dict(self) -> dict[str, Any]:
        return {"spec": treespec.dumps(self.spec), "leaves": [l.to_dict() for l in self.leaves]}

    @classmethod
    def from_dict(cls, d: Mapping[str, Any], where: str = "tree") -> "Tree":
        """The tree saved by `to_dict`; ValueError naming `where` when it is malformed (ArtifactError for a
        structure that names types this process must not import)."""
        leaves = from_json(list[Any], _key(d, "leaves", where), f"{where}.leaves")
        tree = cls(treespec.loads(_key(d, "spec", where)),
                   tuple(Leaf.from_dict(l, f"{where}.leaves[{i}]") for i, l in enumerate(leaves)))
        if tree.spec.num_leaves != len(tree.leaves):
            raise ValueError(f"{where}: its structure has {tree.spec.num_leaves} leaves, but {len(tree.leaves)} "
                             "are listed")
        return tree

    def check_slots(self, specs: Sequence[TensorSpec], where: str) -> None:
        """ValueError unless every leaf names one of `specs` (the engine's flat inputs or outputs)."""
        for i, leaf in enumerate(self.leaves):
            slot = leaf.index if leaf.size is None else leaf.size[0]
            if slot is not None and not 0 <= slot < len(specs):
                raise ValueError(f"{where}.leaves[{i}] names slot {slot}, but there are {len(specs)}")
            if leaf.size is not None and not 0 <= leaf.size[1] < len(specs[slot].shape):
                raise ValueError(f"{where}.leaves[{i}] names axis {leaf.size[1]} of {specs[slot].name}, which "
                                 f"has {len(specs[slot].shape)}")


@dataclass(frozen=True)
class Alias:
    """A flat output whose memory eager shares with input or earlier output `index` (`of`: "input" or
    "output"); `whole`: it is that tensor itself (same view), not a view of part of it."""

    output: int
    of: str
    index: int
    whole: bool


def storage_address(x: torch.Tensor) -> int:
    """The address of the memory a tensor (or a view of it) lives in; 0 where there is none to share (no
    elements, or a layout without storage)."""
    try:
        return x.untyped_storage().data_ptr()
    except (RuntimeError, NotImplementedError):
        return 0


@dataclass(frozen=True)
class Signature:
    """The compiled model's call signature and output structure."""

    positional: tuple[str, ...]      # forward parameters that may be passed by position, in order
    keyword_only: tuple[str, ...]    # forward parameters that must be passed by keyword
    args: Mapping[str, Tree]         # parameters given in example_inputs
    defaults: Mapping[str, Any]      # parameters left at their defaults (fixed): name -> default (JSON-able) or a marker
    inputs: tuple[TensorSpec, ...]
    dims: Mapping[str, DimRange]     # dynamic dimension name -> allowed sizes
    outputs: tuple[TensorSpec, ...]
    output: Tree
    batch: str | None = None         # the dynamic dim that is the batch (requests concatenate along it)
    #: integer inputs that index a fixed-size table directly (an nn.Embedding, `weight[idx]`): input name ->
    #: (low, high, what the table is); a value outside [low, high) is an InputError, as eager raises IndexError
    index_bounds: Mapping[str, tuple[int, int, str]] = field(default_factory=dict)
    #: whether each row of a batch is answered as if it came alone, proven from the exported graph and confirmed
    #: by eager (`analysis.batch.rows_verdict`): only then may a server run several requests in one call. False:
    #: rows are coupled; None: not proven (no batch dim, no graph, or an artifact from before the check)
    batch_independent: bool | None = None
    #: what shows it, in a sentence (the op that couples rows and the model's line, or why nothing is proven)
    batch_evidence: str = ""
    #: padding masks: input name -> "keep" (nonzero marks a real position: Hugging Face's attention_mask) or
    #: "pad" (nonzero/True marks padding: PyTorch's key_padding_mask). An output that has the mask's (batch,
    #: sequence) dims is judged at the real positions only (`judged`): nobody reads what a model leaves at padding
    masks: Mapping[str, str] = field(default_factory=dict)
    #: outputs whose memory eager shares with an input or an earlier output (`capture.shared_memory`): the only
    #: outputs a compiled model may return in memory it did not allocate for that call. Empty in artifacts from
    #: before it was recorded: every output is then the call's own
    aliases: tuple[Alias, ...] = ()
    _fast: tuple[str, ...] | None = field(default=None, compare=False, repr=False)

    def __post_init__(self):
        # Fast path when every argument is one tensor passed by position, in forward order.
        if all(t.is_single_tensor for t in self.args.values()) and tuple(self.args) == self.positional[:len(self.args)]:
            object.__setattr__(self, "_fast", tuple(self.args))

    @property
    def input_names(self) -> list[str]:
        return [s.name for s in self.inputs]

    @property
    def output_names(self) -> list[str]:
        return [s.name for s in self.outputs]

    def batch_axis(self, spec: TensorSpec) -> int | None:
        """Where the batch dim lies in an input's or output's shape; None if it has none."""
        return spec.shape.index(self.batch) if self.batch is not None and self.batch in spec.shape else None

    def mask_axes(self, spec: TensorSpec) -> tuple[str, int, int] | None:
        """(mask input, axis of its batch dim, axis of its sequence dim) in output `spec`, for the first mask
        whose two dims the output has: dynamic dims by name, anywhere; a static sequence length only as the
        output's leading (batch, sequence) dims of a rank-3-or-more output (per-token features), so that an
        output that happens to have as many classes as the sequence has tokens is judged whole. None if no mask
        covers the output."""
        for name in self.masks:
            mask = next((i for i in self.inputs if i.name == name), None)
            if mask is None or len(mask.shape) != 2:
                continue
            batch, seq = mask.shape
            if isinstance(batch, str) and isinstance(seq, str):
                if batch != seq and batch in spec.shape and seq in spec.shape:
                    return name, spec.shape.index(batch), spec.shape.index(seq)
            elif len(spec.shape) >= 3 and tuple(spec.shape[:2]) == (batch, seq):
                return name, 0, 1
        return None

    def judged(self, spec: TensorSpec, flat: Sequence[Any], value: Any) -> np.ndarray | None:
        """Where output `spec` (whose value on inputs `flat` is `value`) is judged: a bool array of its shape,
        True at the positions its padding mask marks real; None to judge it everywhere (no mask covers it, or
        the sizes on this sample do not line up)."""
        found = self.mask_axes(spec)
        if found is None:
            return None
        name, batch_axis, seq_axis = found
        mask = np.asarray(flat[self.input_names.index(name)])
        shape = tuple(value.shape)
        if mask.ndim != 2 or len(shape) <= max(batch_axis, seq_axis) or \
                (shape[batch_axis], shape[seq_axis]) != mask.shape:
            return None
        real = mask != 0 if self.masks[name] == "keep" else mask == 0
        if batch_axis > seq_axis:
            real = real.T
        view = [1] * len(shape)
        view[batch_axis], view[seq_axis] = shape[batch_axis], shape[seq_axis]
        return np.broadcast_to(real.reshape(view), shape)

    def describe_inputs(self) -> str:
        return ", ".join(f"{s.name}: {str(s.dtype).removeprefix('torch.')}{_fmt_shape(s.shape)}" for s in self.inputs)

    def grown(self, flat: Sequence[Any]) -> list[Any] | None:
        """`flat` doubled along every dynamic dim (by repeating it); None if that leaves a dim's range or an
        input is not a tensor. Running it tells which output dims follow which inputs, and catches sizes an
        export baked in."""
        if not self.dims:
            return None
        out = []
        for spec, x in zip(self.inputs, flat):
            if not isinstance(x, torch.Tensor):
                return None
            for i, d in enumerate(spec.shape):
                if isinstance(d, str) and x.shape[i] > 0:
                    if not self.dims[d].contains(2 * x.shape[i]):
                        return None
                    x = torch.cat([x, x], dim=i)
            out.append(x)
        return out

    def resized(self, flat: Sequence[Any], sizes: Mapping[str, int]) -> list[Any]:
        """`flat` with each dynamic dim named in `sizes` set to that size, by repeating (or cutting) the
        inputs along it; InputError for a dim the signature does not have or a size outside its range."""
        for dim, size in sizes.items():
            if dim not in self.dims:
                raise InputError(f"the model has no dynamic dim {dim!r}; its dynamic dims are "
                                 f"{', '.join(self.dims) or 'none'}")
            if not self.dims[dim].contains(size):
                raise InputError(f"size {size} of dim {dim!r} lies outside the compiled range {self.dims[dim]}")
        out = []
        for spec, x in zip(self.inputs, flat):
            for i, d in enumerate(spec.shape):
                if isinstance(d, str) and d in sizes and x.shape[i] != sizes[d]:
                    x = x.index_select(i, torch.arange(sizes[d]) % x.shape[i])
            out.append(x)
        return out

    def call_args(self, flat: Sequence[Any]) -> tuple[tuple, dict[str, Any]]:
        """(args, kwargs) that pass the flat inputs `flat` to the model (forward's leading parameters by
        position, the rest by keyword)."""
        values = {name: tree.build(flat) for name, tree in self.args.items()}
        args = []
        for name in self.positional:
            if name not in values:
                break
            args.append(values.pop(name))
        return tuple(args), values

    def dim_sizes(self, flat: Sequence[Any]) -> dict[str, int]:
        """The size of each dynamic dim in the flat inputs `flat`."""
        return {d: int(x.shape[i]) for spec, x in zip(self.inputs, flat) for i, d in enumerate(spec.shape)
                if isinstance(d, str)}

    # -- call time ---------------------------------------------------------------------------
    def flatten(self, args: tuple, kwargs: Mapping[str, Any]) -> list[Any]:
        """The engine inputs for `model(*args, **kwargs)`, checked against the signature."""
        if self._fast is not None and not kwargs and len(args) == len(self._fast):
            flat = list(args)
        else:
            flat = [None] * len(self.inputs)
            for name, value in self._bind(args, kwargs).items():
                tree = self.args.get(name)
                if tree is None:
                    self._check_fixed(name, value)
                    continue
                leaves, spec = pytree.tree_flatten(value)
                if spec != tree.spec:
                    raise InputError(f"input {name!r}: structure {spec} differs from the compiled {tree.spec}")
                for leaf, got in zip(tree.leaves, leaves):
                    if leaf.index is not None:
                        flat[leaf.index] = got
                    elif not _same_constant(got, leaf.value):
                        raise InputError(f"input {name!r}: {got!r} was fixed to {leaf.value!r} at compile time; "
                                         "recompile with this value in example_inputs")
        self.check(flat)
        return flat

    def _bind(self, args: tuple, kwargs: Mapping[str, Any]) -> dict[str, Any]:
        if len(args) > len(self.positional):
            raise InputError(f"got {len(args)} positional inputs, the model takes at most {len(self.positional)} "
                             f"({', '.join(self.positional)})")
        bound = dict(zip(self.positional, args))
        for name, value in kwargs.items():
            if name in bound:
                raise InputError(f"input {name!r} given both by position and by keyword")
            if name not in self.args and name not in self.defaults:
                raise InputError(f"unknown input {name!r}; the model takes {', '.join(self.positional + self.keyword_only)}")
            bound[name] = value
        missing = [n for n in self.args if n not in bound]
        if missing:
            raise InputError(f"missing input(s) {', '.join(map(repr, missing))}; expected {', '.join(self.args)}")
        return bound

    def _check_fixed(self, name: str, value: Any) -> None:
        default = self.defaults[name]
        if not (isinstance(default, JSON_SCALARS) and _same_constant(value, default)):
            raise InputError(f"input {name!r} was not in example_inputs, so it is fixed at its default "
                             f"{default!r}; recompile with {name!r} in example_inputs to vary it")

    def check(self, flat: Sequence[Any]) -> None:
        """Raise InputError naming the input when a value does not fit its TensorSpec."""
        sizes: dict[str, int] = {}
        for spec, value in zip(self.inputs, flat):
            if isinstance(value, torch.Tensor):
                if value.layout is not torch.strided or value.is_meta:
                    what = "on the meta device, holding no data" if value.is_meta else f"a {value.layout} tensor"
                    raise InputError(f"input {spec.name!r} is {what}; pass a dense tensor with data "
                                     f"(e.g. x.to_dense())")
                dtype = value.dtype
            elif isinstance(value, np.ndarray):
                dtype = spec.dtype if value.dtype == numpy_dtype(spec.dtype) else torch_dtype(value.dtype)
                if dtype is None:
                    raise InputError(f"input {spec.name!r}: numpy dtype {value.dtype} has no torch dtype, expected "
                                     f"{str(spec.dtype).removeprefix('torch.')}")
            else:
                raise InputError(f"input {spec.name!r}: expected a torch.Tensor or numpy array, got {type(value).__name__}")
            if dtype != spec.dtype:
                raise InputError(f"input {spec.name!r}: dtype {str(dtype).removeprefix('torch.')}, "
                                 f"expected {str(spec.dtype).removeprefix('torch.')}")
            shape = value.shape
            if len(shape) != len(spec.shape):
                raise InputError(f"input {spec.name!r}: rank {len(shape)} (shape {tuple(shape)}), "
                                 f"expected rank {len(spec.shape)} (shape {_fmt_shape(spec.shape)})")
            for i, (got, want) in enumerate(zip(shape, spec.shape)):
                if isinstance(want, int):
                    if got != want:
                        raise InputError(f"input {spec.name!r}: dim {i} is {got}, expected {want} "
                                         f"(static; shape {_fmt_shape(spec.shape)}). Declare it in dynamic_shapes to vary it")
                    continue
                rng = self.dims[want]
                if not rng.contains(got):
                    raise InputError(f"input {spec.name!r}: dim {i} ({want!r}) is {got}, allowed {rng}")
                if sizes.setdefault(want, got) != got:
                    raise InputError(f"input {spec.name!r}: dim {i} ({want!r}) is {got}, but another input "
                                     f"has {want!r} = {sizes[want]}; dims with one name must be equal")
            if self.index_bounds and spec.name in self.index_bounds and value.size:
                low, high, what = self.index_bounds[spec.name]
                least, most = int(value.min()), int(value.max())
                if least < low or most >= high:
                    bad = least if least < low else most
                    raise InputError(f"input {spec.name!r}: index {bad} is out of range for {what}: indices must "
                                     f"lie in [{low}, {high - 1}]; eager raises IndexError here, and an engine "
                                     "would return a wrong row or zeros")

    def unflatten(self, outputs: Sequence[Any]) -> Any:
        return self.output.build(outputs)

    # -- persistence -------------------------------------------------------------------------
    def to_dict(self) -> dict[str, Any]:
        return {
            "positional": list(self.positional), "keyword_only": list(self.keyword_only),
            "args": {k: t.to_dict() for k, t in self.args.items()},
            "defaults": {k: v if isinstance(v, JSON_SCALARS) else {"unserializable": repr(v)} for k, v in self.defaults.items()},
            "inputs": [s.to_dict() for s in self.inputs],
            "dims": {k: {"min": r.min, "opt": r.opt, "max": r.max} for k, r in self.dims.items()},
            "outputs": [s.to_dict() for s in self.outputs],
            "output": self.output.to_dict(),
            "batch": self.batch,
            "index_bounds": {k: list(v) for k, v in self.index_bounds.items()},
            "batch_independent": self.batch_independent,
            "batch_evidence": self.batch_evidence,
            "masks": dict(self.masks),
            "aliases": [dataclasses.asdict(a) for a in self.aliases],
        }

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> "Signature":
        """The signature saved by `to_dict`, checked whole: every field's type, and every tree leaf, shape and
        dim naming something that exists. ValueError naming what is malformed."""
        w = "signature"
        if not isinstance(d, dict):
            raise ValueError(f"{w}: expected an object, got {type(d).__name__}")
        args = from_json(dict[str, Any], _key(d, "args", w), f"{w}.args")
        dims = from_json(dict[str, DimRange], _key(d, "dims", w), f"{w}.dims")
        sig = cls(
            positional=from_json(tuple[str, ...], _key(d, "positional", w), f"{w}.positional"),
            keyword_only=from_json(tuple[str, ...], _key(d, "keyword_only", w), f"{w}.keyword_only"),
            args={k: Tree.from_dict(t, f"{w}.args[{k!r}]") for k, t in args.items()},
            defaults=from_json(dict[str, Any], _key(d, "defaults", w), f"{w}.defaults"),
            inputs=tuple(TensorSpec.from_dict(s, f"{w}.inputs[{i}]")
                         for i, s in enumerate(from_json(list[Any], _key(d, "inputs", w), f"{w}.inputs"))),
            dims=dims,
            outputs=tuple(TensorSpec.from_dict(s, f"{w}.outputs[{i}]")
                          for i, s in enumerate(from_json(list[Any], _key(d, "outputs", w), f"{w}.outputs"))),
            output=Tree.from_dict(_key(d, "output", w), f"{w}.output"),
            batch=from_json(str | None, d.get("batch", "batch" if "batch" in dims else None), f"{w}.batch"),
            index_bounds={k: v if len(v) == 3 else (0, v[0], f"{v[1]} (nn.Embedding with {v[0]} rows)")
                          for k, v in from_json(dict[str, tuple[int, int, str] | tuple[int, str]],
                                                d.get("index_bounds") or {}, f"{w}.index_bounds").items()},
            batch_independent=from_json(bool | None, d.get("batch_independent"), f"{w}.batch_independent"),
            batch_evidence=from_json(str, d.get("batch_evidence") or "", f"{w}.batch_evidence"),
            masks=from_json(dict[str, str], d.get("masks") or {}, f"{w}.masks"),
            aliases=from_json(tuple[Alias, ...], d.get("aliases") or [], f"{w}.aliases"),
        )
        sig._check_consistent()
        return sig

    def _check_consistent(self) -> None:
        params, given = set(self.positional) | set(self.keyword_only), set(self.args) | set(self.defaults)
        if params != given or set(self.args) & set(self.defaults):
            raise ValueError(f"signature: the parameters {sorted(params)} are not each either given (args) or "
                             f"fixed (defaults): args {sorted(self.args)}, defaults {sorted(self.defaults)}")
        for name, tree in self.args.items():
            tree.check_slots(self.inputs, f"signature.args[{name!r}]")
        fed = sorted(l.index for t in self.args.values() for l in t.leaves if l.index is not None)
        if fed != list(range(len(self.inputs))):
            raise ValueError(f"signature.args: the inputs' leaves must feed each of the {len(self.inputs)} engine "
                             f"inputs once; they feed {fed}")
        self.output.check_slots(self.outputs, "signature.output")
        for kind, specs in (("inputs", self.inputs), ("outputs", self.outputs)):
            for spec in specs:
                for size in spec.shape:
                    if isinstance(size, str) and size not in self.dims and not (kind == "outputs" and size == "?"):
                        raise ValueError(f"signature.{kind}: {spec.name} names dim {size!r}, which is not in dims")
                    if isinstance(size, int) and size < 0:
                        raise ValueError(f"signature.{kind}: {spec.name} has a negative size {size}")
        if self.batch is not None and self.batch not in self.dims:
            raise ValueError(f"signature.batch: {self.batch!r} is not in dims")
        unknown = set(self.index_bounds) - {s.name for s in self.inputs}
        if unknown:
            raise ValueError(f"signature.index_bounds names no input {sorted(unknown)}")
        for a in self.aliases:
            count = len(self.inputs) if a.of == "input" else a.output
            if not 0 <= a.output < len(self.outputs) or a.of not in ("input", "output") or not 0 <= a.index < count:
                raise ValueError(f"signature.aliases: {a} names no input or earlier output")
        problem = mask_problem(self.inputs, self.masks)
        if problem:
            raise ValueError(f"signature.masks: {problem}")


#: input names taken for padding masks when compile is not told (`detect_masks`): (name part, meaning)
MASK_NAMES = (("padding_mask", "pad"), ("attention_mask", "keep"), ("input_mask", "keep"))
MASK_MEANINGS = ("keep", "pad")


def detect_masks(inputs: Sequence[TensorSpec]) -> dict[str, str]:
    """The padding masks among `inputs`: integer or bool inputs of rank 2 named like `attention_mask`
    ("keep": nonzero marks a real token) or `key_padding_mask` ("pad": True marks padding)."""
    found = {}
    for spec in inputs:
        if not _maskable(spec):
            continue
        leaf = spec.name.rsplit(".", 1)[-1].lower()
        meaning = next((m for part, m in MASK_NAMES if part in leaf), None)
        if meaning is not None:
            found[spec.name] = meaning
    return found


def _maskable(spec: TensorSpec) -> bool:
    """Whether an input can be a padding mask: integer or bool, of shape (batch, sequence)."""
    return len(spec.shape) == 2 and not (spec.dtype.is_floating_point or spec.dtype.is_complex)


def mask_problem(inputs: Sequence[TensorSpec], masks: Mapping[str, str]) -> str | None:
    """What is wrong with `masks` for these inputs (None: nothing): each must name an integer or bool input of
    rank 2 (batch, sequence) and say "keep" or "pad"."""
    specs = {s.name: s for s in inputs}
    for name, meaning in masks.items():
        spec = specs.get(name)
        if spec is None:
            return f"{name!r} is no input (inputs: {', '.join(map(repr, specs))})"
        if meaning not in MASK_MEANINGS:
            return f"{name!r}: {meaning!r} is neither \"keep\" (nonzero marks a real position) nor \"pad\" " \
                   "(nonzero marks padding)"
        if not _maskable(spec):
            return f"{name!r} is {str(spec.dtype).removeprefix('torch.')}{_fmt_shape(spec.shape)}; a padding mask " \
                   "is an integer or bool input of shape (batch, sequence)"
    return None


def _fmt_shape(shape: Sequence[int | str]) -> str:
    return "(" + ", ".join(map(str, shape)) + ")"


def _same_constant(a: Any, b: Any) -> bool:
    return a is b or (type(a) is type(b) and isinstance(a, JSON_SCALARS) and a == b)


def as_call(example_inputs: Any) -> tuple[tuple, dict]:
    """example_inputs as (args, kwargs): tuple = positional, dict = keyword, anything else = one argument."""
    if isinstance(example_inputs, tuple):
        return example_inputs, {}
    if isinstance(example_inputs, dict):
        return (), dict(example_inputs)
    return (example_inputs,), {}


class FlatModule(torch.nn.Module):
    """`model` behind the flat calling convention that exporters and engines see: tensors in, tensors out."""

    def __init__(self, model: torch.nn.Module, signature: Signature):
        super().__init__()
        self.model = model
        self.signature = signature
        params = inspect.signature(model.forward).parameters
        self.positional_only = [n for n, p in params.items() if p.kind is p.POSITIONAL_ONLY]

    def forward(self, *flat: torch.Tensor) -> tuple[torch.Tensor, ...]:
        values = {name: tree.build(flat) for name, tree in self.signature.args.items()}
        positional = [values.pop(n) for n in self.positional_only if n in values]
        out = self.model(*positional, **values)
        return tuple(l for l in pytree.tree_leaves(out) if isinstance(l, torch.Tensor))


def _key(d: Any, key: str, where: str) -> Any:
    """`d[key]` of a saved record; ValueError naming `where` when `d` is no object or lacks the key."""
    if not isinstance(d, dict):
        raise ValueError(f"{where}: expected an object, got {type(d).__name__}")
    if key not in d:
        raise ValueError(f"{where}: '{key}' is missing")
    return d[key]
