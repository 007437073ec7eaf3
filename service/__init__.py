"""How the models are served: the BentoML service built from its settings
(``service.bento``), the route table each model's task declares (``service.routes``,
``service.tasks``), inference backends, adaptive batching, schemas and error handling.

Imports ``models`` (never ``training``). Start with::

    bentoml serve service.service:ServingService --port 3000
"""
