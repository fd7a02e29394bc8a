"""Bad input to every command is one line (what is wrong, what to do) and exit code 2, found before any work or
process is started; no tracebacks. The commands run in-process (their ``main``) so the file stays fast; the CPU demo
is also run once as a module to bound its answer time."""

import json
import subprocess
import sys
import time
from pathlib import Path

import pytest

from megatron_fcp.cli import main as fcp_main
from megatron_fcp.errors import InputError
from megatron_fcp.launch.__main__ import main as launch_main
from megatron_fcp.launch.yamlsafe import MAX_ALIASES, MAX_DEPTH, load_yaml

REPO_ROOT = Path(__file__).resolve().parents[2]
TINY_CPU = (REPO_ROOT / "configs" / "tiny_cpu.yaml").read_text()
PLAN = ["plan", "--lengths", "linux_files", "--cp", "2", "--tokens-per-rank", "64"]
SIMULATE = ["simulate", "--lengths", "linux_files", "--cp", "2", "--tokens-per-rank", "64", "--num-batches", "1",
            "--strategies", "fcp", "--masks", "causal", "--quiet"]


def one_error_line(capsys, prog: str, *words: str) -> str:
    """The error output: exactly one line, from ``prog``, holding every one of ``words``, no traceback."""
    err = capsys.readouterr().err
    lines = [line for line in err.splitlines() if line.strip()]
    assert len(lines) == 1, err
    assert lines[0].startswith(f"{prog}: error: ") and "Traceback" not in err, err
    for word in words:
        assert word in lines[0], err
    return lines[0]


def run_fcp(capsys, argv, *words, prog="fcp plan") -> str:
    start = time.perf_counter()
    assert fcp_main(argv) == 2
    assert time.perf_counter() - start < 10
    return one_error_line(capsys, prog, *words)


# -- fcp plan / fcp simulate -------------------------------------------------------------------------------------
def test_length_above_int64_is_one_line(tmp_path, capsys):
    lengths = tmp_path / "big.txt"
    lengths.write_text("100\n99999999999999999999999\n")
    run_fcp(capsys, ["plan", "--lengths", str(lengths), "--cp", "2", "--tokens-per-rank", "64"], "big.txt:2",
            "is above")


def test_huge_digit_string_is_refused_quickly(tmp_path, capsys):
    lengths = tmp_path / "long.txt"
    lengths.write_text("9" * 100_000 + "\n")
    line = run_fcp(capsys, ["plan", "--lengths", str(lengths), "--cp", "2", "--tokens-per-rank", "64"], "long.txt:1")
    assert len(line) < 400


def test_binary_length_file_is_one_line(tmp_path, capsys):
    lengths = tmp_path / "lens.bin"
    lengths.write_bytes(b"\x7fELF\x02\x01\x01\x00" + bytes(range(256)) * 4)
    run_fcp(capsys, ["plan", "--lengths", str(lengths), "--cp", "2", "--tokens-per-rank", "64"], "lens.bin",
            "binary file")


def test_huge_kv_budget_is_one_line(capsys):
    run_fcp(capsys, [*PLAN, "--kv-budget-tokens", "99999999999999999999"], "--kv-budget-tokens", "none")


@pytest.mark.parametrize("command", ["plan", "simulate"])
def test_negative_seed_is_one_line(capsys, command):
    argv = PLAN if command == "plan" else SIMULATE
    run_fcp(capsys, [*argv, "--seed", "-1"], "--seed", ">= 0", prog=f"fcp {command}")


@pytest.mark.parametrize("command", ["plan", "simulate"])
def test_unwritable_json_is_refused_before_planning(tmp_path, capsys, monkeypatch, command):
    blocker = tmp_path / "file"
    blocker.write_text("a file, not a folder")
    import megatron_fcp.cli as cli

    monkeypatch.setattr(cli, "make_plan", lambda *a, **k: pytest.fail("planned before checking --json"))
    monkeypatch.setattr(cli, "simulate", lambda *a, **k: pytest.fail("simulated before checking --json"))
    argv = PLAN if command == "plan" else SIMULATE
    run_fcp(capsys, [*argv, "--json", str(blocker / "out.json")], "--json", "cannot write", prog=f"fcp {command}")
    assert capsys.readouterr().out == ""


def test_json_that_is_a_folder_is_refused(tmp_path, capsys):
    run_fcp(capsys, [*PLAN, "--json", str(tmp_path)], "--json", "is a folder")


def test_simulate_json_with_published_laws_profile(tmp_path):
    out = tmp_path / "sim.json"
    assert fcp_main([*SIMULATE, "--hardware", "h100_node_fa2_published", "--json", str(out)]) == 0
    laws = json.loads(out.read_text())["hardware"]["laws"]
    assert laws and all(isinstance(key, str) and "/" in key for key in laws)


def test_unknown_profile_names_the_profiles_plainly(capsys):
    line = run_fcp(capsys, [*SIMULATE, "--hardware", "h100_nodee"], "'h100_nodee'", "h100_node, h200_node",
                   prog="fcp simulate")
    assert "(" + "'" not in line


def test_simulate_validates_every_length_source_first(capsys, monkeypatch):
    import megatron_fcp.cli as cli

    monkeypatch.setattr(cli, "simulate", lambda *a, **k: pytest.fail("simulated before checking every source"))
    run_fcp(capsys, [*SIMULATE[:2], "linux_files,nope", *SIMULATE[3:]], "'nope'", prog="fcp simulate")


def test_ranks_is_a_count(capsys):
    with pytest.raises(SystemExit):
        fcp_main(["plan", "--help"])
    help_text = " ".join(capsys.readouterr().out.split())
    assert "--ranks COUNT how many ranks to print per plan" in help_text
    run_fcp(capsys, [*PLAN, "--ranks", "-1"], "--ranks", ">= 1")


# -- python -m megatron_fcp.launch check ----------------------------------------------------------------------------
def check_config(tmp_path, capsys, text: str | bytes, *words: str, limit_s: float = 5.0) -> str:
    path = tmp_path / "run.yaml"
    path.write_bytes(text if isinstance(text, bytes) else text.encode())
    start = time.perf_counter()
    assert launch_main(["check", str(path)]) == 2
    assert time.perf_counter() - start < limit_s
    return one_error_line(capsys, "megatron-fcp launch", str(path), *words)


def test_launch_check_binary_file(tmp_path, capsys):
    check_config(tmp_path, capsys, b"\x7fELF\x02\x01\x01\x00\xff\xfe" + bytes(range(256)), "binary file")


def test_launch_check_duplicate_key(tmp_path, capsys):
    text = TINY_CPU.replace("  context: 4  #", "  context: 4\n  context: 2  #", 1)
    assert text != TINY_CPU
    line_number = text.splitlines().index("  context: 2  # context-parallel size: the 4 processes share each "
                                          "sequence (data-parallel size 4 / 4 = 1)") + 1
    check_config(tmp_path, capsys, text, "'context'", "twice", f"line {line_number}")


def test_duplicate_keys_through_merge_are_allowed():
    assert load_yaml(b"base: &b {x: 1, y: 2}\nrun:\n  <<: *b\n  y: 3\n") == {"base": {"x": 1, "y": 2},
                                                                            "run": {"x": 1, "y": 3}}


@pytest.mark.parametrize("value", [".nan", ".inf", "-.inf"])
def test_launch_check_non_finite_number(tmp_path, capsys, value):
    text = TINY_CPU.replace("lr: 3.0e-3", f"lr: {value}", 1)
    assert text != TINY_CPU
    check_config(tmp_path, capsys, text, "training.lr", "finite")


def test_launch_check_alias_bomb(tmp_path, capsys):
    bomb, previous = 'a: &a ["lol","lol","lol","lol","lol","lol","lol","lol","lol"]\n', "a"
    for name in "bcdefghi":
        bomb += f"{name}: &{name} [" + ",".join([f"*{previous}"] * 9) + "]\n"
        previous = name
    check_config(tmp_path, capsys, bomb, "expands to more than")


def test_too_many_aliases():
    text = "a: &a 1\nb: [" + ",".join(["*a"] * (MAX_ALIASES + 1)) + "]\n"
    with pytest.raises(InputError, match="aliases"):
        load_yaml(text.encode())


def test_launch_check_deep_nesting(tmp_path, capsys):
    check_config(tmp_path, capsys, "a: " + "[" * 5000 + "]" * 5000 + "\n", f"deeper than {MAX_DEPTH}")


def test_launch_check_oversized_file(tmp_path, capsys):
    check_config(tmp_path, capsys, TINY_CPU + "#" * (2 << 20) + "\n", "above 1048576 bytes")


def test_launch_check_not_a_regular_file(tmp_path, capsys):
    start = time.perf_counter()
    assert launch_main(["check", "/dev/zero"]) == 2
    assert time.perf_counter() - start < 5
    one_error_line(capsys, "megatron-fcp launch", "/dev/zero", "not a regular file")
    assert launch_main(["check", str(tmp_path)]) == 2
    one_error_line(capsys, "megatron-fcp launch", "not a regular file")


def test_launch_check_missing_mock_doclens_file(tmp_path, capsys):
    text = TINY_CPU.replace("mock_doclens: magi_hist", f"mock_doclens: {tmp_path / 'nope.txt'}", 1)
    assert launch_main(["check", str(tmp_path / "run.yaml")]) == 2  # no file at all: one line
    capsys.readouterr()
    (tmp_path / "run.yaml").write_text(text)
    assert launch_main(["check", str(tmp_path / "run.yaml")]) == 2
    err = capsys.readouterr().err
    assert "Traceback" not in err
    assert any(line.startswith("data.mock_doclens: ") and "nope.txt" in line for line in err.splitlines()), err


def test_shipped_configs_still_pass(capsys):
    for config in sorted((REPO_ROOT / "configs").glob("*.yaml")):
        assert launch_main(["check", str(config)]) == 0, capsys.readouterr().err


# -- python -m megatron_fcp.cpu_trainer ------------------------------------------------------------------------------
@pytest.fixture
def demo(monkeypatch):
    """The demo's main, with spawning replaced by a failure: every check must come before it."""
    demo = pytest.importorskip("megatron_fcp.cpu_trainer.__main__")
    monkeypatch.setattr(demo, "launch", lambda *a, **k: pytest.fail("spawned processes before checking"))
    return demo.main


def demo_error(demo, capsys, argv, *words) -> str:
    start = time.perf_counter()
    with pytest.raises(SystemExit) as exit_info:
        demo(argv)
    assert exit_info.value.code == 2
    assert time.perf_counter() - start < 20
    err = capsys.readouterr().err
    errors = [line for line in err.splitlines() if ": error: " in line]
    assert len(errors) == 1 and "Traceback" not in err, err
    for word in words:
        assert word in errors[0], err
    return errors[0]


def test_demo_unknown_doclens(demo, capsys):
    demo_error(demo, capsys, ["--doclens", "linux_file"], "--doclens", "'linux_file'", "linux_files")


def test_demo_binary_doclens_file(demo, capsys, tmp_path):
    path = tmp_path / "lens.bin"
    path.write_bytes(b"\xff\xfe\x00\x01" * 100)
    demo_error(demo, capsys, ["--doclens", str(path)], "--doclens", "binary file")


def test_demo_unknown_scheduler(demo, capsys):
    demo_error(demo, capsys, ["--scheduler", "zigzag"], "--scheduler", "'zigzag'", "magi")


def test_demo_records_folder_that_cannot_be_made(demo, capsys, tmp_path):
    blocker = tmp_path / "file"
    blocker.write_text("a file, not a folder")
    demo_error(demo, capsys, ["--out", str(blocker / "records")], "--out", "records folder")


def test_demo_too_many_processes(demo, capsys):
    demo_error(demo, capsys, ["--cp", "4096", "--seq-length", "4096"], "--cp 4096", "processes")


def test_demo_sequence_too_long(demo, capsys):
    demo_error(demo, capsys, ["--seq-length", str(1 << 24)], "--seq-length", "shorter")


def test_demo_emulated_nodes_that_do_not_divide_the_processes(demo, capsys, monkeypatch):
    monkeypatch.delenv("LOCAL_WORLD_SIZE", raising=False)
    demo_error(demo, capsys, ["--cp", "4", "--ranks-per-node", "3"], "ranks_per_node 3 does not divide the 4 processes")
    monkeypatch.setenv("LOCAL_WORLD_SIZE", "3")  # read when --ranks-per-node is not given
    demo_error(demo, capsys, ["--cp", "4"], "LOCAL_WORLD_SIZE 3 does not divide the 4 processes", "ranks_per_node")


def test_demo_module_answers_before_spawning():
    """As users run it: the bad option is answered in seconds (import time), not after starting processes."""
    start = time.perf_counter()
    done = subprocess.run([sys.executable, "-m", "megatron_fcp.cpu_trainer", "--doclens", "linux_file", "--steps", "1"],
                          cwd=REPO_ROOT, capture_output=True, text=True, timeout=120)
    elapsed = time.perf_counter() - start
    assert done.returncode == 2, done.stderr
    assert "Traceback" not in done.stderr and "--doclens" in done.stderr.splitlines()[-1]
    assert elapsed < 20, f"answered after {elapsed:.1f} s"
