"""Commands that test the predictions of thesis section 6.8 on simulated chapter-6 networks.

Run one with ``python -m experiments.dynamics.<name> [--out DIR] [--full] [--seed S]``;
each writes PNG figure(s) and a JSON of its numbers to ``DIR`` (default: the checkout's ``out/dyn_<name>``), prints a
summary, and with ``--docs`` also writes its figure to ``docs/figures/`` and its table into
``docs/experiments.md`` (between ``<!-- name:begin -->`` / ``<!-- name:end -->`` markers).

- ``signals``: the learning signal's ``(mu/(1-mu))^{L+1-i}`` decay (eq. 6.15), reconstruction errors
  against the signal with approximate inverses (eq. 6.22), ``e^phase`` of the two-phase network
  (eq. 6.36), and the multiplexing network's depth-independent signal (eq. 6.59), at equilibrium.
- ``stability``: section 6.7's claim, eigenvalues and symmetric part, on random blocks and at the
  equilibria of random networks.
- ``training``: student-teacher (6-6-6 and 6-6-6-6-6-6) and optionally MNIST training of the
  dynamical modules against DTP-AI, with the angles of their updates to DTP-AI's and Gauss-Newton's.
"""
