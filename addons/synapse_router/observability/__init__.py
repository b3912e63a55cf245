"""What the router shows: the access log, Prometheus metrics, log redaction, loop exception filters."""
