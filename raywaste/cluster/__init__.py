"""A private, token-authenticated Ray cluster inside one PBS (or Slurm) job.

The shell wrappers in ``cluster/`` call ``python -m raywaste.cluster``:

- ``start`` runs on the job's first node. It reads the allocation, starts the Ray
  head there and one worker per other node through the scheduler's launcher,
  waits until every node has joined, and writes ``ray.env`` for the driver.
- ``node start`` and ``node stop`` run on one node each, started by the launcher.
- ``stop`` stops this job's Ray processes on every node and deletes the token.

Everything that two jobs on one node could share is derived from the job id:
ports, temp dirs and the job directory with the token.
"""

from raywaste.cluster.errors import ClusterError

__all__ = ["ClusterError"]
