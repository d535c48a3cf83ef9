"""`longmem chat` as a user sees it: the terminal chat in a real pseudo-terminal (pexpect), typing lines
and reading the screen, against a real LongMem service (one local Ray cluster per module)."""

from __future__ import annotations

import os
import re
import sys
from pathlib import Path

import grpc
import pexpect
import pytest

from longmem.client import LongMemClient, LongMemError
from longmem.config import LongMemConfig
from services.app import local_service
from tiny import free_port, save_tiny

ROOT = Path(__file__).resolve().parent.parent
TIMEOUT = 60  # seconds per expect: the first turn loads the model in the replicas
PROMPT = "you> "
REPLY = "longmem> "


@pytest.fixture(scope="module")
def target(tmp_path_factory) -> str:
    root = tmp_path_factory.mktemp("chat-terminal")
    model = save_tiny(root / "tiny", "llama")
    config = LongMemConfig.from_dict({
        "backbone": {"name_or_path": str(model)}, "read": {"segment_tokens": 256},
        "memory": {"capacity_tokens": 1024, "topk_tokens": 8, "chunk_size": 4},
        "chat": {"max_new_tokens": 6},
        "serve": {"grpc_port": free_port(), "http_port": free_port(), "num_shards": 1,
                  "storage_uri": str(root / "storage")},
    }).validate()
    address = f"127.0.0.1:{config.serve.grpc_port}"
    with local_service(config):
        with LongMemClient(address) as client:
            client.wait_ready(180)
        yield address


def spawn_chat(*args: str, target: str | None = None) -> pexpect.spawn:
    """`longmem chat ARGS` in a pseudo-terminal; `target` goes in $LONGMEM_TARGET when given."""
    env = {k: v for k, v in os.environ.items() if k not in ("RAY_ADDRESS", "LONGMEM_TARGET", "LONGMEM_API_KEY")}
    if target is not None:
        env["LONGMEM_TARGET"] = target
    child = pexpect.spawn(sys.executable, ["-m", "longmem.cli", "chat", *args], cwd=str(ROOT), env=env,
                          encoding="utf-8", timeout=TIMEOUT, dimensions=(40, 200))
    child.logfile_read = sys.stdout  # shown by pytest when a test fails
    return child


def finish(child: pexpect.spawn) -> int:
    """Waits for the child to exit; its exit status."""
    child.expect(pexpect.EOF, timeout=TIMEOUT)
    child.close()
    assert child.signalstatus is None, f"killed by signal {child.signalstatus}"
    return child.exitstatus


def say(child: pexpect.spawn, message: str) -> str:
    """Types a message at the prompt; the reply the terminal streamed (up to the next prompt)."""
    child.sendline(message)
    child.expect_exact(REPLY, timeout=TIMEOUT)
    assert message in child.before  # the typed line was echoed before the reply began
    child.expect_exact("\r\n" + PROMPT, timeout=TIMEOUT)
    reply = child.before
    assert "not saved" not in reply and "error:" not in reply, reply
    return reply


def banner_tokens(child: pexpect.spawn, session: str) -> int:
    """Reads the opening banner of a session with history; the number of tokens it reports."""
    child.expect(rf"session '{re.escape(session)}': ([\d,]+) tokens of conversation in memory", timeout=TIMEOUT)
    return int(child.match.group(1).replace(",", ""))


def test_a_chat_is_typed_and_streamed_and_its_history_outlives_the_terminal(target):
    child = spawn_chat("s1", "--target", target)
    try:
        child.expect_exact("session 's1': new", timeout=TIMEOUT)
        child.expect_exact("/quit ends", timeout=TIMEOUT)  # the help line
        child.expect_exact(PROMPT, timeout=TIMEOUT)
        say(child, "hello there, remember the code 4417")
        child.sendline("/quit")
        assert finish(child) == 0
    finally:
        child.terminate(force=True)

    with LongMemClient(target) as client:
        after_first = client.get_memory("s1").tokens_appended
    assert after_first > 0  # the turn was saved on the server

    child = spawn_chat("s1", "--target", target)
    try:
        shown = banner_tokens(child, "s1")
        assert shown == after_first
        child.expect_exact(PROMPT, timeout=TIMEOUT)
        say(child, "what was the code?")
        child.sendline("/quit")
        assert finish(child) == 0
    finally:
        child.terminate(force=True)

    with LongMemClient(target) as client:
        info = client.get_memory("s1")
    assert info.tokens_appended > shown  # the second run's turn went to the same session


def test_retrieve_reset_and_forget_commands_then_eof_exits(target):
    child = spawn_chat("s2", target=target)  # the target from $LONGMEM_TARGET
    client = LongMemClient(target)
    try:
        child.expect_exact("session 's2': new", timeout=TIMEOUT)
        child.expect_exact(PROMPT, timeout=TIMEOUT)
        say(child, "The quick brown fox jumps over the lazy dog.")
        say(child, "Memory lets a model read far back.")
        assert client.get_memory("s2").tokens_appended > 0

        child.sendline("/retrieve the quick fox")
        child.expect([r"tokens \d+-\d+ score=-?[\d.]+: ", "no spans retrieved"], timeout=TIMEOUT)
        child.expect_exact("\r\n" + PROMPT, timeout=TIMEOUT)
        assert "error:" not in child.before

        child.sendline("/reset")
        child.expect(r"reset memory 's2': 0 tokens held of [\d,]+ .* 0 appended", timeout=TIMEOUT)
        child.expect_exact(PROMPT, timeout=TIMEOUT)
        assert client.get_memory("s2").tokens_appended == 0

        child.sendline("/forget")
        child.expect_exact("deleted session 's2'", timeout=TIMEOUT)
        child.expect_exact(PROMPT, timeout=TIMEOUT)
        with pytest.raises(LongMemError) as err:
            client.get_memory("s2")
        assert err.value.code == grpc.StatusCode.NOT_FOUND

        child.sendline("/nonsense")  # an unknown command shows the help and keeps the chat going
        child.expect_exact("/quit ends", timeout=TIMEOUT)
        child.expect_exact(PROMPT, timeout=TIMEOUT)

        child.sendeof()
        assert finish(child) == 0
        with pytest.raises(LongMemError) as err:  # EOF wrote nothing: the session stays deleted
            client.get_memory("s2")
        assert err.value.code == grpc.StatusCode.NOT_FOUND
    finally:
        client.close()
        child.terminate(force=True)


def test_chat_refuses_json_output():
    child = spawn_chat("s", "--json", "--target", f"127.0.0.1:{free_port()}")
    try:
        child.expect(pexpect.EOF, timeout=TIMEOUT)
        screen = child.before
        assert re.search(r"error: .*--json", screen), screen
        assert PROMPT not in screen and "session 's'" not in screen  # it never started the chat
        child.close()
        assert child.exitstatus == 2
    finally:
        child.terminate(force=True)
