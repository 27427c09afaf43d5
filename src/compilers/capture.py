"""Eager capture: run the model on its example inputs (and on them grown along their dynamic dims) to find
its Signature (`signature.py`): the inputs' names, dtypes and dynamic dims, the output structure and the dims
each output follows, the batch dim, the fixed-size tables integer inputs index, and which outputs share memory
with an input or another output; and keep those eager runs for validation to reuse (after checking that
eager answers the example twice alike: `determinism.py`).
"""
from __future__ import annotations

import contextlib
import dataclasses
import inspect
from dataclasses import dataclass
from typing import Any, Iterator, Mapping, Sequence

import torch
from torch.utils import _pytree as pytree

from .determinism import check_repeatable
from .errors import CompilerError, ExportError, InputError, TargetError
from .state import restore_modes, train_modes, unchanged_state
from .signature import (JSON_SCALARS, Alias, Leaf, Signature, TensorSpec, Tree, as_call, detect_masks,
                        storage_address)
from .target import DimRange


def flatten_with_path(tree: Any) -> tuple[list[tuple[tuple, Any]], pytree.TreeSpec]:
    """Leaves with their key paths; containers registered without key support get positional paths."""
    try:
        return pytree.tree_flatten_with_path(tree)
    except ValueError:
        leaves, spec = pytree.tree_flatten(tree)
        return [((pytree.SequenceKey(i),), leaf) for i, leaf in enumerate(leaves)], spec


def path_name(root: str, path: Sequence[Any]) -> str:
    """`output.hidden`, `output.0`, `past.1.0`: a leaf's name from its pytree key path."""
    parts = [str(getattr(k, "key", getattr(k, "idx", getattr(k, "name", k)))) for k in path]
    return ".".join([root, *parts])


def capture(model: torch.nn.Module, example_inputs: Any, dynamic_shapes: Mapping[str, Mapping[int, str]] | None,
            shape_ranges: Mapping[str, Mapping[int, DimRange]]) -> "Captured":
    """Bind the examples to `model.forward`, run eager on them (and on them grown along their dynamic dims)
    for the output structure and shapes; return the Signature and those eager runs."""
    args, kwargs = as_call(example_inputs)
    params = inspect.signature(model.forward).parameters
    if any(p.kind is p.VAR_POSITIONAL for p in params.values()):
        raise InputError(f"{type(model).__name__}.forward takes *args; wrap the model in a module with named parameters")
    try:
        bound = inspect.signature(model.forward).bind(*args, **kwargs)
    except TypeError as e:
        raise InputError(f"example_inputs do not fit {type(model).__name__}.forward{inspect.signature(model.forward)}: {e}") from None

    given: dict[str, Any] = {}
    for name, value in bound.arguments.items():
        if params[name].kind is params[name].VAR_KEYWORD:
            given.update(value)  # extra keywords that forward(**kwargs) accepts become inputs of their own
        else:
            given[name] = value
    positional = tuple(n for n, p in params.items() if p.kind in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD))
    keyword_only = tuple(n for n, p in params.items() if p.kind is p.KEYWORD_ONLY) + \
        tuple(n for n in given if n not in params)
    defaults = {n: p.default for n, p in params.items()
                if n not in given and p.kind not in (p.VAR_KEYWORD, p.VAR_POSITIONAL)}

    trees: dict[str, Tree] = {}
    inputs: list[TensorSpec] = []
    tensors: list[torch.Tensor] = []
    for name, value in given.items():
        leaves, spec = flatten_with_path(value)
        tree_leaves = []
        for path, leaf in leaves:
            if isinstance(leaf, torch.Tensor):
                tree_leaves.append(Leaf(index=len(inputs)))
                inputs.append(TensorSpec(path_name(name, path), leaf.dtype, tuple(leaf.shape)))
                tensors.append(leaf)
            elif isinstance(leaf, JSON_SCALARS):
                tree_leaves.append(Leaf(value=leaf))
            else:
                raise InputError(f"input {name!r} holds a {type(leaf).__name__}; inputs may hold tensors and "
                                 "None/bool/int/float/str constants only")
        trees[name] = Tree(spec, tuple(tree_leaves))
    if not inputs:
        raise InputError("example_inputs hold no tensor; give at least one tensor input")

    inputs, dims = _apply_dynamic(inputs, tensors, dynamic_shapes, shape_ranges)

    modes = train_modes(model)
    model.eval()
    try:
        versions = [_version(t) for t in tensors]
        with torch.inference_mode(), _lookups(model) as lookups, unchanged_state(model):
            reference = model(*args, **kwargs)
        changed = [spec.name for spec, t, v in zip(inputs, tensors, versions) if v is not None and _version(t) != v]
        if changed:
            raise InputError(f"the model changes its input(s) {', '.join(map(repr, changed))} in place (x.add_(), "
                             "x.clamp_(), x[...] = ...): a compiled engine never changes the caller's tensors, so "
                             "it cannot do what eager does. Clone in forward (x = x.clone()) or use the "
                             "out-of-place op; note that this eager run changed your example tensor(s) too")
        out_leaves, out_spec = flatten_with_path(reference)
        outputs: list[TensorSpec] = []
        leaves = []
        for j, (path, leaf) in enumerate(out_leaves):
            if isinstance(leaf, torch.Tensor):
                leaves.append(Leaf(index=len(outputs)))
                outputs.append(TensorSpec(path_name("output", path), leaf.dtype, tuple(leaf.shape)))
            elif isinstance(leaf, JSON_SCALARS):
                leaves.append(Leaf(value=leaf))
            else:
                hint = " (a Hugging Face model returns its KV cache: pass use_cache=False in its config)" \
                    if "Cache" in type(leaf).__name__ else ""
                raise InputError(f"the model returns a {type(leaf).__name__} (output leaf {j}); outputs may hold "
                                 f"tensors and None/bool/int/float/str constants only{hint}")
        if not outputs:
            raise InputError("the model returns no tensor; there is nothing to compile")
        # before any other eager run: every later one (the reference, its perturbed-rounding noise estimate)
        # takes the model's outputs for a function of its inputs, and would absorb its randomness as noise
        check_repeatable(model, lambda: _again(model, args, kwargs), [leaf for _, leaf in out_leaves],
                         [path_name("output", path) for path, _ in out_leaves])
        sig = Signature(positional, keyword_only, trees, defaults, tuple(inputs), dims, tuple(outputs),
                        Tree(out_spec, tuple(leaves)), batch=_batch_name(inputs, dims),
                        index_bounds=_index_bounds(inputs, tensors, lookups), masks=detect_masks(inputs))
        example = sig.flatten(args, kwargs)
        runs = [(example, [l for _, l in out_leaves if isinstance(l, torch.Tensor)])]
        notes = []
        grown = sig.grown(example)
        grown_leaves = None
        if grown is not None:
            try:
                with torch.inference_mode(), unchanged_state(model):
                    g_args, g_kwargs = sig.call_args(grown)
                    grown_leaves, grown_spec = flatten_with_path(model(*g_args, **g_kwargs))
                runs.append((grown, [l for _, l in grown_leaves if isinstance(l, torch.Tensor)]))
                if grown_spec != out_spec:
                    grown_leaves = None
            except CompilerError:
                raise
            except Exception as e:
                notes.append(f"eager fails on the example grown along its dynamic dims ({type(e).__name__}: "
                             f"{str(e)[:200]}); output dims are taken from the example alone")
    finally:
        restore_modes(modes)
    # the memory eager's outputs share in every eager run (one run may take a path the other does not)
    first, *others = [shared_memory(flat, outs) for flat, outs in runs]
    sig = dataclasses.replace(sig, outputs=_output_dims(sig, runs),
                              aliases=tuple(a for a in first if all(a in other for other in others)))
    if grown_leaves is not None:
        sig = _constants_that_vary(sig, out_leaves, grown_leaves, runs)
    return Captured(sig, [EagerRun(flat, outs) for flat, outs in runs], notes)


def _again(model: torch.nn.Module, args: tuple, kwargs: dict[str, Any]) -> list[Any]:
    """The flat outputs of eager called again as capture first called it (under the same lookup recording, which
    switches PyTorch's native fast paths off: nn.TransformerEncoder's nested tensors fill padding otherwise)."""
    with _lookups(model):
        return [leaf for _, leaf in flatten_with_path(model(*args, **kwargs))[0]]


def _constants_that_vary(sig: Signature, example: list[tuple[tuple, Any]], grown: list[tuple[tuple, Any]],
                         runs: list[tuple[list[Any], list[torch.Tensor]]]) -> Signature:
    """The signature with each non-tensor output leaf that changed between the example and the grown example
    read from an output's size at call time (it equals a dynamic dim an output has); ExportError otherwise,
    since an engine returns tensors only and would freeze it."""
    sizes = [sig.dim_sizes(flat) for flat, _ in runs]
    leaves = list(sig.output.leaves)
    for j, ((path, a), (_, b)) in enumerate(zip(example, grown)):
        if leaves[j].index is not None or a == b or (a != a and b != b):
            continue
        name = path_name("output", path)
        dims = [d for d in sig.dims if (sizes[0][d], sizes[1][d]) == (a, b)] \
            if type(a) is int and type(b) is int else []
        where = next(((k, spec.shape.index(d)) for d in dims for k, spec in enumerate(sig.outputs) if d in spec.shape),
                     None)
        if where is None:
            raise ExportError(
                f"output leaf {name!r} is a Python {type(a).__name__} that depends on the inputs ({a!r} for the "
                f"example, {b!r} for the example grown along its dynamic dims); an engine returns tensors only, so "
                f"the compiled model would return {a!r} for every input. Return it as a tensor computed from the "
                "inputs, or compute it outside the model")
        leaves[j] = Leaf(size=where)
    return dataclasses.replace(sig, output=Tree(sig.output.spec, tuple(leaves)))


def shared_memory(inputs: Sequence[Any], outputs: Sequence[torch.Tensor]) -> tuple[Alias, ...]:
    """Each output that shares memory with an input or an earlier output: the first of those, inputs first."""
    owners: dict[int, tuple[str, int, torch.Tensor]] = {}
    for i, x in enumerate(inputs):
        if isinstance(x, torch.Tensor) and storage_address(x):
            owners.setdefault(storage_address(x), ("input", i, x))
    aliases = []
    for j, y in enumerate(outputs):
        address = storage_address(y)
        if not address:
            continue
        if address not in owners:
            owners[address] = ("output", j, y)
            continue
        of, index, t = owners[address]
        whole = (y.dtype, y.shape, y.stride(), y.storage_offset()) == (t.dtype, t.shape, t.stride(), t.storage_offset())
        aliases.append(Alias(j, of, index, whole))
    return tuple(aliases)


_EMBEDDINGS = (torch.nn.Embedding, torch.nn.EmbeddingBag)


@dataclass(frozen=True)
class Lookup:
    """One lookup the eager run made into a tensor of fixed size: `indices` must lie in [low, high)."""

    indices: torch.Tensor
    low: int
    high: int
    what: str            # "emb (nn.Embedding with 10 rows)", "'w' (10 rows along dim 0, indexed by [...])"


class _LookupMode(torch.overrides.TorchFunctionMode):
    """Records lookups into the model's parameters and buffers while it runs: `w[idx]` (and `w[:, idx]`),
    `index_select`, and `F.embedding` / `F.embedding_bag` (so every nn.Embedding and nn.EmbeddingBag call). An
    engine cannot know those sizes are bounds, so an index outside them gives a wrong row or zeros, where eager
    raises IndexError."""

    def __init__(self, model: torch.nn.Module, found: list[Lookup]):
        super().__init__()
        self.found = found
        self.names = {id(t): repr(name) for name, t in [*model.named_parameters(), *model.named_buffers()]}
        self.names.update({id(m.weight): f"{name or type(model).__name__} (nn.{type(m).__name__} with "
                                         f"{m.num_embeddings} rows)"
                           for name, m in model.named_modules() if isinstance(m, _EMBEDDINGS)})

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        try:
            self._record(func, args, kwargs)
        except Exception:       # recording is best effort; the model's own call decides what happens
            pass
        return func(*args, **kwargs)

    def _record(self, func, args, kwargs) -> None:
        if func is torch.Tensor.__getitem__:
            table, key = args
            for dim, k in enumerate(key if isinstance(key, tuple) else (key,)):
                if isinstance(k, torch.Tensor) and not k.dtype.is_floating_point and k.dtype != torch.bool:
                    self._add(k, table, dim, -table.shape[dim], "[...]")     # Python's negative indices work
                if not (isinstance(k, slice) and k == slice(None)):
                    break      # after the first index that is not a full slice, dims no longer line up
        elif func in (torch.index_select, torch.Tensor.index_select):
            table = args[0]
            dim = (args[1] if len(args) > 1 else kwargs["dim"]) % table.dim()
            self._add(args[2] if len(args) > 2 else kwargs["index"], table, dim, 0, "index_select")
        elif func in (torch.nn.functional.embedding, torch.nn.functional.embedding_bag):
            self._add(args[0], args[1] if len(args) > 1 else kwargs["weight"], 0, 0, "")

    def _add(self, index: Any, table: torch.Tensor, dim: int, low: int, how: str) -> None:
        name = self.names.get(id(table))
        if name is not None and isinstance(index, torch.Tensor):
            rows = table.shape[dim]
            what = f"{name} ({rows} rows along dim {dim}, indexed by {how})" if how else name
            self.found.append(Lookup(index, low, rows, what))


@contextlib.contextmanager
def _lookups(model: torch.nn.Module) -> Iterator[list[Lookup]]:
    """Each lookup into a fixed-size table (`_LookupMode`) that the model makes while the block runs it."""
    found: list[Lookup] = []
    with _LookupMode(model, found):
        yield found


def _index_bounds(inputs: Sequence[TensorSpec], tensors: Sequence[torch.Tensor],
                  lookups: Sequence[Lookup]) -> dict[str, tuple[int, int, str]]:
    """Integer inputs that index a fixed-size table directly (the same tensor, or a view of it with its shape):
    input name -> (low, high, what), the narrowest range over every lookup it makes."""
    bounds: dict[str, tuple[int, int, str]] = {}
    for spec, t in zip(inputs, tensors):
        if t.dtype.is_floating_point or t.dtype.is_complex or t.dtype == torch.bool:
            continue
        for found in lookups:
            x = found.indices
            if x is t or (x.dtype == t.dtype and x.shape == t.shape and x.stride() == t.stride()
                          and x.numel() and x.data_ptr() == t.data_ptr()):
                low, high, what = bounds.get(spec.name, (found.low, found.high, found.what))
                bounds[spec.name] = (max(low, found.low), min(high, found.high),
                                     found.what if found.high < high else what)
    return bounds


@dataclass(frozen=True)
class EagerRun:
    """Flat inputs and the eager model's flat outputs for them."""

    inputs: list[Any]
    outputs: list[torch.Tensor]


@dataclass(frozen=True)
class Captured:
    """What capture found: the Signature, and the eager runs it made (the example first) for reuse."""

    signature: Signature
    runs: list[EagerRun]
    notes: list[str]


def _batch_name(inputs: Sequence[TensorSpec], dims: Mapping[str, DimRange]) -> str | None:
    """The batch dim: one named "batch", else the dynamic dim that leads every input that leads with one."""
    if "batch" in dims:
        return "batch"
    leading = {s.shape[0] for s in inputs if s.shape and isinstance(s.shape[0], str)}
    return leading.pop() if len(leading) == 1 else None


def _output_dims(sig: Signature, runs: list[tuple[list[Any], list[torch.Tensor]]]) -> tuple[TensorSpec, ...]:
    """Output specs whose sizes are named after the input dims they follow across the eager runs."""
    sizes = [sig.dim_sizes(flat) for flat, _ in runs]
    varied = [d for d in sig.dims if len({s[d] for s in sizes}) > 1]
    specs = []
    for j, spec in enumerate(sig.outputs):
        shapes = [tuple(outs[j].shape) for _, outs in runs]
        if len({len(s) for s in shapes}) > 1:
            specs.append(dataclasses.replace(spec, shape=tuple("?" for _ in shapes[0])))
            continue
        shape: list[int | str] = []
        for k in range(len(shapes[0])):
            got = [s[k] for s in shapes]
            named = [d for d in varied if all(s[d] == g for s, g in zip(sizes, got))]
            if named:   # sizes that coincide in every run stay ambiguous: prefer the batch dim first, then unused ones
                fresh = [d for d in named if d not in shape] or named
                shape.append(sig.batch if k == 0 and sig.batch in fresh else fresh[0])
            else:
                shape.append(got[0] if len(set(got)) == 1 else "?")
        specs.append(dataclasses.replace(spec, shape=tuple(shape)))
    return tuple(specs)


def _version(t: torch.Tensor) -> int | None:
    """A tensor's version counter (in-place changes bump it); None for an inference tensor, which has none."""
    try:
        return t._version
    except RuntimeError:
        return None


def _check_dynamic_shapes(dynamic_shapes: Any) -> None:
    """InputError unless `dynamic_shapes` is {input name: {dim index: dim name}} (or an input's entry None)."""
    example = 'dynamic_shapes={"x": {0: "batch"}}'
    if not isinstance(dynamic_shapes, Mapping):
        raise InputError(f"dynamic_shapes must be a dict of input name -> {{dim index: dim name}}, like {example}; "
                         f"not {type(dynamic_shapes).__name__}")
    for name, dims in dynamic_shapes.items():
        if dims is None:
            continue
        if not isinstance(dims, Mapping):
            raise InputError(f"dynamic_shapes[{name!r}] must be a dict of dim index -> dim name, like {example}; "
                             f"not {type(dims).__name__} {dims!r}")
        for i, dim_name in dims.items():
            if isinstance(i, bool) or not isinstance(i, int):
                raise InputError(f"dynamic_shapes[{name!r}]: dim {i!r} must be an integer index, like {example}")
            if not isinstance(dim_name, str) or not dim_name:
                raise InputError(f"dynamic_shapes[{name!r}][{i}] = {dim_name!r} must be a dim name (a non-empty "
                                 f"string; equal names mean equal sizes), like {example}")


def _apply_dynamic(inputs: list[TensorSpec], tensors: list[torch.Tensor],
                   dynamic_shapes: Mapping[str, Mapping[int, str]] | None,
                   shape_ranges: Mapping[str, Mapping[int, DimRange]]) -> tuple[list[TensorSpec], dict[str, DimRange]]:
    """Name the dynamic dimensions: user's `dynamic_shapes`, or dim 0 as "batch" by default."""
    names = {s.name for s in inputs}
    if dynamic_shapes is None:
        batch = tensors[0].shape[0] if tensors[0].dim() else None
        dynamic_shapes = {s.name: {0: "batch"} for s, t in zip(inputs, tensors) if t.dim() and t.shape[0] == batch}
    _check_dynamic_shapes(dynamic_shapes)
    unknown = set(dynamic_shapes) - names
    if unknown:
        raise InputError(f"dynamic_shapes names unknown input(s) {sorted(unknown)}; inputs are {sorted(names)}")
    stray = set(shape_ranges) - names
    if stray:
        raise InputError(f"the target's [shapes] name unknown input(s) {sorted(stray)}; inputs are {sorted(names)}")
    dims: dict[str, DimRange] = {}
    sizes: dict[str, int] = {}
    out = []
    for spec in inputs:
        shape = list(spec.shape)
        for i, dim_name in (dynamic_shapes.get(spec.name) or {}).items():
            if not isinstance(i, int) or not -len(shape) <= i < len(shape):
                raise InputError(f"dynamic_shapes[{spec.name!r}]: dim {i!r} does not exist; the input has rank {len(shape)}")
            i %= len(shape)
            if sizes.setdefault(dim_name, shape[i]) != shape[i]:
                raise InputError(f"dynamic dim {dim_name!r} is {shape[i]} in input {spec.name!r} but {sizes[dim_name]} "
                                 "elsewhere in example_inputs; dims sharing a name must have equal sizes")
            rng = (shape_ranges.get(spec.name) or {}).get(i) or dims.get(dim_name) or DimRange()
            if not rng.contains(shape[i]):
                raise InputError(f"input {spec.name!r}: example size {shape[i]} of dim {i} lies outside its range {rng}")
            dims[dim_name] = rng
            shape[i] = dim_name
        static = sorted(set((shape_ranges.get(spec.name) or {})) -
                        {i % len(shape) for i in (dynamic_shapes.get(spec.name) or {}) if isinstance(i, int)})
        if static:
            raise TargetError(f"the target's [shapes.{spec.name}] gives dim(s) {static} a range, but they are static "
                              f"(not in dynamic_shapes): declare them dynamic, e.g. dynamic_shapes={{{spec.name!r}: "
                              f"{{{static[0]}: 'name'}}}}, or remove the range")
        out.append(TensorSpec(spec.name, spec.dtype, tuple(shape)))
    return out, dims
