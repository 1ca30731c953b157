"""ksz-proxy: a local authenticating sidecar for the KSZ-BCSS REST APIs."""

__version__ = "0.1.0"
