"""Model-level optimisation in front of `compile` (issue 22): structured pruning (`prune.py`) makes a smaller dense
model every backend runs faster, and knowledge distillation (`distill.py`) trains it back towards the model it
came from. Both are judged afterwards by the same contract as everything else: the user's task metric
(`compilers.Metric`) and validation against the eager model."""
from .distill import Distilled, DistillReport, distill
from .prune import Pruned, PruneReport, drop_layers, prune

__all__ = ["prune", "drop_layers", "Pruned", "PruneReport", "distill", "Distilled", "DistillReport"]
