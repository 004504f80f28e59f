"""The operator plane: one set of admin operations, two ways to reach it.

- :mod:`haif.admin.operations` names the operations (``Operations``) and the records they
  answer with, JSON-ready dicts, the same whichever way they are reached.
- :mod:`haif.admin.service` carries them out on the metadata store (``AdminService``), each
  change with its audit row (:mod:`haif.admin.audit`): the admin HTTP API's routes
  (:mod:`haif.bridge.routers.admin`) call it in every Gateway replica, and the CLI calls it
  directly when it has no ``HAIF_URL``.
- :mod:`haif.admin.client` reaches the same operations over HTTP (``HttpOperations``): the
  CLI with ``HAIF_URL`` and ``HAIF_TOKEN`` needs no database access.
"""
