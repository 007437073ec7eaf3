"""A fourth model, kept outside the repository's packages: a tiny MLP digit classifier.

``tests/test_extra_model.py`` copies this package to a temporary directory and
names its spec in ``MODEL_SPECS``; the pipeline then trains, exports, verifies
and registers it, and the service serves it, without an edit to ``models/``,
``training/`` or ``service/``.
"""
