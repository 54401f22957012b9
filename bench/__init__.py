"""fastmask benchmark suite (pytest-benchmark) and its report script (``python -m bench.report``).

Not part of the installed package; run from the repository root. See ``bench/RESULTS.md``.
"""
