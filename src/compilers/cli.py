"""The `compilers` command: compile, targets, validate, bench, report, publish, serve, perf, tune, export-triton.

A factory (`path/to/module.py:make` or `package.module:make`) returns `(model, example_inputs)` or a
dict with `model`, `example_inputs` and optionally `dynamic_shapes`, `calibration`, `samples` and `metric`
(a `compilers.Metric`, which `compile` keeps, and which `--prune` needs); for a
pipeline, `model` is a `compilers.pipeline.Pipeline`, or the dict also holds its parts `pre` (and `post`,
`labels`), and the examples are items (texts, encoded images).
Exit status: 0 done, 1 validation failed, 2 bad input or a compiler error.
"""
from __future__ import annotations

import argparse
import ast
import dataclasses
import difflib
import importlib
import importlib.util
import inspect
import json
import signal
import sys
import threading
import time
import traceback
import types
import typing
from pathlib import Path
from typing import Any, Callable

from . import api
from .bench import Benchmark, Timing, benchmark, synthetic_inputs
from .plot import plot, plot_format
from .progress import track
from .errors import CompilerError, ConfigError, InputError, ValidationError, brief
from .files import write_text
from .host import own_version
from .artifact import check_destination, read_manifest
from .runtime import load
from .target import Target, builtin_dir, descriptor_files, load_descriptor
from .validate import Metric


def load_factory(spec: str) -> dict[str, Any]:
    """Call the factory named by `module.py:name` or `package.module:name`; return its parts as a dict. Whatever
    goes wrong in the user's module (an import that fails, a factory that raises) is an InputError saying so."""
    where, sep, name = spec.rpartition(":")
    if not sep or not where or not name:
        raise InputError(f"factory {spec!r} must look like path/to/module.py:function or package.module:function")
    try:
        if where.endswith(".py") or "/" in where:
            path = Path(where)
            if not path.is_file():
                raise InputError(f"factory file {path} does not exist")
            mod_spec = importlib.util.spec_from_file_location(path.stem, path)
            module = importlib.util.module_from_spec(mod_spec)
            sys.path.insert(0, str(path.parent.resolve()))
            mod_spec.loader.exec_module(module)
        else:
            module = importlib.import_module(where)
    except InputError:
        raise
    except ModuleNotFoundError as e:
        raise InputError(f"factory module {where!r} cannot be imported: {e}. Give a file as path/to/module.py:"
                         f"{name}, or install the package or put its directory on PYTHONPATH") from e
    except Exception as e:
        raise InputError(f"importing factory module {where} failed: {brief(e)}. Fix the module "
                         "(`compilers --traceback ...` shows where it failed)") from e
    factory = getattr(module, name, None)
    if not callable(factory):
        raise InputError(f"{where} has no function {name!r}")
    try:
        made = factory()
    except Exception as e:
        raise InputError(f"factory {spec} raised {brief(e)}; it must return (model, example_inputs) or a dict "
                         "with 'model' and 'example_inputs' (`compilers --traceback ...` shows where it failed)") from e
    if isinstance(made, dict):
        parts = dict(made)
    elif isinstance(made, tuple) and len(made) == 2:
        parts = {"model": made[0], "example_inputs": made[1]}
    else:
        raise InputError(f"factory {spec} must return (model, example_inputs) or a dict with 'model' and "
                         f"'example_inputs', not {type(made).__name__}")
    missing = {"model", "example_inputs"} - set(parts)
    if missing:
        raise InputError(f"factory {spec} returned no {', '.join(sorted(missing))}")
    if "pre" in parts:           # a pipeline's parts: the model, its pre-processing, post steps and labels
        from .pipeline import Pipeline
        try:
            parts["model"] = Pipeline(parts["model"], parts.pop("pre"), parts.pop("post", ()),
                                      labels=parts.pop("labels", None))
        except (TypeError, ValueError) as e:
            raise InputError(f"factory {spec}: its pipeline parts do not make a Pipeline: {e}") from None
    return parts


def cmd_compile(a: argparse.Namespace) -> int:
    prune, distill = _optimize_flags(a)
    target = load_descriptor(a.target)
    if check_destination(a.out) and not a.force:
        raise InputError(f"{a.out} already holds a compilers artifact; pass --force to replace it, or choose "
                         "another --out")
    parts = load_factory(a.factory)
    metric = parts.get("metric")
    if metric is not None and not isinstance(metric, Metric):
        raise InputError(f"factory {a.factory} returned a 'metric' that is a {type(metric).__name__}; make it "
                         "compilers.Metric(fn, max_drop=..., name=...), fn(model) -> a score, higher is better")
    calibration = _read_samples(a.calibration, "--calibration") if a.calibration else parts.get("calibration")
    if prune is not None and metric is None:
        raise InputError(f"--prune needs a task metric to judge the smaller model by: have factory {a.factory} "
                         "return 'metric': compilers.Metric(fn, max_drop=...) beside 'model' and 'example_inputs'")
    if distill is not None and calibration is None:
        raise InputError(f"--distill trains on calibration samples: have factory {a.factory} return "
                         "'calibration' (samples shaped like example_inputs, unlabeled is fine), or pass "
                         "--calibration FILE.pt")
    what = f"backend {target.backend}" if isinstance(target, Target) else f"auto: {', '.join(target.candidates)}"
    first = "" if prune is None else "pruning" + (" and distilling" if distill is not None else "") + " first; "
    print(f"compiling {type(parts['model']).__name__} for {target.name} ({what}); {first}"
          "export and engine build can take a while...", file=sys.stderr, flush=True)
    t0 = time.perf_counter()
    cm = api.compile(parts["model"], target, parts["example_inputs"], dynamic_shapes=parts.get("dynamic_shapes"),
                     calibration=calibration, samples=parts.get("samples"), metric=metric,
                     validate="warn" if a.no_fail else not a.no_validate,
                     cache_dir=a.cache_dir, prune=prune, distill=distill)
    print(f"compiled in {time.perf_counter() - t0:.1f}s", file=sys.stderr)
    cm.save(a.out)
    print(cm.report)
    print(f"saved to {a.out}")
    print(f"digest: {cm.digest}  (pin it: compilers.load({str(a.out)!r}, digest={cm.digest!r}))")
    return 1 if cm.report.validation is not None and not cm.report.validation.passed else 0


def _optimize_flags(a: argparse.Namespace) -> tuple[dict[str, Any] | None, dict[str, Any] | None]:
    """compile's --prune and --distill as the prune= and distill= of compilers.compile, checked before any work."""
    if a.distill is not None and a.prune is None:
        raise InputError("--distill trains a pruned model back towards yours: give --prune too (e.g. --prune "
                         "flops=0.5 --distill epochs=6)")
    if a.prune is None:
        return None, None
    from . import optimize
    return (_keywords(a.prune, "--prune", optimize.prune), _keywords(a.distill, "--distill", optimize.distill))


#: the values a flag's KEY=VALUE can give: Python literals of these types
_SCALARS = {bool: "True or False", int: "an integer", float: "a number", str: "a string", type(None): "None"}


def _flag_keys(fn: Callable[..., Any]) -> dict[str, tuple[type, ...]]:
    """The keyword-only parameters of `fn` that a command-line value can give, with the types each takes: those
    whose annotation admits a number, bool or string. The rest (a callable, modules, labels, the calibration
    data) take Python objects. Read from the signature, so a new keyword of prune or distill is a key at once."""
    hints = typing.get_type_hints(fn)
    keys = {}
    for name, param in inspect.signature(fn).parameters.items():
        hint = hints.get(name, Any)
        union = typing.get_origin(hint) in (typing.Union, types.UnionType)
        kinds = tuple(k for k in (typing.get_args(hint) if union else (hint,)) if k in _SCALARS)
        if param.kind is param.KEYWORD_ONLY and set(kinds) - {type(None)}:
            keys[name] = kinds
    return keys


def _keywords(text: str | None, flag: str, fn: Callable[..., Any]) -> dict[str, Any] | None:
    """`flops=0.5,importance=taylor` as keyword arguments of `fn`: a value is a Python literal where it is one
    (0.5, 16, True, None, 'quoted'), else the plain string; each key one that `_flag_keys` allows, each value
    of a type the key takes."""
    if text is None:
        return None
    keys = _flag_keys(fn)
    objects = [n for n, p in inspect.signature(fn).parameters.items()
               if p.kind is p.KEYWORD_ONLY and n not in keys and n != "calibration"]
    call = f"compilers.compile(..., {flag[2:]}={{...}}) from Python"
    keyed = f"{flag} takes KEY=VALUE[,KEY=VALUE...] with keys {', '.join(keys)}"
    many = len(objects) > 1
    takes = keyed if not objects else f"{keyed}; {' and '.join(objects)} " \
        f"{'take Python objects: give them' if many else 'takes a Python object: give it'} in {call}"
    given: dict[str, Any] = {}
    for item in text.split(","):
        key, sep, raw = (part.strip() for part in item.partition("="))
        if not sep or not key:
            raise InputError(f"{flag} {text!r}: {item.strip()!r} is not KEY=VALUE. {takes}")
        if key in objects:
            raise InputError(f"{flag}: {key} takes a Python object: give it in {call}. {keyed}")
        if key not in keys:
            close = difflib.get_close_matches(key, keys, n=1)
            why = "comes from the factory or --calibration" if key == "calibration" else \
                f"is no key (did you mean {close[0]}?)" if close else "is no key"
            raise InputError(f"{flag}: {key} {why}. {takes}")
        if key in given:
            raise InputError(f"{flag}: {key} is given twice")
        try:
            value = ast.literal_eval(raw)
        except (ValueError, SyntaxError):
            value = raw
        number = float in keys[key] and isinstance(value, int) and not isinstance(value, bool)
        if type(value) not in keys[key] and not number:
            kinds = [_SCALARS[k] for k in keys[key]]
            kinds = ", ".join(kinds[:-1]) + " or " + kinds[-1] if len(kinds) > 1 else kinds[0]
            raise InputError(f"{flag} {key}={raw}: {key} takes {kinds}")
        given[key] = value
    return given


def cmd_targets(a: argparse.Namespace) -> int:
    """Every descriptor a name finds: the directories of $COMPILERS_TARGETS first, then the built-ins. One that
    does not parse is listed with its error rather than hiding the others."""
    builtin = builtin_dir()
    concrete, autos = [], []
    for name, path in descriptor_files().items():
        source = "built-in" if path.parent == builtin else str(path)
        try:
            found = load_descriptor(path)
        except CompilerError as e:
            concrete.append({"name": name, "backend": "?", "device": "?", "precision": "?", "source": source,
                             "available": False, "reason": brief(e)})
            continue
        if isinstance(found, Target):
            reason = api.target_problem(found)
            concrete.append({"name": name, "backend": found.backend, "device": found.device,
                             "precision": found.precision, "source": source, "available": reason is None,
                             "reason": reason})
        else:
            autos.append({"name": name, "auto": True, "backend": "auto", "objective": found.objective,
                          "candidates": list(found.candidates), "description": found.description, "source": source})
    if a.json:
        print(json.dumps(concrete + autos, indent=1))
        return 0
    print(f"{'target':22s} {'backend':12s} {'device':7s} {'precision':9s} available")
    for t in concrete:
        from_user = "" if t["source"] == "built-in" else f"   (from {t['source']})"
        print(f"{t['name']:22s} {t['backend']:12s} {t['device']:7s} {t['precision']:9s} "
              f"{'yes' if t['available'] else 'no: ' + t['reason']}{from_user}")
    if autos:
        print(f"\n{'auto target':22s} {'objective':10s} candidates (compile picks the fastest valid one)")
        for x in autos:
            from_user = "" if x["source"] == "built-in" else f"   (from {x['source']})"
            print(f"{x['name']:22s} {x['objective']:10s} {', '.join(x['candidates'])}{from_user}")
    return 0


def cmd_validate(a: argparse.Namespace) -> int:
    cm = load(a.artifact)
    parts = load_factory(a.factory)
    if a.samples:
        samples = [parts["example_inputs"], *_read_samples(a.samples)]
    else:
        samples = [parts["example_inputs"], *list(parts.get("samples") or parts.get("calibration") or [])]
    tolerance = {key: getattr(a, key) for key in _TOLERANCE_FLAGS if getattr(a, key) is not None}
    result = api.validate(cm, parts["model"], samples, tolerance=tolerance or None)
    print(result)
    return 0 if result.passed else 1


_TOLERANCE_FLAGS = {
    "noise": "error allowed as a multiple of eager fp32's own error (fp32 targets' rule)",
    "atol": "element-wise absolute tolerance (an element fails only if it exceeds both atol and rtol)",
    "rtol": "element-wise relative tolerance",
    "min_cosine": "lowest cosine similarity to eager per batch item (lossy targets)",
    "min_snr_db": "lowest signal-to-noise ratio against eager, in dB (lossy targets)",
}


def _read_samples(path: str, flag: str = "--samples") -> list[Any]:
    """Samples (validation or calibration) saved with torch.save(list_of_samples, path), each shaped like the
    example inputs (for a pipeline: a batch of items, or one); read as data only (weights_only)."""
    import torch
    if not Path(path).is_file():
        raise InputError(f"{flag} {path} does not exist; save them with torch.save([sample, ...], path), each "
                         "sample shaped like the example inputs")
    try:
        samples = torch.load(path, weights_only=True)
    except Exception as e:
        raise InputError(f"{flag} {path} is not a torch.save file of tensors ({brief(e)}); save them with "
                         "torch.save([sample, ...], path)") from e
    if not isinstance(samples, (list, tuple)):
        raise InputError(f"{flag} {path} holds a {type(samples).__name__}; save a list of samples, each shaped "
                         "like the example inputs")
    return list(samples)


def cmd_bench(a: argparse.Namespace) -> int:
    from .pipeline import CompiledPipeline
    batch_sizes = _ints(a.batch_sizes, "--batch-sizes") if a.batch_sizes else None
    if a.plot:
        plot_format(a.plot)           # a wrong suffix is refused before anything is compiled or timed
    sizes = dict(_size(item) for item in a.sizes.split(",")) if a.sizes else {}
    compiled: dict[str, dict[str, Any]] = {}
    failed: dict[str, str] = {}
    if Path(a.what).is_dir():
        if a.target:
            raise InputError("--target compiles a factory's model; an artifact is timed as it was built")
        cm = load(a.what)
        pipeline = isinstance(cm, CompiledPipeline)     # its items can't be made up: time its tensor model
        cm = cm.model if pipeline else cm
        models, baseline = {cm.target.name: cm}, None
        args, kwargs = synthetic_inputs(cm.signature, sizes)
        inputs = {**dict(zip(cm.signature.positional, args)), **kwargs}    # all by name: benchmark takes one
        title = f"{a.what} ({cm.target.name}), {'its tensor model on ' if pipeline else ''}synthetic inputs"
    else:
        parts = load_factory(a.what)
        names = a.target or [t.name for t in api.targets() if api.unavailable_reason(t) is None]
        models, baseline, inputs = {}, parts["model"], parts["example_inputs"]
        for name in track(names, len(names), "compiling", min_items=1):
            print(f"compiling {name}...", file=sys.stderr, flush=True)
            try:
                cm = api.compile(parts["model"], name, inputs, dynamic_shapes=parts.get("dynamic_shapes"),
                                 calibration=parts.get("calibration"), samples=parts.get("samples"),
                                 cache_dir=a.cache_dir)
            except CompilerError as e:
                failed[name] = f"{type(e).__name__}: {str(e).splitlines()[0]}"
                print(f"  {name} failed: {failed[name][:300]}", file=sys.stderr)
                continue
            label = name if cm.target.name == name else f"{name} ({cm.target.name})"
            models[label] = cm
            compiled[label] = {"target": cm.target.name, "route": cm.report.route, "seconds": cm.report.seconds.get("total")}
        title = f"{type(parts['model']).__name__} from {a.what}" + \
            (f" at {', '.join(f'{k}={v}' for k, v in sizes.items())}" if sizes else "")
    result = benchmark(models, inputs, baseline=baseline, batch_sizes=batch_sizes, sizes=sizes,
                       min_time=a.min_time, threads=a.threads, raw=a.overhead)
    result.timings += [Timing(name, b, error=why) for b in result.batch_sizes for name, why in failed.items()]
    _print_table(result, title)
    if a.json:
        write_text(a.json, json.dumps({"title": title, "compiled": compiled, **result.to_dict()}, indent=1))
        print(f"wrote {a.json}", file=sys.stderr)
    if a.plot:
        plot(result, a.plot, title)
        print(f"wrote {a.plot}", file=sys.stderr)
    return 0


def _ints(text: str, what: str) -> list[int]:
    try:
        return [int(v) for v in text.split(",")]
    except ValueError:
        raise InputError(f"{what} must be comma-separated integers, like 1,8,32; got {text!r}") from None


def _size(item: str) -> tuple[str, int]:
    name, sep, value = item.partition("=")
    if not sep or not value.strip().isdigit():
        raise InputError(f"--sizes takes dim=size pairs, like seq=128; got {item!r}")
    return name.strip(), int(value)


def _print_table(result: Benchmark, title: str) -> None:
    """The timings (and a pipeline's split per stage) as rich tables, or as text without rich."""
    try:
        from rich.console import Console
    except ImportError:
        print(title)
        print(result)
        return
    from .bench import SPLIT_TITLE
    console = Console(width=None if sys.stdout.isatty() else 200)
    console.print(_rich_table(title, *result.rows()))
    if result.stages:
        console.print(_rich_table(SPLIT_TITLE, *result.split_rows()))
    console.print(result.footnote(), highlight=False)


def _rich_table(title: str, head: list[str], rows: list[list[str]]) -> Any:
    from rich.table import Table
    table = Table(title=title, title_justify="left")
    for i, h in enumerate(head):
        table.add_column(h, justify="left" if i == 1 else "right", no_wrap=True)
    for row in rows:
        table.add_row(*row, style="red" if row[2].startswith("failed") else
                      "yellow" if row[-1].endswith("noisy") else None)
    return table


def cmd_report(a: argparse.Namespace) -> int:
    cm = load(a.artifact, check_versions=False)
    manifest = read_manifest(a.artifact)
    if a.json:
        print(json.dumps(cm.report.to_dict(), indent=1))
        return 0
    print(cm.report)
    sig = cm.signature
    print("inputs      " + ", ".join(f"{s.name}: {str(s.dtype).removeprefix('torch.')}{list(s.shape)}" for s in sig.inputs))
    print("outputs     " + ", ".join(f"{s.name}: {str(s.dtype).removeprefix('torch.')}" for s in sig.outputs))
    print("files       " + ", ".join(manifest["files"]))
    versions = manifest.get("versions")
    if isinstance(versions, dict):
        print("built with  " + ", ".join(f"{k} {v}" for k, v in versions.items()))
    return 0


def cmd_publish(a: argparse.Namespace) -> int:
    from .serve.repository import alone_reason, publish
    version = publish(a.artifact, a.model_dir)
    try:
        reason = alone_reason(version)
    except ConfigError as e:          # a serving.toml a server would refuse: it says so when it loads
        reason = f"the model's serving.toml is not valid ({e})"
    if reason:
        print(f"note: {reason}", file=sys.stderr)
    print(f"published {a.artifact} as {version} (version {version.name} of model {version.parent.name}); a running "
          f"server serves it after POST /v2/repository/models/{version.parent.name}/load")
    from .serve.tune import tuned
    if not tuned(a.model_dir):
        print(f"tip: compilers tune {a.model_dir} --p99-ms 50 picks batching and threads by measurement",
              file=sys.stderr)
    return 0


def cmd_export_triton(a: argparse.Namespace) -> int:
    import warnings
    from .export.triton import CONFIG_FILE, export_triton
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always", RuntimeWarning)
        version = export_triton(a.artifact, a.version_dir, a.serving, force=a.force)
    files = ", ".join(sorted(p.name for p in version.iterdir()))
    print(f"wrote {version} ({files}) and {version.parent / CONFIG_FILE}: version {version.name} of Triton model "
          f"{version.parent.resolve().name}")
    for w in caught:
        print(f"warning: {w.message}", file=sys.stderr)
    return 0


def cmd_serve(a: argparse.Namespace) -> int:
    try:
        from .serve.server import serve
    except ImportError as e:
        raise InputError(f"compilers serve needs the serve extra ({e.name} is missing): "
                         f"pip install 'compilers[serve]'") from None
    from .serve.addresses import listen_address
    from .serve.limits import Limits
    from .serve.repository import Repository
    listen_address(a.host, a.port, resolve=not a.address)   # a remote Ray cluster's nodes resolve theirs
    if a.max_body_mb <= 0:
        raise InputError(f"--max-body-mb must be positive, not {a.max_body_mb}")
    try:
        limits = Limits(max_body_bytes=int(a.max_body_mb * (1 << 20)), max_connections=a.max_connections,
                        header_timeout=a.header_timeout, body_timeout=a.body_timeout, idle_timeout=a.idle_timeout,
                        grpc_max_rpcs=a.grpc_max_rpcs, drain_timeout=a.drain_timeout)
    except ValueError as e:
        flag = "--" + str(e).split()[0].removeprefix("Limits.").replace("_", "-")
        raise InputError(f"{flag}: {str(e).split(' ', 1)[1]}") from None
    if a.address and not a.ray:
        raise InputError("--address is the Ray cluster to join; it needs --ray")
    if a.ray and a.handlers:
        raise InputError("--handlers: Ray Serve does not run models' handlers yet; serve them without --ray")
    if a.grpc_max_rpcs != Limits().grpc_max_rpcs and a.grpc_port is None:
        raise InputError("--grpc-max-rpcs bounds the gRPC server, which runs only with --grpc-port")
    if a.grpc_port is not None and not 0 <= a.grpc_port <= 65535:
        raise InputError(f"--grpc-port must be a port number (0-65535; 0 picks a free one), not {a.grpc_port}")
    if a.grpc_port is not None:
        try:
            importlib.import_module("compilers.serve.grpc")
        except ImportError as e:
            raise InputError(f"compilers serve --grpc-port needs the grpc extra ({e.name} is missing): "
                             f"pip install 'compilers[serve,grpc]'") from None
    if a.ray:
        given = [f.name for f in dataclasses.fields(Limits) if getattr(limits, f.name) != getattr(Limits(), f.name)]
        if given:
            flag = "--max-body-mb" if given[0] == "max_body_bytes" else "--" + given[0].replace("_", "-")
            raise InputError(f"{flag} sets a limit of compilers serve's own HTTP and gRPC servers; on Ray Serve, "
                             "connections and RPCs are its ingress's (http_options, grpc_options) and bodies the "
                             "defaults")
        try:
            from .serve.ray import serve_on_ray
        except ImportError as e:
            raise InputError(f"compilers serve --ray needs the ray extra ({e.name} is missing): "
                             f"pip install 'compilers[serve,ray]'") from None
        Repository(a.repository)                      # a missing directory is an error before Ray starts
        serve_on_ray(a.repository, a.host, a.port, address=a.address, grpc_port=a.grpc_port)
        return 0
    serve(Repository(a.repository), a.host, a.port, limits=limits, log_level=a.log_level, handlers=a.handlers,
          grpc_port=a.grpc_port)
    return 0


def cmd_perf(a: argparse.Namespace) -> int:
    """Load a running server at each concurrency and report throughput, latency, errors and the server's split
    (`compilers.serve.perf`)."""
    from .serve.perf import measure, parse_shapes
    from .serve.perf import plot as plot_perf
    if a.plot:
        plot_format(a.plot)           # a wrong suffix is refused before any load is sent
    result = measure(a.url, a.model, version=a.model_version or "",
                     protocols=[p.strip() for p in a.protocol.split(",") if p.strip()], grpc_url=a.grpc_url,
                     concurrency=_ints(a.concurrency, "--concurrency"), duration=a.duration,
                     max_requests=a.max_requests, warmup=a.warmup, batch=a.batch, shapes=parse_shapes(a.shape),
                     input_data=a.input_data, metrics_url=a.metrics_url, timeout=a.timeout, processes=a.processes)
    print(result.table())
    if a.json:
        write_text(a.json, json.dumps(result.to_dict(), indent=1))
        print(f"wrote {a.json}", file=sys.stderr)
    if a.plot:
        plot_perf(result, a.plot)
        print(f"wrote {a.plot}", file=sys.stderr)
    return 0


def cmd_tune(a: argparse.Namespace) -> int:
    """Measure the model served under each configuration of a grid and write the best serving.toml
    (`compilers.serve.tune`)."""
    try:
        from .serve import tune
    except ImportError as e:
        raise InputError(f"compilers tune needs the serve and bench extras ({e.name} is missing): "
                         "pip install 'compilers[serve,bench]'") from None
    if a.plot:
        plot_format(a.plot)           # a wrong suffix is refused before any server starts
    plan = tune.plan(a.model_dir, a.p99_ms, concurrency=_ints(a.concurrency, "--concurrency"), duration=a.duration,
                     warmup=a.warmup, grid=a.grid or (), input_data=a.input_data, handlers=a.handlers)
    print(plan.describe(), file=sys.stderr)
    if a.dry_run:
        return 0
    main_thread = threading.current_thread() is threading.main_thread()
    if main_thread:                   # SIGTERM unwinds like Ctrl-C, so that the servers it started are stopped
        previous = signal.signal(signal.SIGTERM, _terminated)
    try:
        result = tune.run(plan)
    finally:
        if main_thread:
            signal.signal(signal.SIGTERM, previous)
    print(result.table())
    if a.plot:
        tune.plot(result, a.plot)
        print(f"wrote {a.plot}", file=sys.stderr)
    config, report = tune.write(result)
    print(f"wrote {config} and {report}; a running server uses it after POST "
          f"/v2/repository/models/{Path(a.model_dir).name}/load")
    return 0


def _terminated(signum: int, frame: Any) -> None:
    raise KeyboardInterrupt


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="compilers", description="Compile PyTorch models for inference backends, validated against eager.")
    p.add_argument("--version", action="version", version=f"compilers {own_version()}")
    p.add_argument("--traceback", action="store_true", help="print the full traceback of an unexpected error")
    sub = p.add_subparsers(dest="command", required=True)
    c = sub.add_parser("compile", help="compile a model from a factory and save the artifact")
    c.add_argument("factory", help="path/to/module.py:function or package.module:function")
    c.add_argument("--target", "-t", required=True, help="built-in target name or path to a .toml descriptor")
    c.add_argument("--out", "-o", required=True, help="artifact directory to write")
    c.add_argument("--cache-dir", help="reuse builds from this directory")
    c.add_argument("--calibration", metavar="FILE.pt", help="int8 calibration samples: torch.save([sample, ...], "
                                                            "FILE.pt), each shaped like the example inputs (for a "
                                                            "pipeline: texts); default: the factory's calibration")
    c.add_argument("--force", action="store_true", help="replace the artifact already at --out")
    c.add_argument("--prune", metavar="KEY=VALUE,...", help="compile a structurally pruned copy, compilers.prune's "
                   "keywords, e.g. flops=0.5,round_to=16,importance=magnitude; needs the factory's 'metric'")
    c.add_argument("--distill", metavar="KEY=VALUE,...", help="then train the pruned copy towards the model on the "
                   "calibration samples, compilers.distill's keywords, e.g. epochs=6,seed=0; needs --prune")
    g = c.add_mutually_exclusive_group()
    g.add_argument("--no-validate", action="store_true", help="skip validation against eager")
    g.add_argument("--no-fail", action="store_true", help="save even when validation fails (exit status 1)")
    c.set_defaults(run=cmd_compile)
    t = sub.add_parser("targets", help="list the built-in targets and whether they run here")
    t.add_argument("--json", action="store_true")
    t.set_defaults(run=cmd_targets)
    v = sub.add_parser("validate", help="validate a saved artifact against the eager model")
    v.add_argument("artifact")
    v.add_argument("factory", help="path/to/module.py:function or package.module:function giving the eager model")
    v.add_argument("--samples", metavar="FILE.pt", help="validation samples: torch.save([sample, ...], FILE.pt), each "
                                                        "shaped like the example inputs (default: the factory's "
                                                        "samples or calibration)")
    for key, doc in _TOLERANCE_FLAGS.items():
        v.add_argument(f"--{key.replace('_', '-')}", dest=key, type=float, metavar="X",
                       help=f"{doc}; replaces the artifact target's value")
    v.set_defaults(run=cmd_validate)
    b = sub.add_parser("bench", help="time compiled models against eager: latency percentiles and throughput per batch size")
    b.add_argument("what", metavar="ARTIFACT_OR_FACTORY",
                   help="an artifact directory (timed on synthetic inputs), or a factory whose model is compiled "
                        "for each --target and timed against eager on its example inputs")
    b.add_argument("--target", "-t", action="append", help="target to compile (repeatable; default: every available built-in)")
    b.add_argument("--batch-sizes", help="comma-separated, e.g. 1,8,32 (default: the example's batch size; 1,8,32 for a pipeline)")
    b.add_argument("--sizes", help="other dynamic dims, e.g. seq=128")
    b.add_argument("--min-time", type=float, default=1.0, help="seconds of timed calls per model and batch size (default 1)")
    b.add_argument("--threads", type=int, help="torch intra-op threads for eager and torch engines")
    b.add_argument("--overhead", action="store_true", help="also time each engine's own backend call: the call overhead")
    b.add_argument("--cache-dir", help="reuse compiled builds from this directory")
    b.add_argument("--json", help="write the results here")
    b.add_argument("--plot", help="write a PNG of latency and throughput versus batch size here")
    b.set_defaults(run=cmd_bench)
    r = sub.add_parser("report", help="print what was done to build an artifact")
    r.add_argument("artifact")
    r.add_argument("--json", action="store_true")
    r.set_defaults(run=cmd_report)
    pb = sub.add_parser("publish", help="add a saved artifact to a model repository as the model's next version")
    pb.add_argument("artifact", help="a saved artifact directory")
    pb.add_argument("model_dir", metavar="REPO/MODEL", help="the model's directory in the repository")
    pb.set_defaults(run=cmd_publish)
    et = sub.add_parser("export-triton", help="write an artifact as a version of a Triton Inference Server model, "
                                              "with its config.pbtxt")
    et.add_argument("artifact", help="a saved artifact directory (onnxruntime, openvino or torchscript)")
    et.add_argument("version_dir", metavar="REPO/MODEL/VERSION",
                    help="the version directory to write (a positive integer); config.pbtxt goes in REPO/MODEL")
    et.add_argument("--serving", metavar="PATH", help="serving.toml to take batching, instances, versions and "
                                                      "[engine] from (default: REPO/MODEL/serving.toml if present)")
    et.add_argument("--force", action="store_true", help="replace an existing version, and a config.pbtxt that "
                                                         "other versions use")
    et.set_defaults(run=cmd_export_triton)
    s = sub.add_parser("serve", help="serve a model repository over HTTP (the Open Inference Protocol, KServe v2)")
    s.add_argument("repository", metavar="REPO", help="directory of REPO/<model>/<version>/ artifacts")
    s.add_argument("--host", default="127.0.0.1", help="address to listen on (default 127.0.0.1; 0.0.0.0 for all)")
    s.add_argument("--port", type=int, default=8000, help="port (default 8000; 0 picks a free one)")
    s.add_argument("--max-body-mb", type=float, default=64, help="largest request body accepted (default 64 MiB); "
                                                                 "a model's own limit (max_batch_size rows) is lower")
    s.add_argument("--max-connections", type=int, help="open connections at most; beyond, the longest idle one is "
                                                        "closed (default: 7/8 of the open-file limit)")
    s.add_argument("--header-timeout", type=float, default=10.0, help="seconds for a request's headers (default 10)")
    s.add_argument("--body-timeout", type=float, default=30.0, help="longest pause in a request body, seconds "
                                                                    "(default 30)")
    s.add_argument("--idle-timeout", type=float, default=5.0, help="seconds a kept-alive connection may idle "
                                                                   "(default 5)")
    s.add_argument("--grpc-port", type=int, metavar="P",
                   help="also serve the Open Inference Protocol over gRPC (Triton's GRPCInferenceService, what "
                        "tritonclient.grpc speaks) on this port of --host, from the same models, batchers and metrics "
                        "(0 picks a free one). Off unless given: each port served is one more to expose and secure "
                        "(plaintext, as the HTTP port), and it needs grpcio. With --ray, by Ray Serve's gRPC ingress")
    s.add_argument("--grpc-max-rpcs", type=int, default=256, metavar="N",
                   help="gRPC RPCs running at once at most (default 256); beyond, RESOURCE_EXHAUSTED at once")
    s.add_argument("--drain-timeout", type=float, default=30.0, help="seconds a stopping server gives the requests "
                                                                     "in flight (HTTP and gRPC) to finish (default 30)")
    s.add_argument("--handlers", action="store_true", help="run the handler code (Python) that models' serving.toml "
                                                           "[handler] names and pins by sha256; off by default")
    s.add_argument("--log-level", default="info", choices=("critical", "error", "warning", "info", "debug"))
    s.add_argument("--ray", action="store_true", help="serve on Ray Serve: a deployment per model version, "
                                                      "replicas and autoscaling from serving.toml [replicas]")
    s.add_argument("--address", help="with --ray: the Ray cluster to join (default: start a local one)")
    s.set_defaults(run=cmd_serve)
    pf = sub.add_parser("perf", help="measure a running server under load, as Triton's perf_analyzer: throughput, "
                                     "latency percentiles, errors and the server's split per concurrency")
    pf.add_argument("url", metavar="URL", help="the server's HTTP address, http://host:port (or host:port); "
                                               "its /metrics give the server's split")
    pf.add_argument("--model", "-m", required=True, help="the model to send requests to")
    pf.add_argument("--version", dest="model_version", metavar="V", help="its version (default: the server's choice)")
    pf.add_argument("--protocol", default="http", help="http, grpc, or both side by side: http,grpc (each "
                                                       "concurrency over each in turn; default http)")
    pf.add_argument("--grpc-url", metavar="HOST:PORT", help="the server's gRPC address, for --protocol grpc "
                                                            "(compilers serve --grpc-port); URL stays its HTTP one")
    pf.add_argument("--concurrency", default="1,4,16,64", help="requests in flight, one level each, comma-separated "
                                                                 "(default 1,4,16,64)")
    pf.add_argument("--duration", type=float, default=10.0, help="seconds measured per level (default 10)")
    pf.add_argument("--max-requests", type=int, default=100_000, help="requests per level at most, whichever "
                                                                      "bound comes first (default 100000)")
    pf.add_argument("--warmup", type=float, default=1.0, help="seconds of uncounted requests before each level "
                                                              "(default 1)")
    pf.add_argument("--batch", type=int, default=1, help="rows per synthetic request: the size of a -1 first dim "
                                                         "(default 1)")
    pf.add_argument("--shape", action="append", metavar="NAME:D1,D2", help="dims of a synthetic input after its "
                                                                          "batch dim (other -1 dims are 1); repeatable")
    pf.add_argument("--input-data", metavar="FILE.json", help='requests from a perf_analyzer-style file, {"data": '
                                                              '[{"INPUT": [values...]}, ...]}, cycled through '
                                                              "(default: synthetic, from the model's metadata)")
    pf.add_argument("--metrics-url", help="the server's Prometheus metrics (default URL/metrics)")
    pf.add_argument("--timeout", type=float, default=30.0, help="seconds one request may take (default 30)")
    pf.add_argument("--processes", type=int, help="load-generator processes per level, the connections spread over "
                                                   "them (default: 1 up to concurrency 8, else 2)")
    pf.add_argument("--json", help="write every figure here")
    pf.add_argument("--plot", help="write a PNG (or .svg, .pdf) of throughput and latency per concurrency here, "
                                   "a line per protocol")
    pf.set_defaults(run=cmd_perf)
    tu = sub.add_parser("tune", help="choose a model's serving.toml by measurement: serve it under each "
                                     "configuration of a grid, load it, keep the fastest within a p99 budget")
    tu.add_argument("model_dir", metavar="REPO/MODEL", help="the model's directory in the repository")
    tu.add_argument("--p99-ms", type=float, required=True, help="the latency budget: client p99 in ms")
    tu.add_argument("--concurrency", default="1,8,32", help="requests in flight, one level each, comma-separated "
                                                             "(default 1,8,32)")
    tu.add_argument("--duration", type=float, default=3.0, help="seconds measured per level (default 3)")
    tu.add_argument("--warmup", type=float, default=1.0, help="seconds of uncounted requests before each level "
                                                              "(default 1)")
    tu.add_argument("--input-data", metavar="FILE.json", help="requests from a perf_analyzer-style file, as "
                                                              "compilers perf's (default: synthetic)")
    tu.add_argument("--grid", nargs="+", action="extend", metavar="KEY=V1,V2",
                    help="replace an axis of the grid, e.g. batching.max_batch_size=8,16,32 engine.threads=1,2 "
                         "(keys: the [batching] fields and the backend's runtime [engine] options)")
    tu.add_argument("--handlers", action="store_true", help="run the model's [handler] code in the servers, as "
                                                            "compilers serve --handlers")
    tu.add_argument("--dry-run", action="store_true", help="print the configurations and the time it would take; "
                                                           "start nothing")
    tu.add_argument("--plot", help="write a PNG (or .svg, .pdf) of throughput versus p99 here")
    tu.set_defaults(run=cmd_tune)
    return p


def main(argv: list[str] | None = None) -> int:
    """Run one command. Exit status: 0 done, 1 validation failed, 2 anything else that stopped it (one paragraph
    on stderr, the traceback only with --traceback), 130 interrupted."""
    a = parser().parse_args(argv)
    try:
        return a.run(a)
    except ValidationError as e:
        print(f"compilers: validation failed: {e}", file=sys.stderr)
        return 1
    except CompilerError as e:
        if a.traceback:
            traceback.print_exc()
        print(f"compilers: {type(e).__name__}: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("compilers: interrupted", file=sys.stderr)
        return 130
    except Exception as e:
        if a.traceback:
            traceback.print_exc()
        print(f"compilers: {a.command} stopped on an unexpected {brief(e)}. This is not an error compilers "
              f"checks for, so it is likely a bug in compilers or in a backend: run it again with `compilers "
              f"--traceback {a.command} ...` and report the traceback.", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
