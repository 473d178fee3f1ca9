import sys
from pathlib import Path

# The restricted-profile checker lives with the chart tests (tests/chart/chartlib.py and co.).
sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "chart"))

from k8s_fixtures import emulator, operator_runner  # noqa: F401
