from pathlib import Path

import contextlib

from bench import compare
from bench.compare import CompareConfig, lmserve_kv_value_bytes, plan_workload
from bench.workloads import Workload

DECODE = Workload("decode-c4", "decode", 4, 8, 128, 256)
SHARED = Workload("shared-c16", "shared", 16, 16, 1600, 32, 1500)


def config(**overrides) -> CompareConfig:
    fields = {"gguf": Path("/m/model.gguf"), "llama_server": Path("/b/llama-server"), "lmserve": Path("/v/lmserve"),
              "workloads": [DECODE, SHARED], "out_dir": Path("/out")}
    return CompareConfig(**{**fields, **overrides})


def option(argv: list[str], name: str) -> str:
    return argv[len(argv) - 1 - argv[::-1].index(name) + 1]  # the last occurrence wins, as in argparse


def test_both_servers_get_the_same_slots_and_kv_capacity():
    plan = plan_workload(config(), DECODE, "model", kv_token_bytes=100 * 4)
    lmserve, llama = plan.commands
    assert (lmserve.label, llama.label) == ("lmserve", "llama.cpp")
    assert lmserve.argv[:3] == ["/v/lmserve", "serve", "/m/model.gguf"]
    assert option(lmserve.argv, "--max-model-len") == "512"  # 128 + 256, rounded up to 256
    assert option(lmserve.argv, "--kv-cache-memory") == str(4 * 512 * 100 * 4)  # the slots' tokens
    assert option(lmserve.argv, "--max-num-seqs") == "16"  # the largest concurrency of the set
    assert option(llama.argv, "--parallel") == "4" and option(llama.argv, "-c") == str(4 * 512)
    assert option(llama.argv, "-t") == "2" and option(lmserve.argv, "--threads") == "2"
    assert option(llama.argv, "--alias") == "model" and option(lmserve.argv, "--served-model-name") == "model"
    assert lmserve.port != llama.port and lmserve.log_path == Path("/out/logs/lmserve-decode-c4.log")


def test_llama_server_args_come_last():
    llama = plan_workload(config(llama_server_args=["--no-repack"]), DECODE, "model", kv_token_bytes=400).commands[1]
    assert llama.argv[-1] == "--no-repack"


def test_lmserve_args_come_last_so_they_override_the_defaults():
    lmserve = plan_workload(config(lmserve_args=["--kv-cache-memory", "2GiB", "--dtype", "bfloat16"]),
                            SHARED, "model", kv_token_bytes=400).commands[0]
    assert option(lmserve.argv, "--kv-cache-memory") == "2GiB" and lmserve.argv[-2:] == ["--dtype", "bfloat16"]
    assert option(lmserve.argv, "--max-model-len") == "1792"


def test_lmserve_kv_values_take_the_bytes_of_its_dtype(monkeypatch):
    """float32 values under float32; under a bf16 KV cache (bfloat16, int8, int4) half the bytes, so
    the budget holds the same tokens as llama.cpp's slots. The default, auto, keeps the Q4_1 file's
    precision (int4) where the CPU has int8 dot products, else falls back as the server would."""
    from lmserve.cli import default_model_path
    from lmserve.weights import dtype as auto

    gguf = default_model_path()
    assert lmserve_kv_value_bytes(gguf, ["--dtype", "float32"]) == 4
    for args in (["--dtype", "int4"], ["--dtype=bfloat16"], ["--threads", "2", "--dtype", "int8"]):
        assert lmserve_kv_value_bytes(gguf, args) == 2
    monkeypatch.setattr(auto, "cpu_flags", lambda: frozenset({"avx512_vnni", "avx512_bf16"}))
    assert lmserve_kv_value_bytes(gguf, []) == 2
    monkeypatch.setattr(auto, "cpu_flags", lambda: frozenset({"avx2"}))
    assert lmserve_kv_value_bytes(gguf, []) == 4


def test_the_driver_maps_none_of_the_servers_libraries():
    """The benchmark process must not map libtorch, numpy or lmserve's server stack: pages of
    them it touched would be shared with the lmserve server's, which then could not release the
    ones only its start-up used, and its RSS would count them. The KV sizes are read in a child."""
    import subprocess
    import sys

    from lmserve.cli import default_model_path

    probe = ("import sys\n"
             "from pathlib import Path\n"
             "import bench.__main__\n"
             "from bench.compare import CompareConfig, kv_bytes_per_token_apart, plan_workload\n"
             "from bench.workloads import Workload\n"
             "c = CompareConfig(Path(sys.argv[1]), Path('/l'), Path('/v'), lmserve_args=['--dtype', 'int4'],\n"
             "                  workloads=[Workload('decode-c1', 'decode', 1, 4, 128, 256)], out_dir=Path('/o'))\n"
             "token_bytes = kv_bytes_per_token_apart(c)\n"
             "argv = plan_workload(c, c.workloads[0], 'm', token_bytes).commands[0].argv\n"
             "print(token_bytes, argv[argv.index('--kv-cache-memory') + 1])\n"
             "print(' '.join(m for m in ('torch', 'numpy', 'gguf', 'lmserve', 'fastapi', 'pydantic') if m in sys.modules))\n")
    done = subprocess.run([sys.executable, "-c", probe, str(default_model_path())], capture_output=True, text=True,
                          timeout=120)
    assert done.returncode == 0, done.stderr
    sizes, imported = (done.stdout.splitlines() + [""])[:2]
    values = 2 * 30 * 3 * 64  # SmolLM2-135M: 30 layers, 3 KV heads of 64
    assert sizes.split() == [str(values * 2), str(512 * values * 2)]  # bf16 K/V under int4
    assert imported == ""


def test_lmserve_starts_once_unmeasured_before_each_new_set_of_arguments(monkeypatch):
    """A start that converts the weights (the first with a set of arguments, which replaces the set
    kept before it) is not the measured one: each measured lmserve run whose arguments differ from
    the last lmserve start's, other than port and KV budget, comes after an unmeasured start with
    the same ones; llama-server's never."""
    events = []

    @contextlib.contextmanager
    def started(command):
        events.append(("unmeasured", command.label, command.argv))
        yield 1

    def measured(command, workload, model, options):
        events.append(("measured", command.label, command.argv))
        return compare.failed_run(command.label, workload, "not run")

    monkeypatch.setattr(compare, "check_binaries", lambda config: None)
    monkeypatch.setattr(compare, "kv_bytes_per_token_apart", lambda config: 400)
    monkeypatch.setattr(compare, "running_server", started)
    monkeypatch.setattr(compare, "_measure", measured)
    again = Workload("decode-c8", "decode", 8, 8, 128, 256)  # DECODE's context, another KV budget
    compare.run_compare(config(workloads=[DECODE, again, SHARED, DECODE]))
    kinds = [(kind, label) for kind, label, _ in events]
    assert kinds == [("unmeasured", "lmserve"), ("measured", "lmserve"), ("measured", "llama.cpp"),
                     ("measured", "lmserve"), ("measured", "llama.cpp"),
                     ("unmeasured", "lmserve"), ("measured", "lmserve"), ("measured", "llama.cpp"),
                     ("unmeasured", "lmserve"), ("measured", "lmserve"), ("measured", "llama.cpp")]
    lmserve = [(kind, argv) for kind, label, argv in events if label == "lmserve"]
    pairs = zip(lmserve, lmserve[1:])
    assert all(argv == following for (kind, argv), (_, following) in pairs if kind == "unmeasured")
    assert option(lmserve[1][1], "--kv-cache-memory") != option(lmserve[2][1], "--kv-cache-memory")
    assert option(lmserve[2][1], "--max-model-len") != option(lmserve[4][1], "--max-model-len")
