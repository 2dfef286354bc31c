"""Makes the top-level scripts importable from tests/, registers the `slow` marker, and makes the suite hermetic:
every test run gets its own empty evaluator cache (GENMODELS_CACHE), so no stale .cache/ can change a result. The
built-in digits' evaluators are not cached but shipped in evaluators/, versioned with the code that trains them."""
import os, sys, tempfile

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
os.environ["GENMODELS_CACHE"] = tempfile.mkdtemp(prefix="genmodels-cache-")   # before common is imported


def pytest_configure(config):
    config.addinivalue_line("markers", "slow: longer quality checks (run with -m slow)")
