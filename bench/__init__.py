"""dtrain's benchmarks (see bench/README.md).

Every script here runs as `python bench/<script>.py` from the repository root. Run that way (no
`__package__`), a script first puts the repository root on `sys.path`, so that `from bench import
common` and `import dtrain` work the same whether it is run or imported (tests/bench imports
`bench.presets`, `bench.report`, ...).

Shared by the scripts: `common` (machine, versions, medians, results files, child processes and
their logs), `presets` (typed, frozen presets and variants of bench/run.py), `runners` (one launch
per variant), `report` (goals and the markdown table).
"""
