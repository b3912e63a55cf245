"""The HTTP edge: what a client may send, limits, forwarding headers, and the router's own upstream client."""
