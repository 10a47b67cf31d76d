"""The e2e tests' shared server (one per session, see tests/helpers/live_server.py) and its clients."""

from __future__ import annotations

import pytest

from tests.helpers.browser import chromium_path
from tests.helpers.live_server import KEYED_MAX_QUEUED, KEYED_MAX_RUNNING, KEYS, start_server


@pytest.fixture(scope="session")
def server():
    proc, url, health_codes = start_server()
    yield {"url": url, "health_codes": health_codes, "proc": proc}
    proc.terminate()
    proc.wait(timeout=30)


@pytest.fixture(scope="session")
def client(server):
    import openai

    return openai.OpenAI(base_url=f"{server['url']}/v1", api_key="unused", max_retries=0, timeout=120)


@pytest.fixture(scope="session")
def float32_server(tmp_path_factory):
    """A second server run with `--dtype float32`: the path whose outputs do not depend on what else
    shares a step (the default server runs the packaged Q4_1 model as int4). Its embedding model is
    a random 2-layer BERT that shares MiniLM's tokenizer files, named tiny-bert, with last-token
    pooling for the chat model (tests/e2e/test_embeddings.py); neither touches chat completions."""
    import shutil

    import transformers

    from lmserve.cli import default_embedding_model_path

    folder = tmp_path_factory.mktemp("tiny-bert")
    config = transformers.BertConfig(vocab_size=30522, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                     num_attention_heads=4, max_position_embeddings=64)
    transformers.BertModel(config).save_pretrained(folder, safe_serialization=True)
    for name in ("tokenizer.json", "tokenizer_config.json"):
        shutil.copy(default_embedding_model_path() / name, folder / name)
    proc, url, _ = start_server("--dtype", "float32", "--embedding-model", str(folder),
                                "--embedding-model-name", "tiny-bert", "--chat-embedding-pooling", "last")
    yield url
    proc.terminate()
    proc.wait(timeout=30)


@pytest.fixture(scope="session")
def float32_client(float32_server):
    import openai

    return openai.OpenAI(base_url=f"{float32_server}/v1", api_key="unused", max_retries=0, timeout=120)


@pytest.fixture(scope="session")
def model_id(client):
    return client.models.list().data[0].id


@pytest.fixture(scope="session")
def tokenizer(default_model):
    return default_model.tokenizer


@pytest.fixture(scope="session")
def keyed_server():
    """Two API keys and tight limits: test_auth.py's and test_overload.py's server (neither file's
    assertions touch the other's flags)."""
    proc, url, _ = start_server("--api-key", KEYS[0], "--api-key", KEYS[1], "--max-num-seqs", str(KEYED_MAX_RUNNING),
                                "--max-queued-requests", str(KEYED_MAX_QUEUED), "--no-embedding-model")
    yield url
    proc.terminate()
    proc.wait(timeout=30)


# The hostile-input server's read timeout: short, so the slow-client tests are quick.
HOSTILE_READ_TIMEOUT = 2


@pytest.fixture(scope="session")
def hostile_server(tmp_path_factory):
    """A server for hostile input (tests/e2e/test_hostile_inputs.py, test_openapi_fuzz.py): a
    short --read-timeout and --write-timeout, a low --max-connections, slots saved to a folder of its own; its log
    (stderr) in `log`, read by the tests that no traceback reached it."""
    folder = tmp_path_factory.mktemp("hostile")
    (folder / "slots").mkdir()
    log = folder / "server.log"
    with open(log, "w") as stderr:
        proc, url, _ = start_server("--read-timeout", str(HOSTILE_READ_TIMEOUT), "--max-connections", "40",
                                    "--write-timeout", str(HOSTILE_READ_TIMEOUT),
                                    "--slot-save-path", str(folder / "slots"), stderr=stderr)
    yield {"url": url, "port": int(url.rsplit(":", 1)[1]), "log": log, "read_timeout": HOSTILE_READ_TIMEOUT}
    proc.terminate()
    proc.wait(timeout=30)


@pytest.fixture(scope="module")
def browser():
    """Debian's chromium, driven by Playwright (the README's test command installs both). Per
    module: Playwright's sync API keeps an event loop running in this thread while it is open,
    and tests after it call asyncio.run()."""
    from playwright.sync_api import sync_playwright

    with sync_playwright() as playwright:
        chromium = playwright.chromium.launch(executable_path=chromium_path())
        yield chromium
        chromium.close()
