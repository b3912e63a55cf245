"""PlainTls: TLS on the router's plain listener is refused unless the operator configured a
certificate.

mitmproxy's reverse mode `reverse:http://MAIN@PORT` looks at a client's first bytes: a TLS
client hello is answered with a TLS handshake, with a certificate made on the fly by
mitmproxy's own CA (in ~/.mitmproxy), and the request then reaches the worker with
`X-Forwarded-Proto: https`. No client trusts that CA, and a router meant to sit behind a TLS
terminator (or to serve plain HTTP on a private network) should not pretend to terminate TLS.
So unless mitmproxy's `certs` option names a certificate (`--set certs=*=/path/cert.pem`: the
router then terminates TLS with it, as mitmproxy does), the connection is closed at its client
hello, before any handshake, and a line says so (the client's address, nothing it sent).
"""

from __future__ import annotations

import logging

from mitmproxy import ctx, tls

from ..compat.connections import client_io

log = logging.getLogger("synapse_router.tls")


class PlainTls:
    def tls_clienthello(self, data: tls.ClientHelloData) -> None:
        if ctx.options.certs:
            return  # the operator gave the router a certificate: it terminates TLS with it
        client = data.context.client
        io = client_io(client.id)
        host, port = client.peername[:2] if client.peername else ("?", 0)
        log.info(
            f"synapse-router: TLS client hello from {host}:{port} on a plain HTTP listener: "
            "connection closed (no certificate configured: mitmproxy option certs)"
        )
        client.error = "synapse-router: TLS on a plain listener"
        if io is not None and io.handler is not None:
            io.handler.cancel("synapse-router: TLS on a plain listener")
