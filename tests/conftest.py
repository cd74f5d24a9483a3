import os
import sys

import pytest

# the repo root, so tests import train_wan, common, data as a user's script would
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


@pytest.fixture(scope="session")
def toy(tmp_path_factory):
    """The toy dataset (data/toy.py defaults) and a cache folder, shared by every script's training tests: cache
    entries are keyed by content and encoder settings, so scripts with the same toy encoding share them safely."""
    from data.toy import make_toy_dataset
    d = tmp_path_factory.mktemp("toy")
    make_toy_dataset(str(d / "data"))
    return {"data": str(d / "data"), "cache": str(d / "cache"), "root": d}
