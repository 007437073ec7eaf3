"""How the models are served: the BentoML service (``service.service``), its
settings, inference backends, adaptive batching, schemas and error handling.

Imports ``models`` (never ``training``). Start with::

    bentoml serve service.service:ServingService --port 3000
"""
