"""The partner-facing onboarding commands: ``check``, ``cert-info``, ``csr`` and ``token``.

The proxy runtime never imports this package; ``proxy.cli`` parses the command line and calls the
command functions here with plain parameters. Each command writes to the ``out`` stream it is
given and returns an exit code; none of them exits.

- ``check.py``: the checklist, run in order, rendered for people or as JSON;
- ``results.py``: the checklist's building blocks (``StepResult``, settings, endpoints);
- ``probes.py``: steps 2-4 (DNS, TCP, TLS), with ``viaproxy.py`` for steps 2-3 through a
  forward proxy;
- ``steps.py``: steps 5 and 6 (token, health through an in-process proxy);
- ``certinfo.py``, ``csr.py``, ``token.py``: the commands around the partner's material;
- ``files.py``: passwords (file, environment, prompt) and files created, never overwritten.
"""
