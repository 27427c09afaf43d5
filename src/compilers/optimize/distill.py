"""Knowledge distillation (issue 22): train a smaller student to reproduce a teacher's outputs on data the user
already has (the calibration samples: no labels needed), so a pruned or narrower model gets its accuracy back.

`distill(teacher, student, data, ...)` deep-copies the student and trains the copy; the teacher runs in eval mode
under `no_grad` and is left exactly as it was. Outputs are matched leaf by leaf (tensors, tuples, dicts, nested,
as compile takes them): the student must return the same structure with the same shapes, and the per-leaf
losses are summed. With `loss="auto"` each floating-point leaf gets, from the teacher's output on the first batch:

  * "kl" (logits): a leaf named like `logits`, or an unnamed 2-D (batch, classes) output whose rows are not unit
    vectors: KL divergence between the softened distributions softmax(z / T), scaled by T² (Hinton et al., 2015),
    the class dim being the last;
  * "cosine" (normalised embeddings): a leaf whose rows along the last dim all have L2 norm 1: mean of 1 - cos;
  * "mse" (hidden states, un-normalised embeddings, regression outputs): any other leaf, named ones such as
    `last_hidden_state` and `pooler_output` included.

Integer and bool leaves (argmax indices, masks) must match in structure but are not trained on. `loss` may also
name one kind for every leaf, or be a callable `fn(student_output, teacher_output, labels) -> scalar tensor`
that is the whole objective. With `labels` (class indices, one per row of the data) the objective becomes
`alpha * distillation + (1 - alpha) * cross_entropy(student logits, labels)` on the one "kl" leaf.

Data: an iterable of items shaped like compile's example_inputs and calibration samples (a tuple of positional
arguments, a dict of keyword arguments, or one tensor; a DataLoader's list is read as the tuple it was). When
the items agree in structure and in every tensor's shape but dim 0 (the batch), their rows are pooled and each
epoch draws `batch_size` rows at a time in a seeded random order; otherwise (e.g. token batches padded to
different lengths) each item stays one batch and only their order is shuffled.

Hidden states (`hidden={student module: teacher module}`, by dotted name, as in DistilBERT, TinyBERT and MiniLM):
forward hooks keep what each named module returns (its first floating-point tensor, e.g. an encoder layer's
hidden states), and the relative MSE of each pair (mean squared error / the teacher's mean square, so 1 means "no
better than zeros" at any scale) is averaged over the pairs, times `hidden_weight`, and added to the output loss.
For a student made by `drop_layers(keep=...)`, map its layer i to the teacher's layer keep[i]. The pairs must
return the same shapes (checked on the first batch: an InputError says which pair differs): a student whose
hidden width was pruned cannot be matched this way; one with heads pruned or layers dropped can. The hooks are
removed when training ends.

The teacher runs once per sample, not at every step: its outputs (and hidden states) for a sample are kept from
the first time the sample is drawn, when those for all the data fit in CACHE_BYTES (1 GiB) and every output has
the batch dim; otherwise it runs on each batch. The teacher is in eval mode, so both give the same targets (up to
float rounding); after the first epoch a step costs the student's forward and backward pass only.

Training is bounded (epochs, steps and/or seconds: at least one; the first reached stops it), deterministic for
a seed when bounded by epochs or steps (`torch.manual_seed` inside a forked RNG, a seeded generator for the
order, one thread by default, so the weights do not depend on the core count), quiet unless on a terminal.
The report gives the objective on a fixed probe (the first rows of the data, up to 256, student in eval mode;
not held out: it measures how well the student fits the teacher there) before and after training.
"""
from __future__ import annotations

import copy
import difflib
import time
from dataclasses import asdict, dataclass
from typing import Any, Callable, Iterable, Mapping, Sequence

import torch
from torch import nn
from torch.nn import functional as F
from torch.utils import _pytree as pytree

from ..calibration import guarded
from ..capture import flatten_with_path, path_name
from ..devices import to_device
from ..errors import CompilerError, InputError, brief
from ..progress import track
from ..signature import as_call
from ..state import restore_modes, train_modes

KINDS = ("kl", "mse", "cosine")
#: rows of the data the report's before/after objective is measured on
PROBE_ROWS = 256
#: the most bytes of teacher outputs (and hidden states) kept to compute them once per sample, not every step
CACHE_BYTES = 1 << 30
#: how close to 1 every row's L2 norm must be for "auto" to read an output as normalised embeddings
UNIT_NORM_TOLERANCE = 1e-3

Loss = Callable[[Any, Any, "torch.Tensor | None"], torch.Tensor]


@dataclass(frozen=True)
class DistillReport:
    """What a distillation did. `loss_start` / `loss_end`: the objective (labels' term included when given) on
    the probe, the first `probe_rows` rows of the data, with the student in eval mode."""

    steps: int
    epochs: float               # passes over the data, fractional when stopped inside one
    seconds: float              # training time, the two probe measurements not counted
    stopped_by: str             # "epochs", "steps" or "seconds": the bound that ended training
    losses: dict[str, str]      # output leaf -> "kl" | "mse" | "cosine" | "ignored" ({} for a callable loss)
    labels: bool
    batching: str               # how batches were drawn from the data
    hidden: dict[str, str]      # student module -> teacher module whose outputs were matched ({} for none)
    hidden_weight: float
    teacher_cached: bool        # the teacher's outputs kept from a sample's first use (True) or run every step
    loss_start: float
    loss_end: float
    probe_rows: int
    seed: int

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    def __str__(self) -> str:
        kinds = ", ".join(f"{k} {v}" for k, v in self.losses.items()) or "custom loss"
        hidden = (f" + {self.hidden_weight:g} x hidden-state relative mse on {len(self.hidden)} module pair"
                  f"{'s' if len(self.hidden) != 1 else ''}" if self.hidden else "")
        return (f"distilled {self.steps} steps ({self.epochs:.2f} epochs, {self.seconds:.1f} s, stopped by "
                f"{self.stopped_by}); {kinds}{' + cross-entropy on labels' if self.labels else ''}{hidden}; "
                f"teacher {'computed once per sample' if self.teacher_cached else 'run at every step'}; "
                f"objective on {self.probe_rows} probe rows {self.loss_start:.4g} -> {self.loss_end:.4g}")


@dataclass(frozen=True)
class Distilled:
    """The trained student (a copy of the one passed, in eval mode) and what training did."""

    model: nn.Module
    report: DistillReport


def distill(teacher: nn.Module, student: nn.Module, data: Iterable[Any], *, labels: Any = None,
            loss: str | Loss = "auto", temperature: float = 2.0, alpha: float = 0.5,
            hidden: Mapping[str, str] | None = None, hidden_weight: float = 1.0,
            epochs: int | None = None, max_steps: int | None = None, max_seconds: float | None = None,
            batch_size: int = 32, lr: float = 1e-3, seed: int = 0, threads: int | None = 1,
            progress: bool = True) -> Distilled:
    """Train a copy of `student` to reproduce `teacher`'s outputs on `data`; the passed models are not changed.

    data: items shaped like compile's example_inputs (tuple / dict / tensor), e.g. the calibration samples.
    labels: optional class indices, one per row of the data: a tensor of all rows in order, or one per item.
    loss: "auto" (see the module's docstring), "kl", "mse", "cosine", or `fn(student_out, teacher_out, labels)`.
    temperature: softens both distributions for "kl" (the term is scaled by its square).
    alpha: with labels, the weight of the distillation term; the cross-entropy gets 1 - alpha.
    hidden: hidden-state distillation: {student module: teacher module} by dotted name (as named_modules()
        lists them), e.g. {"bert.encoder.layer.1": "bert.encoder.layer.2"} for a student that kept teacher layer 2
        as its layer 1. Each pair's outputs (the first floating-point tensor a module returns) must have the same
        shape; their relative MSE (mean squared error / the teacher's mean square) is averaged over the pairs,
        weighted by hidden_weight and added to the output loss. Each module must run once per forward call.
    epochs / max_steps / max_seconds: bounds, at least one; the first reached stops training. A time bound
        stops at a step that depends on the machine's speed, so only the other two give repeatable weights.
    batch_size: rows per step when the items can be pooled (otherwise each item is one step).
    lr: Adam's learning rate. seed: the batch order and the student's random layers (dropout).
    threads: torch's CPU threads while training (1: weights independent of the core count; None: leave as is).
    progress: a bar per epoch on an interactive terminal.
    """
    if epochs is None and max_steps is None and max_seconds is None:
        raise InputError("distill needs a bound: give epochs=, max_steps= and/or max_seconds= (the first reached "
                         "stops training)")
    for name, value in (("epochs", epochs), ("max_steps", max_steps), ("max_seconds", max_seconds),
                        ("batch_size", batch_size), ("temperature", temperature), ("lr", lr),
                        ("hidden_weight", hidden_weight)):
        if value is not None and not value > 0:
            raise InputError(f"distill: {name} must be positive, not {value!r}")
    if not 0.0 <= alpha <= 1.0:
        raise InputError(f"distill: alpha weighs the distillation term against the labels' and must be in [0, 1], "
                         f"not {alpha!r}")
    if not callable(loss) and loss not in ("auto", *KINDS):
        raise InputError(f"distill: unknown loss {loss!r}; use 'auto', {', '.join(map(repr, KINDS))} or a callable "
                         "fn(student_output, teacher_output, labels) -> scalar tensor")
    if hidden is not None and not (isinstance(hidden, Mapping) and hidden
                                   and all(isinstance(k, str) and isinstance(v, str) for k, v in hidden.items())):
        raise InputError(f"distill hidden must be a non-empty dict {{student module name: teacher module name}}, "
                         f"e.g. {{'encoder.layer.0': 'encoder.layer.1'}}, not {hidden!r}")
    batches = _Batches(data, labels, batch_size)
    student = copy.deepcopy(student)
    teacher_modes = train_modes(teacher)
    old_threads = torch.get_num_threads()
    cuda = sorted({p.device.index or 0 for p in student.parameters() if p.is_cuda})
    try:
        teacher.eval()
        if threads is not None:
            torch.set_num_threads(threads)
        with torch.random.fork_rng(devices=cuda):
            torch.manual_seed(seed)
            objective = _Objective(teacher, student, batches, loss, temperature, alpha, dict(hidden or {}),
                                   hidden_weight)
            try:
                report = _train(student, batches, objective, epochs, max_steps, max_seconds, lr, seed, progress)
            finally:
                objective.close()
    finally:
        torch.set_num_threads(old_threads)
        restore_modes(teacher_modes)
    return Distilled(student.eval(), report)


class _Batches:
    """The user's data as batches: pooled rows re-batched in a seeded order, or the items as given."""

    def __init__(self, data: Iterable[Any], labels: Any, batch_size: int):
        if isinstance(data, (torch.Tensor, dict)) or not isinstance(data, Iterable):
            raise InputError(f"distill data must be an iterable of inputs shaped like example_inputs (a list of "
                             f"them, or a DataLoader yielding them), not {type(data).__name__}: e.g. [(x,)] or "
                             "list(x.split(32))")
        self.items = [tuple(item) if isinstance(item, list) else item for item in guarded(data, "distill data")]
        if not self.items:
            raise InputError("distill data is empty: give at least one batch of inputs")
        self.batch_size = batch_size
        flat = [pytree.tree_flatten(as_call(item)) for item in self.items]
        self.rows = [_rows(leaves) for leaves, _ in flat]
        why = _why_not_pooled(flat, self.rows)
        self.pooled = why is None
        if self.pooled:
            self.spec = flat[0][1]
            self.leaves = [torch.cat([leaves[j] for leaves, _ in flat]) if isinstance(leaf, torch.Tensor) else leaf
                           for j, leaf in enumerate(flat[0][0])]
            self.total = sum(self.rows)
            self.batching = f"{self.total} rows pooled from {len(self.items)} item(s), {batch_size} per step"
        else:
            self.batching = f"{len(self.items)} items as given, shuffled ({why})"
        self.labels = None if labels is None else self._labels(labels)

    def _labels(self, labels: Any) -> list[torch.Tensor] | torch.Tensor:
        """All rows' labels as one tensor (pooled) or one tensor per item."""
        if isinstance(labels, torch.Tensor):
            parts = None
        elif isinstance(labels, Sequence) and all(isinstance(y, torch.Tensor) for y in labels):
            parts = list(labels)
        else:
            raise InputError(f"distill labels must be a tensor of class indices (one per row of the data) or a list "
                             f"of such tensors (one per item), not {type(labels).__name__}")
        if any(r is None for r in self.rows):
            raise InputError("distill labels need every data item to have a batch dim (dim 0 of its tensors)")
        if parts is None:
            if len(labels) != sum(self.rows):
                raise InputError(f"distill labels has {len(labels)} rows but the data has {sum(self.rows)}: give one "
                                 "label per row, in the data's order")
            parts = list(labels.split(self.rows))
        if [len(y) for y in parts] != self.rows:
            raise InputError(f"distill labels per item have {[len(y) for y in parts]} rows but the data items have "
                             f"{self.rows}: give one label per row")
        if any(y.is_floating_point() or y.is_complex() for y in parts):
            raise InputError("distill labels must be integer class indices (cross-entropy on the logits output)")
        return torch.cat(parts) if self.pooled else parts

    def epoch(self, generator: torch.Generator) -> list[Any]:
        """One pass's selections, in a random order: row-index tensors (pooled) or item indices."""
        if self.pooled:
            return list(torch.randperm(self.total, generator=generator).split(self.batch_size))
        return torch.randperm(len(self.items), generator=generator).tolist()

    def probe(self) -> list[Any]:
        """The fixed selections the report's objective is measured on: the data's first rows, up to PROBE_ROWS."""
        if self.pooled:
            return list(torch.arange(min(self.total, PROBE_ROWS)).split(self.batch_size))
        chosen, rows = [], 0
        for i, r in enumerate(self.rows):
            if chosen and rows + (r or 1) > PROBE_ROWS:
                break
            chosen.append(i)
            rows += r or 1
        return chosen

    def probe_rows(self) -> int:
        return sum(len(s) if self.pooled else (self.rows[s] or 1) for s in self.probe())

    def get(self, selection: Any) -> tuple[tuple, dict, torch.Tensor | None]:
        """(args, kwargs, labels or None) of one selection."""
        if self.pooled:
            leaves = [leaf[selection] if isinstance(leaf, torch.Tensor) else leaf for leaf in self.leaves]
            args, kwargs = pytree.tree_unflatten(leaves, self.spec)
            return args, kwargs, None if self.labels is None else self.labels[selection]
        args, kwargs = as_call(self.items[selection])
        return args, kwargs, None if self.labels is None else self.labels[selection]


def _rows(leaves: list[Any]) -> int | None:
    """The batch size of an item: dim 0 shared by all its tensors, None when they do not share one."""
    sizes = {t.shape[0] if t.dim() else None for t in leaves if isinstance(t, torch.Tensor)}
    return sizes.pop() if len(sizes) == 1 else None


def _why_not_pooled(flat: list[tuple[list[Any], Any]], rows: list[int | None]) -> str | None:
    """None when the items' rows can be pooled; otherwise why not, for the report."""
    leaves0, spec0 = flat[0]
    if not any(isinstance(x, torch.Tensor) for x in leaves0):
        return "no tensor inputs"
    for i, ((leaves, spec), r) in enumerate(zip(flat, rows)):
        if r is None:
            return f"item {i}'s tensors share no batch dim"
        if spec != spec0:
            return f"item {i} is structured differently from item 0"
        for a, b in zip(leaves, leaves0):
            if isinstance(a, torch.Tensor) != isinstance(b, torch.Tensor):
                return f"item {i} is structured differently from item 0"
            if isinstance(a, torch.Tensor) and (a.shape[1:] != b.shape[1:] or a.dtype != b.dtype):
                return f"item {i}'s shapes differ from item 0's beyond dim 0"
            if not isinstance(a, torch.Tensor) and a != b:
                return f"item {i}'s non-tensor inputs differ from item 0's"
    return None


def _device(model: nn.Module) -> torch.device:
    return next((p.device for p in model.parameters()), torch.device("cpu"))


class _Taps:
    """Forward hooks that keep what named submodules return during one call of the model."""

    def __init__(self, model: nn.Module, names: list[str], who: str):
        modules = dict(model.named_modules())
        for name in names:
            if name not in modules or not name:
                raise InputError(f"distill hidden: the {who} ({type(model).__name__}) has no submodule {name!r}"
                                 f"{_did_you_mean(name, [n for n in modules if n])}. Give dotted names as "
                                 f"{who}.named_modules() lists them")
        self.names, self.who = names, who
        self.seen: dict[str, list[Any]] = {}
        self.handles = [modules[n].register_forward_hook(self._hook(n)) for n in dict.fromkeys(names)]

    def _hook(self, name: str) -> Callable[..., None]:
        def keep(module: nn.Module, args: Any, output: Any) -> None:
            self.seen.setdefault(name, []).append(output)
        return keep

    def take(self) -> list[torch.Tensor]:
        """Each name's output tensor of the call just made (the first floating-point tensor it returned)."""
        seen, self.seen = self.seen, {}
        got = []
        for name in self.names:
            calls = seen.get(name, [])
            if len(calls) != 1:
                raise InputError(f"distill hidden: the {self.who}'s {name!r} ran {len(calls)} times in one forward "
                                 "call; map modules that run exactly once per call (e.g. one encoder layer)")
            tensor = next((x for x in pytree.tree_leaves(calls[0])
                           if isinstance(x, torch.Tensor) and x.is_floating_point()), None)
            if tensor is None:
                raise InputError(f"distill hidden: the {self.who}'s {name!r} returns no floating-point tensor "
                                 f"({_describe(calls[0])}); map modules that return hidden states")
            got.append(tensor)
        return got

    def close(self) -> None:
        for handle in self.handles:
            handle.remove()
        self.seen = {}


def _did_you_mean(name: str, names: list[str]) -> str:
    """'; did you mean 'encoder.layer.3'?' from the names that end like `name` or are spelled closest to it."""
    last = name.rsplit(".", 1)[-1]
    close = [n for n in names if n.endswith("." + name) or name.endswith("." + n) or n.rsplit(".", 1)[-1] == last]
    close = list(dict.fromkeys(close[:3] + difflib.get_close_matches(name, names, n=3)))[:3]
    if close:
        return f"; did you mean {' or '.join(map(repr, close))}?"
    return f" (it has e.g. {', '.join(map(repr, names[:3]))})" if names else " (it has no submodules)"


class _Objective:
    """The loss of a student's outputs (and hidden states) against the teacher's (and the labels), kinds fixed on
    the first batch; the teacher's side computed once per sample when it fits in CACHE_BYTES."""

    def __init__(self, teacher: nn.Module, student: nn.Module, batches: _Batches, loss: str | Loss,
                 temperature: float, alpha: float, hidden: dict[str, str], hidden_weight: float):
        self.teacher, self.student, self.batches = teacher, student, batches
        self.custom = loss if callable(loss) else None
        self.temperature, self.alpha, self.with_labels = temperature, alpha, batches.labels is not None
        self.hidden, self.hidden_weight = hidden, hidden_weight
        self.cache: Any = None
        self.student_taps = _Taps(student, list(hidden), "student")
        try:
            self.teacher_taps = _Taps(teacher, list(hidden.values()), "teacher")
        except InputError:
            self.student_taps.close()
            raise
        try:
            self._setup(loss)
        except BaseException:
            self.close()                    # no hook may stay on the user's teacher
            raise

    def _setup(self, loss: str | Loss) -> None:
        """Read the teacher's outputs on the first batch: the loss of each, the logits leaf, the hidden shapes."""
        teacher, batches = self.teacher, self.batches
        first = batches.probe()[0]
        args, kwargs, _ = batches.get(first)
        try:
            with torch.no_grad():
                out = teacher(*to_device(args, _device(teacher)), **to_device(kwargs, _device(teacher)))
        except Exception as e:
            self.teacher_taps.seen = {}
            raise InputError(f"distill: the teacher fails on the data's first batch ({brief(e)}): each item must be "
                             "shaped like the model's example inputs (a tuple of positional arguments, a dict of "
                             "keyword arguments, or one tensor)") from e
        states = self.teacher_taps.take()
        named, self.spec = flatten_with_path(out)
        self.names = [path_name("output", path) for path, _ in named]
        self.kinds: list[str] = [] if self.custom else [_kind(name, path, leaf, loss)
                                                         for name, (path, leaf) in zip(self.names, named)]
        if not self.custom and all(k == "ignored" for k in self.kinds):
            raise InputError(f"distill: the teacher's outputs ({', '.join(self.names)}) hold no floating-point "
                             "tensor to learn from")
        self.logits = None
        if self.with_labels and not self.custom:
            kl = [i for i, k in enumerate(self.kinds) if k == "kl"]
            if len(kl) != 1:
                raise InputError(f"distill labels train one logits output, but the outputs read as "
                                 f"{self.described()}: give loss='kl' for a classifier with one output, or a callable "
                                 "loss that uses the labels")
            self.logits = kl[0]
        if self.hidden:
            self._check_hidden(args, kwargs, states)
        self.row_bytes = sum(x.numel() * x.element_size() for x in (*pytree.tree_leaves(out), *states)
                             if isinstance(x, torch.Tensor)) / max(1, len(first) if batches.pooled
                                                                   else (batches.rows[first] or 1))

    def _check_hidden(self, args: tuple, kwargs: dict, states: list[torch.Tensor]) -> None:
        """The student's mapped modules must return the shapes of the teacher's they are matched to."""
        modes = train_modes(self.student)
        self.student.eval()
        try:
            with torch.no_grad():
                device = _device(self.student)
                self.student(*to_device(args, device), **to_device(kwargs, device))
        except Exception:
            self.student_taps.seen = {}
            return                          # the output check of the first step says what is wrong
        finally:
            restore_modes(modes)
        for (s_name, t_name), s, t in zip(self.hidden.items(), self.student_taps.take(), states):
            if s.shape != t.shape:
                raise InputError(f"distill hidden: the student's {s_name!r} returns {tuple(s.shape)} but the "
                                 f"teacher's {t_name!r} {tuple(t.shape)}; map modules whose outputs have the same "
                                 "shape (e.g. student layer i to the teacher layer it was kept from)")

    def close(self) -> None:
        self.student_taps.close()
        self.teacher_taps.close()

    def described(self) -> str:
        return ", ".join(f"{n} {k}" for n, k in zip(self.names, self.kinds))

    def _teach(self, args: tuple, kwargs: dict) -> tuple[list[Any], list[torch.Tensor]]:
        """The teacher's output leaves and hidden states for one batch."""
        with torch.no_grad():
            out = self.teacher(*to_device(args, _device(self.teacher)), **to_device(kwargs, _device(self.teacher)))
        leaves, spec = pytree.tree_flatten(out)
        if spec != self.spec:
            raise InputError(f"distill: the teacher's outputs are structured differently on different batches "
                             f"({_describe(out)} here): distill matches a fixed structure, leaf by leaf")
        return leaves, self.teacher_taps.take()

    def remember(self) -> bool:
        """From now on keep the teacher's side of each sample from its first use, if all of it fits in CACHE_BYTES;
        True when it will be kept."""
        batches = self.batches
        rows = batches.total if batches.pooled else sum(r or 1 for r in batches.rows)
        self.cache = {} if self.row_bytes * rows <= CACHE_BYTES else None
        return self.cache is not None

    def _wanted(self, selection: Any, args: tuple, kwargs: dict) -> tuple[list[Any], list[torch.Tensor]]:
        """The teacher's output leaves and hidden states for a selection: kept ones, or computed (and kept)."""
        if self.cache is None:
            return self._teach(args, kwargs)
        if not self.batches.pooled:
            if selection not in self.cache:
                self.cache[selection] = self._teach(args, kwargs)
            return self.cache[selection]
        if not self.cache:                  # the first batch: allocate a row-indexed store per tensor
            leaves, states = self._teach(args, kwargs)
            tensors = [x for x in (*leaves, *states) if isinstance(x, torch.Tensor)]
            if any(x.dim() == 0 or x.shape[0] != len(selection) for x in tensors):
                self.cache = None           # an output without the batch dim: rows cannot be kept apart
                return leaves, states
            total = self.batches.total
            self.cache = {"seen": torch.zeros(total, dtype=torch.bool), "leaves": leaves,
                          "store": [x.new_empty((total, *x.shape[1:])) for x in tensors]}
            self._keep(selection, tensors)
        missing = selection[~self.cache["seen"][selection]]
        if len(missing):
            leaves, states = (self._teach(args, kwargs) if len(missing) == len(selection)
                              else self._teach(*self.batches.get(missing)[:2]))
            self._keep(missing, [x for x in (*leaves, *states) if isinstance(x, torch.Tensor)])
        kept = iter([x[selection] for x in self.cache["store"]])
        leaves = [next(kept) if isinstance(x, torch.Tensor) else x for x in self.cache["leaves"]]
        return leaves, list(kept)

    def _keep(self, rows: torch.Tensor, tensors: list[torch.Tensor]) -> None:
        for store, x in zip(self.cache["store"], tensors):
            store[rows] = x
        self.cache["seen"][rows] = True

    def __call__(self, selection: Any) -> torch.Tensor:
        args, kwargs, labels = self.batches.get(selection)
        leaves_wanted, states = self._wanted(selection, args, kwargs)
        device = _device(self.student)
        got = self.student(*to_device(args, device), **to_device(kwargs, device))
        leaves_wanted = to_device(leaves_wanted, device)
        wanted = pytree.tree_unflatten(leaves_wanted, self.spec)
        labels = None if labels is None else labels.to(device)
        total = torch.zeros((), device=device)
        if self.hidden:
            total = total + self.hidden_weight * torch.stack(
                [_relative_mse(s, t.to(device)) for s, t in zip(self.student_taps.take(), states)]).mean()
        if self.custom:
            value = self.custom(got, wanted, labels)
            if not isinstance(value, torch.Tensor) or value.dim() != 0:
                raise InputError(f"distill: the loss callable must return a scalar tensor, not {value!r}")
            return total + value
        leaves_got, spec_got = pytree.tree_flatten(got)
        if spec_got != self.spec:
            raise InputError(f"distill: the student's outputs are structured differently from the teacher's: teacher "
                             f"{_describe(wanted)}, student {_describe(got)}. The student must return the same "
                             "containers and keys (outputs are matched leaf by leaf)")
        for i, (name, kind, s, t) in enumerate(zip(self.names, self.kinds, leaves_got, leaves_wanted)):
            if kind == "ignored":
                continue
            if not isinstance(s, torch.Tensor) or s.shape != t.shape:
                raise InputError(f"distill: {name} is {_describe(t)} from the teacher but {_describe(s)} from the "
                                 "student; the student must return the same shapes (outputs are matched element by "
                                 "element)")
            term = _LOSSES[kind](s, t, self.temperature)
            if i == self.logits:
                ce = F.cross_entropy(s.reshape(-1, s.shape[-1]), labels.reshape(-1).long())
                term = self.alpha * term + (1 - self.alpha) * ce
            total = total + term
        return total


def _kind(name: str, path: Sequence[Any], leaf: Any, loss: str) -> str:
    """The loss of one output leaf: `loss` itself unless "auto" (the rule in the module's docstring)."""
    if not isinstance(leaf, torch.Tensor) or not leaf.is_floating_point():
        return "ignored"
    if loss != "auto":
        return loss
    last = name.rsplit(".", 1)[-1].lower()
    if "logit" in last:
        return "kl"
    if leaf.dim() >= 2 and leaf.numel() and torch.allclose(leaf.float().norm(dim=-1), torch.ones(()),
                                                           atol=UNIT_NORM_TOLERANCE, rtol=0):
        return "cosine"
    named = any(isinstance(k, (pytree.MappingKey, pytree.GetAttrKey)) for k in path)
    return "kl" if leaf.dim() == 2 and not named else "mse"


def _kl(s: torch.Tensor, t: torch.Tensor, temperature: float) -> torch.Tensor:
    s, t = s.reshape(-1, s.shape[-1]) / temperature, t.reshape(-1, t.shape[-1]) / temperature
    return F.kl_div(F.log_softmax(s, -1), F.log_softmax(t, -1), log_target=True,
                    reduction="batchmean") * temperature ** 2


def _mse(s: torch.Tensor, t: torch.Tensor, temperature: float) -> torch.Tensor:
    return F.mse_loss(s, t)


def _cosine(s: torch.Tensor, t: torch.Tensor, temperature: float) -> torch.Tensor:
    return (1 - F.cosine_similarity(s, t, dim=-1)).mean()


def _relative_mse(s: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
    """Mean squared error over the teacher's mean square: 1 for a student that returns zeros, whatever the scale."""
    return F.mse_loss(s, t) / t.pow(2).mean().clamp_min(1e-12)


_LOSSES = {"kl": _kl, "mse": _mse, "cosine": _cosine}


def _describe(tree: Any) -> str:
    """`tensor(32, 10)`, `dict(logits: tensor(32, 10), hidden: tensor(32, 64))`: a structure with its shapes."""
    named, _ = flatten_with_path(tree)
    if len(named) == 1 and not named[0][0]:
        leaf = named[0][1]
        return f"tensor{tuple(leaf.shape)}" if isinstance(leaf, torch.Tensor) else type(leaf).__name__
    parts = [f"{path_name('output', p)}: " + (f"tensor{tuple(x.shape)}" if isinstance(x, torch.Tensor)
                                               else type(x).__name__) for p, x in named]
    return f"{type(tree).__name__}({', '.join(parts)})"


def _probe_loss(objective: _Objective, batches: _Batches) -> float:
    """The objective on the probe selections, row-weighted, with the student in eval mode (its modes restored)."""
    modes = train_modes(objective.student)
    objective.student.eval()
    total = rows = 0.0
    try:
        with torch.no_grad():
            for selection in batches.probe():
                n = len(selection) if batches.pooled else (batches.rows[selection] or 1)
                total += float(objective(selection)) * n
                rows += n
    finally:
        restore_modes(modes)
    return total / rows


def _train(student: nn.Module, batches: _Batches, objective: _Objective, epochs: int | None,
           max_steps: int | None, max_seconds: float | None, lr: float, seed: int, progress: bool) -> DistillReport:
    loss_start = _probe_loss(objective, batches)
    params = [p for p in student.parameters() if p.requires_grad]
    if not params:
        raise InputError(f"distill: the student ({type(student).__name__}) has no trainable parameters")
    optimizer = torch.optim.Adam(params, lr=lr)
    order = torch.Generator().manual_seed(seed)
    start = time.perf_counter()
    cached = objective.remember()
    student.train()
    steps, epoch, done, stopped_by = 0, 0, 0.0, None
    while stopped_by is None:
        if epochs is not None and epoch >= epochs:
            stopped_by, done = "epochs", float(epoch)
            break
        selections = batches.epoch(order)
        what = f"distilling, epoch {epoch + 1}" + (f"/{epochs}" if epochs else "")
        for i, selection in enumerate(track(selections, len(selections), what) if progress else selections):
            optimizer.zero_grad()
            value = objective(selection)
            if not torch.isfinite(value):
                raise CompilerError(f"distill: the loss became {float(value)} at step {steps + 1}: lower lr (now {lr}) "
                                    "or the temperature, or check the data for NaN/Inf")
            value.backward()
            optimizer.step()
            steps += 1
            if max_steps is not None and steps >= max_steps:
                stopped_by = "steps"
            elif max_seconds is not None and time.perf_counter() - start >= max_seconds:
                stopped_by = "seconds"
            if stopped_by:
                done = epoch + (i + 1) / len(selections)
                break
        epoch += 1
    seconds = time.perf_counter() - start
    student.eval()
    return DistillReport(steps=steps, epochs=done, seconds=seconds, stopped_by=stopped_by,
                         losses=dict(zip(objective.names, objective.kinds)), labels=batches.labels is not None,
                         batching=batches.batching, hidden=dict(objective.hidden),
                         hidden_weight=objective.hidden_weight, teacher_cached=cached, loss_start=loss_start,
                         loss_end=_probe_loss(objective, batches), probe_rows=batches.probe_rows(), seed=seed)
