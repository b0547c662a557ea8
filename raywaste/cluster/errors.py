"""The one exception type of the cluster scripts."""


class ClusterError(Exception):
    """A cluster step failed. The message names the value or node and what to do next."""
