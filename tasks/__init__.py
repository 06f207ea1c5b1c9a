"""One module per pipeline stage: `run(params, *, paths)` holds the logic, `main()` serves DVC."""
