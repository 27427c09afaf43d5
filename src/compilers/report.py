"""What compile did: route, graph sizes, fusions, validation and the time of each stage."""
from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Any

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
    notes: list[str] = field(default_factory=list)
    versions: dict[str, str] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["attempts"] = [list(a) for a in self.attempts]
        d["validation"] = self.validation.to_dict() if self.validation else None
        return d

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "Report":
        d = dict(d)
        v = d.pop("validation", None)
        report = cls(**{**d, "attempts": [tuple(a) for a in d.get("attempts", [])]})
        if v:
            report.validation = ValidationReport.from_dict(v)
        return report

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
        for note in self.notes:
            lines.append(f"note        {note}")
        if self.validation is not None:
            lines.append("validation")
            lines.extend("  " + l for l in str(self.validation).splitlines())
        return "\n".join(lines)
