import os

import matplotlib
import pytest
import torch

matplotlib.use("Agg")


@pytest.fixture(autouse=True)
def one_thread():
    """The test models are tiny: one thread is fastest, and far faster on a busy machine."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(autouse=True, scope="session")
def checkpoints_in_a_temporary_folder(tmp_path_factory):
    """``training.checkpoint_path`` points into a temporary folder, never the user's cache."""
    before = os.environ.get("GENART_CHECKPOINTS")
    os.environ["GENART_CHECKPOINTS"] = str(tmp_path_factory.mktemp("checkpoints"))
    yield
    if before is None:
        del os.environ["GENART_CHECKPOINTS"]
    else:
        os.environ["GENART_CHECKPOINTS"] = before
