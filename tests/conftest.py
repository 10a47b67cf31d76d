import os
import shutil
import tempfile

import pytest

from lmserve.cli import default_model_path


def pytest_configure(config):
    """Converted weights (lmserve/weights/converted.py) go to a folder of the session's, for this
    process and every server it starts: not the user's cache, which the tiny models' would fill."""
    config.weights_cache = tempfile.mkdtemp(prefix="lmserve-weights-")
    os.environ["LMSERVE_WEIGHTS_CACHE"] = config.weights_cache


def pytest_unconfigure(config):
    shutil.rmtree(getattr(config, "weights_cache", ""), ignore_errors=True)


@pytest.fixture(scope="session")
def default_model():
    """The packaged SmolLM2-135M-Instruct GGUF, loaded once per test session."""
    from lmserve.weights.load import load_model

    return load_model(default_model_path(), max_positions=2048)


@pytest.fixture(scope="session")
def int4_model():
    """The same GGUF as `lmserve serve` runs it by default (its own Q4_1 blocks: --dtype int4),
    loaded once per test session: for tests that need the real model but not float32's exact,
    batch-invariant results. Shared: a test that changes it puts it back (test_native_row_groups.py
    loads its own)."""
    from lmserve.weights.load import load_model

    return load_model(default_model_path(), "int4", max_positions=2048)


@pytest.fixture(scope="session")
def default_tokenizer():
    """The default model's tokenizer, built from its GGUF once per test session."""
    from lmserve.text.tokenizer import Tokenizer
    from lmserve.weights.gguf import GGUFFile

    return Tokenizer.from_gguf(GGUFFile.open(default_model_path()))


@pytest.fixture(scope="session")
def grammar_compiler(default_tokenizer):
    """A GrammarCompiler over the default model's vocabulary."""
    from lmserve.sampling.grammar import GrammarCompiler

    return GrammarCompiler(default_tokenizer, default_tokenizer.vocab_size)


@pytest.hookimpl(trylast=True)
def pytest_sessionfinish(session, exitstatus):
    # A skipped test is not a passing one: every test here must run on a set-up machine.
    reporter = session.config.pluginmanager.get_plugin("terminalreporter")
    if reporter is not None and reporter.stats.get("skipped") and exitstatus == 0:
        session.exitstatus = 1
