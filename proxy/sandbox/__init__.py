"""The embedded fake KSZ: authorization server, REST API and throw-away PKI, for the demo and
the tests.
"""
