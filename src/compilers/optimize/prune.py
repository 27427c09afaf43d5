"""Structured pruning (issue 22): remove whole conv channels, linear neurons, attention heads or encoder layers,
so the model that comes out is a smaller *dense* nn.Module that every backend runs faster as it is.

The graph surgery is Torch-Pruning's (`torch_pruning`, imported inside the functions so `import compilers`
stays light): its DependencyGraph traces the model once and couples every layer a removed channel touches:
the next layer's inputs, BatchNorm/LayerNorm, both sides of a residual add, the slices of a concatenation,
grouped and depthwise convs. What this module adds:

- a FLOPs target. `prune(model, x, flops=0.5)` removes at least half the multiply-accumulates (MACs, counted
  by `tp.utils.count_ops_and_params`) in small iterative steps (each layer keeps the same fraction of its
  channels, importance re-estimated after every step) and stops at the first step that reaches the target;
  `ratio=` asks for a channel fraction instead. A target that cannot be reached is an InputError.
- the model's outputs keep their shape: the layers that produce an output (found by walking the autograd
  graph back from each output, through activations, means or residual adds, to the first modules with
  weights) are never pruned on their output side, and the shapes are checked against the unpruned model.
- attention heads (`heads=0.5`): Hugging Face self-attention (`query`/`key`/`value` Linear children and a
  `num_attention_heads` attribute: BERT, RoBERTa, MiniLM, ViT, ...) loses whole heads, the same count in each
  layer, ranked by the criterion; the head size stays and `num_attention_heads` / `all_head_size` are updated
  on each module, so the layout stays consistent. Channel pruning never touches the q/k/v/o head dims; the
  feed-forward width is pruned as ordinary channels. (The model's `config` still shows the original head
  count: it describes the architecture it was built from, not the pruned weights.) `nn.MultiheadAttention`
  ties its heads to its input width, so its channels go evenly from every head instead.
- whole layers: `drop_layers(model, x, keep=[0, 2, 4])` keeps some of an encoder's layers (a ModuleList).
- a report: params and MACs before/after and the kept/total width of each pruned layer.

The input model is never modified (the work is done on a deep copy); the result is in eval mode.

Criteria (`importance=`), all Torch-Pruning's, summed over each coupled group:
- "magnitude": the L2 norm of the weights a channel owns (GroupMagnitudeImportance); needs no data.
- "taylor": |weight x gradient| (first-order Taylor estimate of the change when the channel goes). The loss
  is computed on the calibration samples without labels: by default the cross-entropy of the model's outputs
  with its own argmax (the unpruned model's answers as pseudo-labels; for an output with a last dim of 1 or
  an integer output, half the squared norm of the output instead). A distance to the unpruned model's
  outputs would be the natural loss but its gradient is zero before anything is removed. Pass `loss=` to
  use labels or a task loss.
- "activation": the mean |activation| that enters each channel's consumer over the calibration samples.

Choosing the default, by evidence (`.venv/bin/python benchmarks/prune.py`, 2026-12-04; the digits CNN of
calibration/digits.py pruned to >= 50% fewer MACs, accuracy on its 540 test digits; one training seed):

    criterion                     MACs removed  params removed  test acc  fine-tuned (5 epochs, labels)
    (unpruned)                            0.0%            0.0%    97.04%
    magnitude                            51.6%           52.2%    89.26%      96.67%
    taylor                               51.6%           52.2%    95.74%      96.85%
    activation                           51.6%           52.2%    84.07%      96.85%
    taylor, loss = output energy         51.6%           52.2%    74.07%      97.04%

"taylor" (with the pseudo-label loss) loses the least before any retraining, by 6 points or more, so it is the
default. Half the squared output norm as the Taylor loss (label-free too, and usable on any output) is far
worse, which is why the default loss is the pseudo-label cross-entropy. After a short fine-tune all criteria
are within half a point of each other, so with distillation afterwards the criterion matters less, and
"magnitude" is the one that needs no data.
"""
from __future__ import annotations

import contextlib
import copy
import functools
from dataclasses import asdict, dataclass
from typing import Any, Callable, Iterable, Iterator, Sequence

import torch
from torch import nn
from torch.utils import _pytree as pytree

from ..bench import text_table
from ..errors import ExportError, InputError
from ..quiet import quiet
from ..signature import as_call

CRITERIA = ("taylor", "magnitude", "activation")
#: the channel fraction one iterative step removes from each layer (at most MAX_RATIO in all)
STEP = 0.025
MAX_RATIO = 0.95
#: round_to="auto" with flops=: channel counts multiples of the first of these that reaches the target (16: the
#: fp32 lanes of AVX-512, which ONNX Runtime's and OpenVINO's blocked convolutions pad a width up to; 8: AVX2's)
AUTO_ROUNDINGS = (16, 8, None)


@dataclass(frozen=True)
class Layer:
    """One pruned layer's width: `kept` of `total` output channels (`unit`: "channels" or "heads")."""

    name: str
    unit: str
    kept: int
    total: int


@dataclass(frozen=True)
class PruneReport:
    criterion: str
    macs_before: int
    macs_after: int
    params_before: int
    params_after: int
    layers: tuple[Layer, ...]
    round_to: int | None = None     # channel counts kept multiples of this

    def to_dict(self) -> dict[str, Any]:
        """As JSON holds it (an artifact's report)."""
        return {**asdict(self), "layers": [asdict(layer) for layer in self.layers]}

    @property
    def flops_removed(self) -> float:
        """The fraction of the MACs removed (0.5 = half)."""
        return 1 - self.macs_after / self.macs_before if self.macs_before else 0.0

    @property
    def params_removed(self) -> float:
        return 1 - self.params_after / self.params_before if self.params_before else 0.0

    def __str__(self) -> str:
        head = [f"pruned by {self.criterion}: MACs {self.macs_before:,} -> {self.macs_after:,} "
                f"({self.flops_removed:.1%} removed), params {self.params_before:,} -> {self.params_after:,} "
                f"({self.params_removed:.1%} removed)"
                + (f", widths multiples of {self.round_to}" if self.round_to and self.round_to > 1 else "")]
        rows = [[l.name, l.unit, str(l.kept), str(l.total), f"{1 - l.kept / l.total:.0%}"] for l in self.layers]
        return "\n".join(head + (text_table(["layer", "unit", "kept", "total", "removed"], rows, left=(0, 1))
                                 if rows else []))


@dataclass(frozen=True)
class Pruned:
    """The pruned model (a new nn.Module, in eval mode) and what was removed."""

    model: nn.Module
    report: PruneReport


def prune(model: nn.Module, example_inputs: Any, *, flops: float | None = None, ratio: float | None = None,
          heads: float = 0.0, importance: str = "taylor", calibration: Iterable[Any] | None = None,
          loss: Callable[[Any], torch.Tensor] | None = None, ignore: Sequence[nn.Module | str] = (),
          round_to: int | str | None = "auto") -> Pruned:
    """Structurally prune a copy of `model`.

    example_inputs: like compile's: a tuple (positional), a dict (keywords) or one tensor; traced once.
    flops: the fraction of MACs to remove at least (0.5 = half), by equal per-layer channel steps; or
    ratio: the fraction of each layer's channels to remove. Give one of them, or only `heads`.
    heads: the fraction of attention heads to remove in each Hugging Face self-attention module.
    importance: "taylor" (default), "magnitude" or "activation" (see the module docstring).
    calibration: samples shaped like example_inputs; needed by "taylor" and "activation".
    loss: for "taylor", `loss(outputs) -> scalar` on each calibration sample (default: see the docstring).
    ignore: modules of `model` (or their dotted names) whose output channels stay whole.
    round_to: keep channel counts multiples of this (None: any count). "auto" (the default), with flops=:
        multiples of 16, else of 8, else any: the first that reaches the target (`report.round_to` says which).
        ONNX Runtime's blocked convolutions pad a width up to 16 on AVX-512 (8 on AVX2): with any count the
        pruned digits CNN ran 0.44x-0.79x as fast on ort-cpu at batch 256 (two runs), with multiples of 16
        1.2x-1.6x faster on every CPU target (benchmarks/optimize.py). With ratio= or heads= alone, "auto" is None.
    """
    _check_arguments(flops, ratio, heads, importance, calibration, round_to)
    if heads and not _attention_modules(model):
        raise InputError("heads= prunes Hugging Face self-attention (query/key/value Linear children and "
                         "num_attention_heads), and this model has none")
    samples = [as_call(s) for s in calibration] if calibration is not None else []
    if importance != "magnitude" and not samples:
        raise InputError(f"importance={importance!r} needs calibration samples (a few batches shaped like "
                         "example_inputs); pass calibration=..., or use importance='magnitude'")
    roundings = (round_to,) if round_to != "auto" else AUTO_ROUNDINGS if flops is not None else (None,)
    once = functools.partial(_prune_once, model, example_inputs, samples, flops=flops, ratio=ratio, heads=heads,
                             importance=importance, loss=loss, ignore=ignore)
    for rounding in roundings[:-1]:
        with contextlib.suppress(_Unreachable):
            return once(round_to=rounding)
    return once(round_to=roundings[-1])


class _Unreachable(InputError):
    """flops= cannot be reached (at this rounding)."""


def _prune_once(model: nn.Module, example_inputs: Any, samples: list[tuple[tuple, dict]], *, flops: float | None,
                ratio: float | None, heads: float, importance: str, loss: Callable[[Any], torch.Tensor] | None,
                ignore: Sequence[nn.Module | str], round_to: int | None) -> Pruned:
    """One pruning of a copy of `model` with channel counts multiples of `round_to`."""
    import torch_pruning as tp

    args, kwargs = as_call(example_inputs)
    work = copy.deepcopy(model).eval()
    ignored = _resolve(model, work, ignore) + _output_layers(work, args, kwargs)
    shapes = _output_shapes(work, args, kwargs)
    macs_before, params_before = _count(work, example_inputs)
    before = _widths(work)

    attention = _attention_modules(work)
    num_heads = {getattr(a, n): a.num_attention_heads for a in attention for n in ("query", "key", "value")}
    scorer = _Scorer(importance, samples, loss)
    # nn.MultiheadAttention ties its head layout to its input width: channels go evenly from every head.
    # Fresh group dicts each call: BasePruner's defaults are shared mutable dicts that it fills in.
    mha = {m: m.num_heads for m in work.modules() if isinstance(m, nn.MultiheadAttention)}
    common = dict(example_inputs=example_inputs, importance=scorer.criterion, ignored_layers=ignored,
                  num_heads=num_heads, prune_head_dims=False, round_to=round_to,
                  in_channel_groups=dict(mha), out_channel_groups=dict(mha),
                  forward_fn=lambda m, _: m(*args, **kwargs), output_transform=_tensors)
    try:
        if heads:
            pruner = tp.pruner.BasePruner(work, pruning_ratio=0.0, prune_num_heads=True, head_pruning_ratio=heads,
                                          pruning_ratio_dict={tuple(attention): heads}, **common)
            scorer.step(pruner, work)
            _relayout(attention, pruner.num_heads)
        if flops is not None or ratio is not None:
            steps = max(1, round((ratio if ratio is not None else MAX_RATIO) / STEP))
            pruner = tp.pruner.BasePruner(work, pruning_ratio=ratio if ratio is not None else MAX_RATIO,
                                          iterative_steps=steps, **common)
            target = None if flops is None else macs_before * (1 - flops)
            for _ in range(steps):
                if target is not None and _count(work, example_inputs)[0] <= target:
                    break
                scorer.step(pruner, work)
    except (InputError, ExportError):
        raise
    except Exception as e:
        raise ExportError(f"torch_pruning could not prune this model: {type(e).__name__}: {e}. Models it "
                          "cannot trace (data-dependent control flow, custom autograd functions) can be pruned "
                          "with the troublesome modules in ignore=") from e
    work.zero_grad(set_to_none=True)
    work.eval()

    macs_after, params_after = _count(work, example_inputs)
    if flops is not None and macs_after > macs_before * (1 - flops):
        rounded = f" in multiples of {round_to}" if round_to and round_to > 1 else ""
        raise _Unreachable(f"flops={flops} cannot be reached: pruning every layer to {1 - MAX_RATIO:.0%} of its "
                           f"channels{rounded} removes {1 - macs_after / macs_before:.1%} of the MACs (the rest "
                           "sits in ignored or output layers); ask for less, or ignore fewer layers")
    _check_shapes(shapes, _output_shapes(work, args, kwargs))
    after = _widths(work)
    layers = tuple(Layer(name, unit, after[name][1], total) for name, (unit, total) in before.items()
                   if name in after and after[name][1] != total)
    return Pruned(work, PruneReport(importance, macs_before, macs_after, params_before,
                                    params_after, layers, round_to))


def drop_layers(model: nn.Module, example_inputs: Any, *, keep: int | Sequence[int]) -> Pruned:
    """A copy of a Hugging Face encoder (BERT-like: one ModuleList of layers, e.g. `encoder.layer`) with only
    the layers in `keep` (indices, in order), or `keep` layers spread evenly from the first to the last."""
    stacks = [(n, m) for n, m in model.named_modules() if isinstance(m, nn.ModuleList) and n.split(".")[-1]
              in ("layer", "layers")]
    if len(stacks) != 1:
        raise InputError(f"drop_layers needs one ModuleList of encoder layers named 'layer' or 'layers'; this "
                         f"model has {len(stacks)}: {[n for n, _ in stacks]}")
    name, stack = stacks[0]
    total = len(stack)
    if isinstance(keep, int):
        if not 1 <= keep <= total:
            raise InputError(f"keep={keep}: keep between 1 and {total} layers")
        keep = [round(i * (total - 1) / (keep - 1)) for i in range(keep)] if keep > 1 else [total - 1]
    keep = list(keep)
    if not keep or sorted(set(keep)) != keep or keep[0] < 0 or keep[-1] >= total:
        raise InputError(f"keep={keep}: give increasing, distinct layer indices in [0, {total - 1}]")
    work = copy.deepcopy(model).eval()
    macs_before, params_before = _count(work, example_inputs)
    layers = work.get_submodule(name)
    kept = nn.ModuleList(layers[i] for i in keep)
    for i, layer in enumerate(kept):
        for m in layer.modules():
            if isinstance(getattr(m, "layer_idx", None), int):
                m.layer_idx = i
    parent, _, attr = name.rpartition(".")
    setattr(work.get_submodule(parent) if parent else work, attr, kept)
    config = getattr(work, "config", None)
    if config is not None and hasattr(config, "num_hidden_layers"):
        config.num_hidden_layers = len(keep)
    macs_after, params_after = _count(work, example_inputs)
    return Pruned(work, PruneReport(f"kept layers {keep}", macs_before, macs_after, params_before,
                                    params_after, (Layer(name, "layers", len(keep), total),)))


def _count(model: nn.Module, example_inputs: Any) -> tuple[int, int]:
    """(MACs, params) of one call on example_inputs, by Torch-Pruning's counter (modules' MACs: Conv, Linear,
    norms, ...; functional matmuls such as attention scores are not counted)."""
    import torch_pruning as tp

    with quiet():     # the counter prints a warning for keyword-only inputs
        macs, params = tp.utils.count_ops_and_params(model, example_inputs)
    return round(macs), round(params)


def _check_arguments(flops, ratio, heads, importance, calibration, round_to) -> None:
    if flops is not None and ratio is not None:
        raise InputError("give flops= (the fraction of MACs to remove) or ratio= (the fraction of each layer's "
                         "channels), not both")
    if flops is None and ratio is None and not heads:
        raise InputError("say how much to prune: flops=0.5 removes half the MACs, ratio=0.3 30% of each "
                         "layer's channels, heads=0.5 half the attention heads")
    for name, value, top in (("flops", flops, 1.0), ("ratio", ratio, MAX_RATIO), ("heads", heads, 1.0)):
        if value is not None and not (isinstance(value, (int, float)) and 0 <= value < top):
            raise InputError(f"{name}={value!r}: give a fraction in [0, {top})")
    if importance not in CRITERIA:
        raise InputError(f"importance={importance!r}: choose one of {list(CRITERIA)}")
    if isinstance(calibration, (torch.Tensor, dict)):
        raise InputError("calibration must be an iterable of samples shaped like example_inputs (a list of "
                         f"them), not one {type(calibration).__name__}")
    if round_to not in (None, "auto") and not (isinstance(round_to, int) and round_to >= 1):
        raise InputError(f"round_to={round_to!r}: give a positive channel multiple, \"auto\" or None")


class _Scorer:
    """The criterion, and the data it needs gathered on the current model before each pruning step."""

    def __init__(self, importance: str, samples: list[tuple[tuple, dict]], loss):
        import torch_pruning as tp

        self.name, self.samples, self.loss = importance, samples, loss or _pseudo_label_loss
        self.criterion = {"magnitude": tp.importance.GroupMagnitudeImportance(p=2),
                          "taylor": tp.importance.GroupTaylorImportance(),
                          "activation": _activation_importance()}[importance]

    def step(self, pruner, model: nn.Module) -> None:
        if self.name == "taylor":
            self._gradients(model)
            pruner.step()
            model.zero_grad(set_to_none=True)
        elif self.name == "activation":
            with self.criterion.compute_importance(model):
                totals = self._activations(model)
            for m, total in totals.items():
                m._importance = total
            try:
                pruner.step()
            finally:
                for m in totals:
                    del m._importance
        else:
            pruner.step()

    def _gradients(self, model: nn.Module) -> None:
        model.zero_grad(set_to_none=True)
        with _trainable(model), torch.enable_grad():
            for args, kwargs in self.samples:
                value = self.loss(model(*args, **kwargs))
                if not (isinstance(value, torch.Tensor) and value.numel() == 1):
                    raise InputError(f"loss must return a scalar tensor, not {type(value).__name__}")
                value.backward()

    def _activations(self, model: nn.Module) -> dict[nn.Module, torch.Tensor]:
        """Each hooked layer's input activation summed over the samples (tp's hook keeps only the last call)."""
        totals: dict[nn.Module, torch.Tensor] = {}
        with torch.no_grad():
            for args, kwargs in self.samples:
                model(*args, **kwargs)
                for m in model.modules():
                    if hasattr(m, "_importance"):
                        totals[m] = totals.get(m, 0) + m._importance
                        del m._importance
        return totals


def _activation_importance():
    """tp's ActivationImportance, cut to the group's channels: it scores only consumers' inputs, so where the
    consumer is a Linear after a Flatten its score vector is as long as the flattened features (zeros past the
    channels), and those zeros would be ranked and pruned as channels (torch-pruning 1.6)."""
    import torch_pruning as tp

    class Activation(tp.importance.ActivationImportance):
        def __call__(self, group):
            imp = super().__call__(group)
            return None if imp is None else imp[:len(group[0].idxs)]

    return Activation()


@contextlib.contextmanager
def _trainable(model: nn.Module) -> Iterator[None]:
    """Every parameter requires grad inside the block (a frozen model too), as it did afterwards."""
    wanted = {p: p.requires_grad for p in model.parameters()}
    try:
        for p in wanted:
            p.requires_grad_(True)
        yield
    finally:
        for p, flag in wanted.items():
            p.requires_grad_(flag)


def _pseudo_label_loss(outputs: Any) -> torch.Tensor:
    """The default Taylor loss: cross-entropy of each float output with its own argmax along the last dim
    (half its squared norm where the last dim is 1)."""
    total = torch.zeros(())
    for y in _tensors(outputs):
        if not y.is_floating_point():
            continue
        if y.dim() >= 1 and y.shape[-1] > 1:
            flat = y.reshape(-1, y.shape[-1])
            total = total + nn.functional.cross_entropy(flat, flat.argmax(-1).detach())
        else:
            total = total + 0.5 * y.pow(2).mean()
    return total


def _tensors(outputs: Any) -> list[torch.Tensor]:
    return [t for t in pytree.tree_leaves(outputs) if isinstance(t, torch.Tensor)]


def _resolve(model: nn.Module, work: nn.Module, ignore: Sequence[nn.Module | str]) -> list[nn.Module]:
    """The copies in `work` of the modules (or dotted names) of `model` to leave whole."""
    if isinstance(ignore, (nn.Module, str)):
        ignore = [ignore]
    names = {id(m): n for n, m in model.named_modules()}
    found = []
    for item in ignore:
        name = item if isinstance(item, str) else names.get(id(item))
        if name is None:
            raise InputError(f"ignore: {type(item).__name__} is not a module of this model; pass the model's own "
                             "submodules or their dotted names")
        try:
            found.append(work.get_submodule(name))
        except AttributeError:
            raise InputError(f"ignore: the model has no submodule {name!r}") from None
    return found


def _output_layers(model: nn.Module, args: tuple, kwargs: dict) -> list[nn.Module]:
    """The layers whose output channels are the model's output shape: walking back the autograd graph from
    each output through parameter-free modules and functional ops (an activation, a mean, a residual add)
    to the first modules with weights."""
    made: dict[Any, nn.Module] = {}

    def record(module, inputs, output):
        made.update((t.grad_fn, module) for t in _tensors(output) if t.grad_fn is not None)

    hooks = [m.register_forward_hook(record) for m in model.modules() if any(True for _ in m.parameters(False))]
    try:
        with _trainable(model), torch.enable_grad():
            todo = [t.grad_fn for t in _tensors(model(*args, **kwargs)) if t.grad_fn is not None]
    finally:
        for h in hooks:
            h.remove()
    found, seen = [], set()
    while todo:
        fn = todo.pop()
        if fn in seen:
            continue
        seen.add(fn)
        if fn in made:
            found.append(made[fn])
        else:
            todo.extend(f for f, _ in fn.next_functions if f is not None)
    return found


def _output_shapes(model: nn.Module, args: tuple, kwargs: dict) -> list[tuple[int, ...]]:
    with torch.no_grad():
        return [tuple(t.shape) for t in _tensors(model(*args, **kwargs))]


def _check_shapes(before: list[tuple[int, ...]], after: list[tuple[int, ...]]) -> None:
    if before != after:
        raise InputError(f"pruning changed the model's output shapes from {before} to {after}: an output is "
                         "made by an operation outside a module; pass the layer that feeds it in ignore=")


def _attention_modules(model: nn.Module) -> list[nn.Module]:
    """Hugging Face self-attention modules: query/key/value Linear children and a num_attention_heads count."""
    return [m for m in model.modules() if _is_attention(m)]


def _is_attention(m: nn.Module) -> bool:
    return isinstance(getattr(m, "num_attention_heads", None), int) and all(
        isinstance(getattr(m, n, None), nn.Linear) for n in ("query", "key", "value"))


def _relayout(attention: list[nn.Module], num_heads: dict[nn.Module, int]) -> None:
    """Each attention module's head count and width after whole heads went (the head size is unchanged)."""
    for m in attention:
        m.num_attention_heads = num_heads[m.query]
        m.all_head_size = m.query.out_features
        if m.all_head_size != m.num_attention_heads * m.attention_head_size:
            raise ExportError(f"head pruning left {type(m).__name__} with {m.all_head_size} q/k/v features for "
                              f"{m.num_attention_heads} heads of {m.attention_head_size}")


def _widths(model: nn.Module) -> dict[str, tuple[str, int]]:
    """Each conv/linear layer's output channels, and each attention module's head count, by name."""
    widths = {}
    for name, m in model.named_modules():
        if isinstance(m, nn.modules.conv._ConvNd):
            widths[name] = ("channels", m.out_channels)
        elif isinstance(m, nn.Linear):
            widths[name] = ("channels", m.out_features)
        elif _is_attention(m):
            widths[name] = ("heads", m.num_attention_heads)
    return widths
