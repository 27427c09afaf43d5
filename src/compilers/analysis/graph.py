"""The model's graph for analysis: one torch.export of the flat module with its dynamic dims symbolic, made as
torch.onnx.export makes it, so that the ONNX route lowers this same program instead of exporting again."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Sequence

import torch

from ..compat import export_as_onnx_does
from ..errors import CompilerError
from ..lower import attributes_kept, export_dims, fast_paths_off, interruption
from ..quiet import quiet
from ..signature import FlatModule, Signature


@dataclass(frozen=True)
class Exported:
    """The ExportedProgram of the flat module on `examples` (None when torch.export failed, and `failure` says
    why), and the symbol of each dynamic dim it kept symbolic."""

    program: Any
    examples: tuple
    symbols: dict[str, Any]
    failure: str | None = None

    def program_for(self, flat: Sequence[Any]) -> Any:
        """The program when it was exported on these very inputs (None otherwise)."""
        same = len(flat) == len(self.examples) and all(a is b for a, b in zip(flat, self.examples))
        return self.program if same else None


def export(model: torch.nn.Module, signature: Signature, flat: Sequence[Any]) -> Exported:
    """`model` exported behind the flat calling convention (`FlatModule`) on the flat inputs `flat`, its dynamic
    dims declared as the signature's. Never raises for a model torch.export cannot take (see `failure`), except
    for an interrupt or a CompilerError of the model's eager run."""
    module = FlatModule(model, signature).eval()
    examples = tuple(flat)
    _, per_input = export_dims(signature)
    try:
        with quiet(), fast_paths_off(), attributes_kept(module):
            program = export_as_onnx_does(module, examples, (per_input,))
    except CompilerError:
        raise
    except Exception as e:
        stop = interruption(e)
        if stop is not None:
            raise stop
        first = str(e).strip().splitlines()[0] if str(e).strip() else ""
        return Exported(None, examples, {}, f"{type(e).__name__}: {first[:300]}")
    return Exported(program, examples, _symbols(program, signature))


def _symbols(program: Any, signature: Signature) -> dict[str, Any]:
    """Dynamic dim name -> the sympy symbol torch.export gave it (dims it made static are left out)."""
    symbols: dict[str, Any] = {}
    for node, spec in zip(user_inputs(program), signature.inputs):
        for size, dim in zip(node.meta["val"].shape, spec.shape):
            if isinstance(dim, str) and isinstance(size, torch.SymInt) and size.node.expr.is_Symbol:
                symbols.setdefault(dim, size.node.expr)
    return symbols


def user_inputs(program: Any) -> list[Any]:
    """The placeholders of the program's user inputs, in the order of the signature's inputs."""
    names = set(program.graph_signature.user_inputs)
    return [n for n in program.graph.nodes if n.op == "placeholder" and n.name in names]


def user_outputs(program: Any) -> list[Any]:
    """The nodes of the program's user outputs, in the order of the signature's outputs."""
    output = next(n for n in program.graph.nodes if n.op == "output")
    values = list(output.args[0])
    specs = program.graph_signature.output_specs
    return [v for v, spec in zip(values, specs) if spec.kind == torch.export.graph_signature.OutputKind.USER_OUTPUT]
