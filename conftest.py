"""Makes the top-level scripts importable from tests/ and registers the `slow` marker."""
import os, sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))


def pytest_configure(config):
    config.addinivalue_line("markers", "slow: longer quality checks (run with -m slow)")
