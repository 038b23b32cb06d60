"""Benchmarks that rerun the thesis' training comparisons over several seeds and write tables.

Run one with ``python -m benchmarks.<name> [--dry-run] ...``; each writes Markdown
tables between markers into ``docs/RESULTS.md``, leaving the rest of the file untouched.

- ``student_teacher``: the student-teacher regression comparisons of figs. 5.7 (exact inverses),
  5.13 (4 hidden layers), 5.14/5.15 (6-6-6) and 5.18 (contracting 6-6-4): final train and test
  MSE, mean ± sd over seeds, diverged runs counted.
"""
