"""Facts proven from the model's exported graph (probes on samples only confirm them):
`graph` exports it once with its dynamic dims symbolic; `batch` finds the ops that couple the rows of a batch."""
