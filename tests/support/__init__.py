"""Helpers shared by the test tiers (no fixtures: those live in the conftest files).

- ``waiting``: wait on a condition with a deadline (sync and async).
- ``net``: a free loopback port; whether an HTTP server answers.
- ``deployment``: a HAIF deployment's address, ``ray job submit``, the ``haif`` CLI,
  reading a ``haif serve`` process until it serves.
- ``services``: PostgreSQL and Redis for the tests (the environment's, the local one, or our own).
- ``p2p``: the local hyperdht testnet, a Node peer, an event loop in a thread.
- ``loopback``, ``otlp``, ``webhook``: loopback HTTP receivers (OTLP traces, the billing webhook).
- ``tiny``: the tiny-llama test model on the torch runtime.
- ``sqlite``, ``admission``, ``artifacts``, ``metrics``, ``tenancy``, ``cluster``: small
  helpers more than one test module uses.
- ``*_cases``: test cases shared by a unit test (embedded store) and an integration test
  (PostgreSQL, S3, ...), run against each backend.
"""
