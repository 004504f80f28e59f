"""The dead-letter queue: jobs that failed finally, kept to inspect, replay or purge.

Redis Streams in production, the metadata store's ``dead_letters`` table in the
embedded default and whenever Redis is down (nothing is lost). The Gateway puts an
entry when a dispatched job ends with a service error (``haif.gateway.settlement``);
``haif dlq list|show|replay|purge`` read and manage them.
"""

from __future__ import annotations

from haif.dlq.entry import DeadLetter, dead_letter
from haif.dlq.queue import DeadLetterQueue

__all__ = ["DeadLetter", "DeadLetterQueue", "dead_letter"]
