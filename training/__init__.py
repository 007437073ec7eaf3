"""How each model is *made*: data loading, training loops, evaluation, ONNX
export and parity checks, and registration in the BentoML model store.

Imports ``models``; never imported by ``service``.
"""
