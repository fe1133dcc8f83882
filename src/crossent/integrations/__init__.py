"""Integrations of crossent's losses into training frameworks.

- :mod:`crossent.integrations.transformers` -- Hugging Face Transformers: ``patch(model, ...)``
  turns a model's loss into crossent's (fused ``linear_cross_entropy`` for the causal LMs of
  the common families, ``cross_entropy`` through ``model.loss_function`` for the rest).
  Needs the optional extra: ``pip install crossent[hf]``.

Nothing is imported here: each integration imports its framework when it is itself imported.
"""
