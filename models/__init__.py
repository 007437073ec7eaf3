"""What each model *is*: architectures, their pure pre/post-processing, the
artifact format and the registry that names every model once.

This package imports torch, numpy and Pillow only. It never imports bentoml
or a data set loader, so both ``training`` and ``service`` can depend on it.
"""
