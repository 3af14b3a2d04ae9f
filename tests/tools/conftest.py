from pathlib import Path

import pytest
import torch

from tests.tools.tiny_runs import run_train, word_corpus


@pytest.fixture(autouse=True)
def one_thread():
    """Tiny models: a second OpenMP thread only adds synchronisation (and the machine is shared)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="session")
def text_file(tmp_path_factory) -> Path:
    """About 40 KB of varied text: val and test splits of about 2 KB each."""
    return word_corpus(tmp_path_factory.mktemp("data") / "corpus.txt", 6000)


@pytest.fixture(scope="session")
def tiny_run(tmp_path_factory, text_file) -> Path:
    """A finished 3-step run's folder (last.pt, metrics); copy what a test changes."""
    out = tmp_path_factory.mktemp("tiny_run")
    run_train(out, text_file, "--steps", "3", "--eval-every", "100")
    return out
