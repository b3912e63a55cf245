"""The one place for private internals of libraries and of Python that the router relies on,
one module per internal, each run by a behavioural test (tests/unit/test_compat*.py) against the
installed version, so that an upgrade which changes one fails a test, not a user:

    regex     `re._parser`: a regular expression's parse tree (routes audit makes paths from
              Synapse's servlet patterns)
    printing  mitmproxy's Dumper `echo_flow`: printed flows go through the router's redaction
    http1     mitmproxy 12.3's HTTP/1 server layer with the request-side edge cases answered as
              nginx does (leading empty lines, bad chunks, trailers, stalled bodies, the HTTP/2
              preface)

Older uses still live where they were written (connection_limits.client_io and _HeadGuard,
streamed_errors, the lean launcher, upstream_client's h11 readers); moving them here is open.
This package itself imports nothing, so a pure module may import one of its pure submodules.
"""
