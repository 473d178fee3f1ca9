"""Helpers and fixtures shared by the test folders (tests/ is on the import path, so
`from support.cluster import ...`). Fixtures are pytest plugins named in tests/conftest.py;
test modules import helpers from here, never from another test module."""
