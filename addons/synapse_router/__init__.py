"""synapse-router: routes Matrix Synapse traffic to worker processes, as a mitmproxy addon."""
