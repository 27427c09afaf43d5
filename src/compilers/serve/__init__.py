"""Serving compiled artifacts: a model repository of versions, a dynamic batcher, and (coming) the Open
Inference Protocol server. Optional: the HTTP parts need the `serve` extra."""
