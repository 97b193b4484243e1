"""Command lines: ``train`` (train.py, ``parscale-train``) and ``eval`` (eval.py, ``parscale-eval``,
with ``eval generate``). Each module's ``main(argv)`` returns the exit code; errors are one line
(:func:`parscale_jax.errors.cli_entry`). Conversion (``parscale-convert``) and the task builder
(``parscale-tasks``) keep their command lines in :mod:`parscale_jax.convert` and
:mod:`parscale_jax.tasks`."""
