"""The control plane's decisions: each a small policy that reads the fleet's state and
asks it to act.

* ``rollouts``: the operator's rollouts, read from the metadata store, made the fleet's;
  the canary's state written back.
* ``canary``: the Gateways' outcomes per version judged; a failing canary rolled back.
* ``autoscaling``: each pool's autoscaler fed with loads and queues; scale from zero.
* ``drains``: ``haif workers drain`` requests, and retired workers drained and stopped.
* ``store``: the metadata store as these policies read and write it.
"""
