"""One benchmark per claim, each against its anchor in the same run.

Run each from the repository root as a module, `.venv/bin/python -m benchmarks.NAME`: Corral is
installed, and benchmarks that share code import each other as `benchmarks.…`.
"""
