"""The course lab: the lecture's demos, run with ``python -m cifarlab.course {demos,init-variance,gradients}``.

The course optimizers themselves live in :mod:`cifarlab.optim`.
"""
