"""Helpers shared by the test modules; no test module imports another test module.

- ``partner.py``: the partner client (id, scopes, keystore files) and the auth server handle;
- ``chain.py``: the whole chain in-process (fake auth server, fake upstream, proxy), as fixtures;
- ``config.py``: configurations pointing at the fakes, as data or as a TOML file, with overrides;
- ``process.py``: ``python -m proxy run`` in a subprocess, its stderr kept for assertions;
- ``metrics.py``: /metrics scraped and parsed into samples;
- ``wait.py``: bounded polling; ``clock.py``: a monotonic clock moved by hand; ``rss.py``: RSS;
- ``paths.py``: what strict and lenient servers make of a raw path;
- ``smuggling.py``: the request-smuggling corpus, with the C parser's verdict on each case;
- ``rawhttp.py``, ``faultproxy.py``, ``soakload.py``: raw HTTP, a fault-injecting TCP proxy,
  the soak test's load generator (run as ``python -m tests.support.soakload``).
"""
