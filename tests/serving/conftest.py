from k8s_fixtures import emulator, operator_runner  # noqa: F401
