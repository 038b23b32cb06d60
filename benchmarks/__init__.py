"""Benchmarks that rerun the thesis' training comparisons over several seeds and write tables.

Lab code beside the package, not installed with it: run one from the checkout's root with
``python -m benchmarks.<name> [--dry-run] ...``; each writes Markdown tables between markers into the
checkout's ``docs/RESULTS.md``, leaving the rest of the file untouched.

- ``student_teacher``: the student-teacher regression comparisons of figs. 5.7 (exact inverses),
  5.13 (4 hidden layers), 5.14/5.15 (6-6-6) and 5.18 (contracting 6-6-4): final train and test
  MSE, mean ± sd over seeds, diverged runs counted.
"""
