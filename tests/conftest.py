import pytest

from lmserve.cli import default_model_path


@pytest.fixture(scope="session")
def default_model():
    """The packaged SmolLM2-135M-Instruct GGUF, loaded once per test session."""
    from lmserve.weights.load import load_model

    return load_model(default_model_path(), max_positions=2048)
