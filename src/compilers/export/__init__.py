"""Exports of saved artifacts to serving systems other than `compilers serve`: `triton` writes a Triton Inference
Server model directory."""
