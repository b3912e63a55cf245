"""Pure routing logic: the route table, pools, rendezvous hashing, the decision (no mitmproxy import)."""
