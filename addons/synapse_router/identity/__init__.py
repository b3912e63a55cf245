"""Who sends a request: access tokens, the whoami resolver and its caches and rate limits."""
