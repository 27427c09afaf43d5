"""What compile did: route, graph sizes, fusions, validation and the time of each stage; for an auto
target, also every candidate tried, its verdict and its timing."""
from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field
from typing import Any, Sequence

from .records import from_json
from .validate import ValidationReport


@dataclass
class Report:
    target: str
    backend: str
    precision: str
    route: str = ""
    attempts: list[tuple[str, str]] = field(default_factory=list)   # routes that failed, and why
    opset: int | None = None
    nodes_before: int | None = None
    nodes_after: int | None = None
    fused: dict[str, int] = field(default_factory=dict)            # fused operator type -> count
    executed: dict[str, list[int]] = field(default_factory=dict)   # layer type -> [layers, original ops] (where known)
    precisions: dict[str, int] = field(default_factory=dict)       # runtime precision -> layers (where known)
    validation: ValidationReport | None = None
    seconds: dict[str, float] = field(default_factory=dict)         # stage -> wall time
    cache: str | None = None                                        # "hit", "miss" or None (no cache_dir)
    quantization: dict[str, Any] | None = None                      # the int8 accuracy loop (quantize.LoopReport)
    optimization: dict[str, Any] | None = None                      # compile(prune=, distill=): figures and scores
    # a pipeline's padding: {"padded": whether a server may pad requests of different lengths into one call,
    # "why": what proves it, or what is not proven} (`analysis.padding.padded_verdict`)
    padding: dict[str, Any] | None = None
    notes: list[str] = field(default_factory=list)
    versions: dict[str, str] = field(default_factory=dict)
    # auto targets: every candidate (select.Candidate.to_dict: target, verdict, reason, compile_s, p50_ms,
    # p99_ms, throughput), and the auto descriptor's name, objective and the shapes the timings were made at
    candidates: list[dict[str, Any]] | None = None
    auto: dict[str, Any] | None = None

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["attempts"] = [list(a) for a in self.attempts]
        d["validation"] = self.validation.to_dict() if self.validation else None
        return d

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "Report":
        """The report saved by `to_dict`, every field checked (ValueError naming the one that is malformed)."""
        return from_json(cls, d, "report")

    def __str__(self) -> str:
        lines = [f"target      {self.target} (backend {self.backend}, {self.precision})"]
        lines.append(f"lowering    {self.route}" + (f", opset {self.opset}" if self.opset else ""))
        for route, why in self.attempts:
            lines.append(f"  failed    {route}: {why[:300]}")
        if self.nodes_before is not None:
            lines.append(f"nodes       {self.nodes_before} exported -> {self.nodes_after} after optimization")
        if self.fused:
            lines.append("fused       " + ", ".join(f"{k} {v}" for k, v in sorted(self.fused.items())))
        if self.executed:
            lines.append("executed    " + ", ".join(f"{k} {n} (from {m} ops)" if m != n else f"{k} {n}"
                                                    for k, (n, m) in self.executed.items()))
        if self.precisions:
            lines.append("precision   " + ", ".join(f"{k} {v}" for k, v in sorted(self.precisions.items())))
        if self.cache:
            lines.append(f"cache       {self.cache}")
        if self.seconds:
            lines.append("time        " + ", ".join(f"{k} {v:.2f}s" for k, v in self.seconds.items()))
        if self.optimization is not None:
            lines.extend(_optimization_lines(self.optimization))
        if self.padding is not None:
            lines.append(f"padding     {'harmless' if self.padding.get('padded') else 'not proven harmless'}: "
                         f"{self.padding.get('why')}")
        for note in self.notes:
            lines.append(f"note        {note}")
        if self.auto is not None:
            a = self.auto
            at = ", ".join(f"{k}={v}" for k, v in (a.get("shapes") or {}).items()) or "the example's shapes"
            lines.append(f"auto        {a.get('name')}: {a.get('objective')}, timed at {at}; chose {self.target}")
        if self.candidates:
            lines.extend("  " + l for l in candidates_table(self.candidates).splitlines())
        if self.validation is not None:
            lines.append("validation")
            lines.extend("  " + l for l in str(self.validation).splitlines())
        return "\n".join(lines)


def candidates_table(rows: Sequence[dict[str, Any]]) -> str:
    """An auto target's candidates as aligned text: target, verdict, p50 ms, p99 ms, samples/s, compile s, reason."""
    head = ["target", "verdict", "p50 ms", "p99 ms", "samples/s", "compile s", "reason"]
    table = [[str(r.get("target", "")), str(r.get("verdict", "")), _num(r.get("p50_ms"), 3), _num(r.get("p99_ms"), 3),
              _num(r.get("throughput"), 0), _num(r.get("compile_s"), 1), str(r.get("reason") or "")] for r in rows]
    widths = [max(len(r[i]) for r in table + [head]) for i in range(len(head) - 1)]
    right = {2, 3, 4, 5}
    return "\n".join("  ".join([(c.rjust(w) if i in right else c.ljust(w)) for i, (c, w) in enumerate(zip(r, widths))]
                               + [r[-1]]).rstrip() for r in [head] + table)


def _optimization_lines(o: dict[str, Any]) -> list[str]:
    """compile(prune=, distill=)'s record as report lines (read from an artifact: any part may be missing)."""
    pruned = o.get("prune") if isinstance(o.get("prune"), dict) else {}
    scores = o.get("scores") if isinstance(o.get("scores"), dict) else {}
    count = lambda key: _num(pruned.get(key), 0)          # noqa: E731
    return [f"optimized   pruned by {pruned.get('criterion')}: MACs {count('macs_before')} -> {count('macs_after')}, "
            f"params {count('params_before')} -> {count('params_after')}" + (", distilled" if "distill" in o else ""),
            f"  {o.get('metric')}: " + ", ".join(f"{k} {_num(v, 4)}" for k, v in scores.items())
            + f" (at most {o.get('max_drop')} below the original)"] + _speed_lines(o.get("speed"))


def _speed_lines(speed: Any) -> list[str]:
    """The smaller model's speed-up over the unpruned one (compile(prune=)'s record["speed"])."""
    if not isinstance(speed, dict):
        return []
    if "error" in speed:
        return [f"  speed: not measured: {speed['error']}"]
    return [f"  speed: {_num(speed.get('speedup'), 2)}x the unpruned model on {speed.get('target')} at batch "
            f"{speed.get('batch')} (p50 {_num(speed.get('smaller_p50_ms'), 3)} ms vs "
            f"{_num(speed.get('unpruned_p50_ms'), 3)} ms, compilers.benchmark, interleaved)"
            + ("; timings noisy: the machine was busy" if speed.get("noisy") else "")]


def _num(value: Any, digits: int) -> str:
    if not isinstance(value, (int, float)) or isinstance(value, bool) or math.isnan(value):
        return "-"
    return f"{value:,.{digits}f}"
