"""Fixtures every test folder can use, from tests/support (helpers: `from support.x import y`).

- support.k8s_fixtures: `emulator` and `operator_runner` (the embedded Kubernetes API and the
  real operator against it; options through `@pytest.mark.emulator(...)`).
- support.trainer_fixtures: `tiny_model` (a tiny random model on disk, once per session).
"""

import os
import shutil

pytest_plugins = ["support.k8s_fixtures", "support.trainer_fixtures"]

# Triton runs on a machine without a GPU only under its interpreter, which Triton picks for
# its own functions when it is first imported (torch may import it early): set it before
# anything runs. The fused layers use the Triton dropout kernels on the CPU only then.
if shutil.which("nvidia-smi") is None:
    os.environ.setdefault("TRITON_INTERPRET", "1")
