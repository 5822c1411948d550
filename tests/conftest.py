"""Test configuration: the suite runs offline and fails loudly if anything reaches the network."""

import os

# Before anything imports huggingface_hub, which reads these once.
os.environ["HF_HUB_OFFLINE"] = "1"
os.environ["HF_DATASETS_OFFLINE"] = "1"
os.environ["TRANSFORMERS_OFFLINE"] = "1"
os.environ["HF_HUB_DISABLE_TELEMETRY"] = "1"
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import ipaddress
import socket

import pytest


class NetworkAccessError(RuntimeError):
    """A test tried to open a connection to a non-loopback address."""


_real_connect = socket.socket.connect
_real_connect_ex = socket.socket.connect_ex


def _check_address(sock: socket.socket, address) -> None:
    if sock.family not in (socket.AF_INET, socket.AF_INET6):
        return  # unix sockets are local
    host = address[0]
    try:
        if ipaddress.ip_address(host).is_loopback:
            return
    except ValueError:
        if host == "localhost":
            return
    raise NetworkAccessError(f"test tried to reach the network: {address!r}; tests must run offline")


def _guarded_connect(self, address):
    _check_address(self, address)
    return _real_connect(self, address)


def _guarded_connect_ex(self, address):
    _check_address(self, address)
    return _real_connect_ex(self, address)


def pytest_collection_modifyitems(config, items):
    """Real-model tests are slow too: `pytest -m "not slow"` is the quick local run."""
    for item in items:
        if item.get_closest_marker("real"):
            item.add_marker(pytest.mark.slow)


def pytest_configure(config):
    socket.socket.connect = _guarded_connect
    socket.socket.connect_ex = _guarded_connect_ex


def pytest_unconfigure(config):
    socket.socket.connect = _real_connect
    socket.socket.connect_ex = _real_connect_ex


@pytest.fixture(scope="session")
def tokenizer():
    from ivtrainer.testing import tiny_tokenizer

    return tiny_tokenizer()


@pytest.fixture(scope="session")
def default_model():
    """The real SmolLM2-135M-Instruct (converted once into the user's ivtrainer cache)."""
    from ivtrainer.modeling.loading import load_default_model

    model, tokenizer = load_default_model()
    return model.eval(), tokenizer


@pytest.fixture(scope="module")
def iv(tokenizer):
    """A small antonym IV of a tiny Llama, shared by the training tests (a module may override it)."""
    from ivtrainer import extract_instruction_vector
    from ivtrainer.testing import tiny_model
    from tests.utils import SMALL

    return extract_instruction_vector(tiny_model("llama"), tokenizer, "antonym", **SMALL)


@pytest.fixture(scope="module")
def data(tokenizer):
    """Eight tokenised edits (the new targets), shared by the training tests."""
    from ivtrainer.datasets.edits import edit_dataset
    from ivtrainer.testing import tiny_edits

    return edit_dataset(tiny_edits(8), tokenizer, "new")
