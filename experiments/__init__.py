"""Small numerical experiments that check the thesis' theory (chapter 5), one module each.

Lab code beside the package, not installed with it: run one from the checkout's root with
``python -m experiments.<name> [--out DIR] [--full] [--seed S]``; each writes PNG figure(s) and a JSON
of its numbers to ``DIR`` (default: the checkout's ``out/<name>``) and prints a
short summary. ``--full`` uses the thesis' sizes; the default finishes in seconds.

- ``sherman_morrison``: fig. 5.5, ``|1 + d|`` of the Sherman-Morrison update vs ``sigma_min`` of
  the updated matrix, plain and robust (Alg. 4.1).
- ``block_diagonal``: fig. 5.6, angle between the full and the block-diagonal Gauss-Newton update
  of the hidden activations (lemma 4.2) for batch sizes 1 and 100.
- ``factorisation``: fig. 5.12, ``||J^f e_L - J^+ e_L||`` for the architectures of lemma 4.8.
- ``toy``: figs. 5.2-5.4, the 1-2-2 toy example (section 5.1.1): Gauss-Newton, TP, BP and
  modified-TP trajectories on the loss contours.
- ``pseudo_inverse``: figs. 5.9-5.11, Alg. A.8 learning ``W^-1`` / ``W^+`` (equal, contracting,
  expanding layers; white vs coloured noise; lambda 0 vs 0.2) and the original form's error.
- ``student_teacher``: figs. 5.7/5.8 and 5.13-5.19, multi-seed curves with the
  :class:`~tplightning.diagnostics.TargetPropDiagnostics` angles and approximation errors.
- ``gnt_angles``: Meulemans et al. 2020's figs. 4/S4, GNT angles of DTP, DTP with pre-trained feedback, DRL,
  DDTP-linear, L-DRL and DTP-AI on MNIST at the authors' protocol (its own options, not ``--full``).
- ``null_space``: Meulemans et al. 2020's fig. 2, the null-space share of the layer updates on its student-teacher
  setup.

Shared helpers (CLI, output, figures, batched random matrices) live in :mod:`experiments.common`; chapter 6's
commands in :mod:`experiments.dynamics`.
"""
