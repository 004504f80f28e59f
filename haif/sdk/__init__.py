"""Python clients of HAIF: ``HandleClient`` inside the Ray cluster, ``HttpClient`` outside.

Both return the models of ``haif.protocol`` (the OpenAI shapes) and raise the errors of
``haif.exceptions``.
"""

from haif.sdk._handle import HandleClient
from haif.sdk._http import HttpClient

__all__ = ["HandleClient", "HttpClient"]
