"""User errors of `generate`, `chat` and `serve`: one `error:` line on stderr, exit code 2, never a traceback, and
as far as possible before any model is loaded."""

import socket
import subprocess
import sys
import time

import pytest

from maskspec.cli import main


def run_cli(capsys, *argv: str) -> tuple[int, str, str]:
    with pytest.raises(SystemExit) as info:
        main(list(argv))
    out, err = capsys.readouterr()
    return info.value.code, out, err


def assert_one_error_line(code: int, err: str, *needles: str) -> None:
    lines = [line for line in err.splitlines() if line.strip()]
    assert code == 2, err
    assert len(lines) == 1 and lines[0].startswith("error: "), err
    assert "Traceback" not in err
    for needle in needles:
        assert needle in lines[0], (needle, lines[0])


CASES = [
    (["generate", "--k", "0", "hi"], ["--k", "0"]),
    (["generate", "--k", "-1", "hi"], ["--k"]),
    (["generate", "--k", "99", "hi"], ["1..8", "99"]),
    (["generate", "--k", "abc", "hi"], ["--k"]),
    (["generate", "--top-p", "0", "-t", "1", "hi"], ["top_p"]),
    (["generate", "--top-p", "2", "-t", "1", "hi"], ["top_p"]),
    (["generate", "--top-p", "nan", "-t", "1", "hi"], ["top_p"]),
    (["generate", "--top-k", "-3", "-t", "1", "hi"], ["top_k"]),
    (["generate", "--seed", str(2**64), "-t", "1", "hi"], ["seed"]),
    (["generate", "--seed", str(-2**63 - 1), "-t", "1", "hi"], ["seed"]),
    (["generate", "-t", "inf", "hi"], ["temperature"]),
    (["generate", "-t", "nan", "hi"], ["temperature"]),
    (["generate", "--temperature", "-1", "hi"], ["temperature"]),
    (["generate", "--device", "tpu", "hi"], ["tpu"]),
    (["generate", "--device", "cuda:7", "hi"], ["cuda"]),
    (["generate", "--dtype", "int3", "hi"], ["int3"]),
    (["generate", "--mode", "fast", "hi"], ["--mode"]),
    (["generate", "--max-new-tokens", "-4", "hi"], ["--max-new-tokens"]),
    (["generate", "--bogus", "hi"], ["--bogus"]),
    (["generate"], ["prompt"]),
    (["nonsense"], ["nonsense"]),
    (["generate", "--tree", "-1", "hi"], ["--tree"]),
    (["generate", "--mode", "linear", "--tree", "2", "hi"], ["--tree", "quadratic"]),
    (["serve", "--tree", "4", "--mode", "ar", "--port", "0"], ["--tree", "quadratic"]),
    (["chat", "--k", "99"], ["1..8"]),
    (["chat", "-t", "nan"], ["temperature"]),
    (["chat", "--device", "tpu"], ["tpu"]),
    (["serve", "--k", "99", "--port", "0"], ["1..8"]),
    (["serve", "--port", "70000"], ["--port"]),
    (["serve", "--max-batch", "0"], ["--max-batch"]),
    (["serve", "--device", "cuda", "--port", "0"], ["cuda"]),
    (["serve", "--host", "no-such-host.invalid", "--port", "0"], ["no-such-host.invalid"]),
    (["serve", "--log-level", "loud", "--port", "0"], ["--log-level", "warning"]),
    (["serve", "--api-key", " ", "--port", "0"], ["--api-key", "blank"]),
]


@pytest.mark.parametrize("argv,needles", CASES, ids=[" ".join(c[0]) for c in CASES])
def test_user_errors_are_one_line(capsys, argv, needles):
    started = time.monotonic()
    code, out, err = run_cli(capsys, *argv)
    assert_one_error_line(code, err, *needles)
    assert time.monotonic() - started < 20  # refused before a model is loaded or a network is tried


def test_serve_on_a_busy_port(capsys):
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen(1)
        port = busy.getsockname()[1]
        code, _, err = run_cli(capsys, "serve", "--port", str(port))
    assert_one_error_line(code, err, str(port), "in use")


@pytest.mark.slow
def test_chat_with_non_utf8_input_from_a_pipe():
    """Piped input that is not UTF-8 ends the chat with one error line (on a terminal the line is skipped)."""
    proc = subprocess.run([sys.executable, "-m", "maskspec.cli", "chat", "--max-new-tokens", "4"],
                          input=b"\xff\xfe not text\n", capture_output=True, timeout=300)
    err = proc.stderr.decode()
    assert_one_error_line(proc.returncode, err, "UTF-8")


@pytest.mark.slow
def test_chat_keeps_going_after_a_turn_that_does_not_fit(tmp_path):
    """A message longer than the context is refused with one line; the next turn is answered."""
    long_line = "word " * 9000
    proc = subprocess.run([sys.executable, "-m", "maskspec.cli", "chat", "--max-new-tokens", "3"],
                          input=f"{long_line}\nHello\n/exit\n".encode(), capture_output=True, timeout=300)
    err, out = proc.stderr.decode(), proc.stdout.decode()
    assert proc.returncode == 0, err
    assert "Traceback" not in err
    assert sum(line.startswith("error: ") for line in err.splitlines()) == 1
    assert "context" in err
    assert out.count("assistant> ") == 2 and "tokens/pass" in out
