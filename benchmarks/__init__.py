"""Benchmark suite (issue 6): each module prints its figures and appends JSON lines to
results/benchmarks.jsonl. Run them all with `python -m benchmarks.run_all [--quick]`;
see docs/benchmarks.md."""
