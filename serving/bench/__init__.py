"""`keel bench`: load, sweeps, goodput, cost and reports (see benchmarks/README.md)."""
