"""Facts proven from the model's exported graph (probes on samples only confirm them):
`graph` exports it once with its dynamic dims symbolic; `batch` finds the ops that couple the rows of a batch;
`padding` proves that padding changes no answer (the mask reaches every reduction over the sequence) and finds
padding masks by where they flow; `aliasing` finds which outputs of an engine's graph may share memory with an
input, a constant or another output."""
