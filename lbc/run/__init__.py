"""One run lifecycle for every task: the run directory (claim, lock, share), the resolved config,
the metrics record (one schema, one writer, one reader), the start and done lines, graceful stop,
cleanup after a failed start. A task supplies only its build, train and evaluate."""
