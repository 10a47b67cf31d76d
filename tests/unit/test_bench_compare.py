from pathlib import Path

from bench.compare import CompareConfig, plan_workload
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
    plan = plan_workload(config(), DECODE, "model", kv_values=100)
    lmserve, llama = plan.commands
    assert (lmserve.label, llama.label) == ("lmserve", "llama.cpp")
    assert lmserve.argv[:3] == ["/v/lmserve", "serve", "/m/model.gguf"]
    assert option(lmserve.argv, "--max-model-len") == "512"  # 128 + 256, rounded up to 256
    assert option(lmserve.argv, "--kv-cache-memory") == str(4 * 512 * 100 * 4)  # float32 values by default
    assert option(lmserve.argv, "--max-num-seqs") == "16"  # the largest concurrency of the set
    assert option(llama.argv, "--parallel") == "4" and option(llama.argv, "-c") == str(4 * 512)
    assert option(llama.argv, "-t") == "2" and option(lmserve.argv, "--threads") == "2"
    assert option(llama.argv, "--alias") == "model" and option(lmserve.argv, "--served-model-name") == "model"
    assert lmserve.port != llama.port and lmserve.log_path == Path("/out/logs/lmserve-decode-c4.log")


def test_llama_server_args_come_last():
    llama = plan_workload(config(llama_server_args=["--no-repack"]), DECODE, "model", kv_values=100).commands[1]
    assert llama.argv[-1] == "--no-repack"


def test_lmserve_args_come_last_so_they_override_the_defaults():
    lmserve = plan_workload(config(lmserve_args=["--kv-cache-memory", "2GiB", "--dtype", "bfloat16"]),
                            SHARED, "model", kv_values=100).commands[0]
    assert option(lmserve.argv, "--kv-cache-memory") == "2GiB" and lmserve.argv[-2:] == ["--dtype", "bfloat16"]
    assert option(lmserve.argv, "--max-model-len") == "1792"


def test_lmserve_kv_budget_holds_the_same_tokens_in_bf16():
    """Under a bf16 KV cache lmserve gets half the bytes: the same tokens as llama.cpp's slots."""
    for args in (["--dtype", "int4"], ["--dtype=bfloat16"]):
        lmserve = plan_workload(config(lmserve_args=args), DECODE, "model", kv_values=100).commands[0]
        assert option(lmserve.argv, "--kv-cache-memory") == str(4 * 512 * 100 * 2)


def test_planning_imports_no_torch():
    """The benchmark process must not map libtorch: pages it touched would be shared with the
    server's, which then could not release the ones only its start-up used, and are counted by both."""
    import subprocess
    import sys

    probe = ("import sys\n"
             "from pathlib import Path\n"
             "import bench.__main__\n"
             "from bench.compare import CompareConfig, plan_workload\n"
             "from bench.workloads import Workload\n"
             "c = CompareConfig(Path('/m.gguf'), Path('/l'), Path('/v'), lmserve_args=['--dtype', 'int4'],\n"
             "                  workloads=[Workload('decode-c1', 'decode', 1, 4, 128, 256)], out_dir=Path('/o'))\n"
             "argv = plan_workload(c, c.workloads[0], 'm', kv_values=10).commands[0].argv\n"
             "print(argv[argv.index('--kv-cache-memory') + 1], 'torch' in sys.modules)\n")
    done = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stderr
    assert done.stdout.split() == [str(512 * 10 * 2), "False"]  # bf16 K/V under int4
