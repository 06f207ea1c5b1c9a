"""Side-by-side benchmarks; `python -m benchmarks` (or `make bench`) runs every registered one."""
