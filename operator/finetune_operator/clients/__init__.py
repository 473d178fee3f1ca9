"""Clients: the only code that performs I/O against the Kubernetes API."""
