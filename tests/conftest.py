"""Fixtures every test folder can use, from tests/support (helpers: `from support.x import y`).

- support.k8s_fixtures: `emulator` and `operator_runner` (the embedded Kubernetes API and the
  real operator against it; options through `@pytest.mark.emulator(...)`).
- support.trainer_fixtures: `tiny_model` (a tiny random model on disk, once per session).
"""

pytest_plugins = ["support.k8s_fixtures", "support.trainer_fixtures"]
