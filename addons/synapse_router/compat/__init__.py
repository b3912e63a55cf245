"""The one place for private internals of libraries and of Python that the router relies on,
one module per internal, each run by a behavioural test (tests/unit/test_compat*.py) against the
installed version, so that an upgrade which changes one fails a test, not a user:

    regex     `re._parser`: a regular expression's parse tree (routes audit makes paths from
              Synapse's servlet patterns)
    printing  mitmproxy's Dumper `echo_flow`: printed flows go through the router's redaction
    http1     mitmproxy 12.3's HTTP/1 server layer with the request-side edge cases answered as
              nginx does (leading empty lines, bad chunks, trailers, stalled bodies, the HTTP/2
              preface); the body watch is the installer's (ConnectionLimits'), not module state
    connections  a live client connection's task, reader and writer (Proxyserver.connections,
              ConnectionHandler.transports), HeadGuard (the head mitmproxy's layer holds)
    listening  the proxy's asyncio servers (`_servers`), accepting per wake-up (asyncio's
              `_accept_connection`, screening each connection as it is accepted), serving a
              connection accepted here (`handle_stream`)
    addonmanager  AddonManager `_iter_hooks`/`_configure_all`, Master `_legacy_log_events`
    h11parts  h11's receive buffer, body readers, request writer, `Request(_parsed=True)`

pyproject.toml pins mitmproxy==12.3.* and h11==0.16.*; tests/unit/test_compat_pins.py names the
test that runs each module and fails on another installed version.
This package itself imports nothing, so a pure module may import one of its pure submodules.
"""
