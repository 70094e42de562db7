"""One module per job: its arguments, output table, micro-batch processor and `main`."""
