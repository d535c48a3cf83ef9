"""Client subcommands of the `longmem` CLI: talk to a running LongMem server over gRPC.

Hook them into a parser with `add_client_commands(subparsers)`; each subcommand sets `func`, which
takes the parsed Namespace and returns the exit code (0, or 2 after printing "error: CODE: details"
to stderr when the server answers with an error).

Output is human-readable by default; `--json` prints the response messages in the proto3 JSON
mapping with proto field names (generate: one JSON object per streamed chunk, a line each).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from collections.abc import Callable

import grpc
from google.protobuf import json_format
from google.protobuf.message import Message

from .client import DEFAULT_PIECE_CHARS, DEFAULT_TARGET, LongMemClient, LongMemError
from .v1 import longmem_pb2 as pb

TARGET_ENV = "LONGMEM_TARGET"
API_KEY_ENV = "LONGMEM_API_KEY"
APPLICATION_ENV = "LONGMEM_APPLICATION"


# -- helpers ----------------------------------------------------------------------------------------

def _common_parser() -> argparse.ArgumentParser:
    common = argparse.ArgumentParser(add_help=False)
    group = common.add_argument_group("connection")
    group.add_argument("--target", default=None,
                       help=f"host:port of the server (default: ${TARGET_ENV} or {DEFAULT_TARGET})")
    group.add_argument("--api-key", default=None, help=f"API key sent as a bearer token (default: ${API_KEY_ENV})")
    group.add_argument("--tls-cert", default=None, metavar="PEM",
                       help="root certificate to verify the server with; enables TLS")
    group.add_argument("--application", default=None,
                       help=f"Ray Serve application to route to (default: ${APPLICATION_ENV}, else unset)")
    group.add_argument("--timeout", type=float, default=None, metavar="SECONDS", help="deadline of the call")
    common.add_argument("--json", action="store_true", help="print machine-readable JSON")
    return common


def make_client(args: argparse.Namespace) -> LongMemClient:
    """The client the connection options of `args` (and the environment) describe."""
    return LongMemClient(
        target=args.target or os.environ.get(TARGET_ENV) or DEFAULT_TARGET,
        api_key=args.api_key or os.environ.get(API_KEY_ENV) or None,
        tls_root_cert=args.tls_cert,
        timeout=args.timeout,
        application=args.application or os.environ.get(APPLICATION_ENV) or None,
    )


def to_dict(message: Message) -> dict:
    return json_format.MessageToDict(message, preserving_proto_field_name=True,
                                     always_print_fields_with_no_presence=True, unquote_int64_if_possible=True)


def _print_json(message: Message, indent: int | None = 2) -> None:
    print(json.dumps(to_dict(message), indent=indent, ensure_ascii=False))


def _show(args: argparse.Namespace, message: Message, text: str) -> None:
    if args.json:
        _print_json(message)
    else:
        print(text)


def _command(handler: Callable[[LongMemClient, argparse.Namespace], int | None]):
    """Wraps handler(client, args) into a `func(args) -> exit code` that reports LongMemError."""

    def func(args: argparse.Namespace) -> int:
        try:
            with make_client(args) as client:
                return handler(client, args) or 0
        except LongMemError as e:
            sys.stdout.flush()
            print(f"error: {e}", file=sys.stderr)
            return 2
        except OSError as e:  # an unreadable --file / --tls-cert
            print(f"error: {e}", file=sys.stderr)
            return 2

    func.__name__ = func.__qualname__ = f"cmd_{handler.__name__.lstrip('_')}"
    func.__doc__ = handler.__doc__
    return func


def _read_text(args: argparse.Namespace) -> str:
    if args.text is not None:
        return args.text
    if args.file is not None:
        with open(args.file, encoding="utf-8") as f:
            return f.read()
    return sys.stdin.read()


def format_memory(info: pb.MemoryInfo) -> str:
    shards = f"{info.num_shards} shard" + ("" if info.num_shards == 1 else "s")
    return (f"memory '{info.memory_id}': {info.tokens_held:,} tokens held of {info.capacity_tokens:,} "
            f"({shards}), {info.tokens_evicted:,} evicted, {info.pending_tokens:,} pending, "
            f"{info.tokens_appended:,} appended")


def _use_memory(args: argparse.Namespace) -> bool | None:
    return False if args.no_memory else None


# -- handlers -------------------------------------------------------------------------------------

def _memory_create(client: LongMemClient, args: argparse.Namespace) -> int:
    info = client.create_memory(memory_id=args.id, capacity_tokens=args.capacity, num_shards=args.shards)
    _show(args, info, f"created {format_memory(info)}")
    return 0


def _memory_get(client: LongMemClient, args: argparse.Namespace) -> int:
    info = client.get_memory(args.memory_id)
    _show(args, info, format_memory(info))
    return 0


def _memory_list(client: LongMemClient, args: argparse.Namespace) -> int:
    response = client.list_memories()
    if args.json:
        _print_json(response)
    elif not response.memories:
        print("no memories")
    else:
        for info in response.memories:
            print(format_memory(info))
    return 0


def _memory_delete(client: LongMemClient, args: argparse.Namespace) -> int:
    response = client.delete_memory(args.memory_id)
    if args.json:
        _print_json(response)
    elif response.deleted:
        print(f"deleted memory '{response.memory_id}'")
    else:
        print(f"memory '{response.memory_id}' did not exist")
    return 0


def _memory_reset(client: LongMemClient, args: argparse.Namespace) -> int:
    info = client.reset_memory(args.memory_id)
    _show(args, info, f"reset {format_memory(info)}")
    return 0


def _append(client: LongMemClient, args: argparse.Namespace) -> int:
    text = _read_text(args)
    response = client.append(args.memory_id, text=text, progress=not args.no_progress,
                             piece_chars=args.piece_chars)
    if args.json:
        _print_json(response)
    else:
        print(f"appended {response.tokens_appended:,} tokens ({len(text):,} characters); "
              f"{format_memory(response.memory)}")
    return 0


def _score(client: LongMemClient, args: argparse.Namespace) -> int:
    response = client.score(text=_read_text(args), memory_id=args.memory, use_memory=_use_memory(args),
                            append=args.append)
    if args.json:
        _print_json(response)
    else:
        print(f"perplexity: {response.perplexity:.4f}")
        print(f"backbone perplexity: {response.backbone_perplexity:.4f}")
        print(f"scored tokens: {response.num_scored_tokens:,}")
    return 0


def _score_choices(client: LongMemClient, args: argparse.Namespace) -> int:
    response = client.score_choices(args.prefix, args.choices, memory_id=args.memory, use_memory=_use_memory(args))
    if args.json:
        _print_json(response)
    else:
        for i, choice in enumerate(response.choices):
            mark = "*" if i == response.best_index else " "
            print(f"{mark} [{i}] logprob={choice.logprob:.4f} mean={choice.mean_logprob:.4f} "
                  f"tokens={choice.num_tokens} {choice.choice!r}")
    return 0


def _generate(client: LongMemClient, args: argparse.Namespace) -> int:
    stream = client.generate(args.prompt, memory_id=args.memory, max_new_tokens=args.max_new_tokens,
                             temperature=args.temperature, top_k=args.top_k, seed=args.seed,
                             use_memory=_use_memory(args))
    ended_with_newline = True
    with stream:
        for chunk in stream:
            if args.json:
                _print_json(chunk, indent=None)
                sys.stdout.flush()
            elif chunk.text:
                sys.stdout.write(chunk.text)
                sys.stdout.flush()
                ended_with_newline = chunk.text.endswith("\n")
    if not args.json and not ended_with_newline:
        print()
    return 0


def _retrieve(client: LongMemClient, args: argparse.Namespace) -> int:
    response = client.retrieve(args.memory_id, args.text, max_spans=args.max_spans)
    if args.json:
        _print_json(response)
    elif not response.spans:
        print("no spans retrieved")
    else:
        for span in response.spans:
            print(f"tokens {span.start_position}-{span.end_position} score={span.score:.3f} "
                  f"hits={span.hits}: {span.text!r}")
    return 0


CHAT_HELP = "/reset empties the session, /forget deletes it, /retrieve TEXT shows what memory would read, /quit ends"


def _chat_turn(client: LongMemClient, args: argparse.Namespace, message: str) -> None:
    """Streams one reply to the terminal; Ctrl-C stops it unsaved."""
    sys.stdout.write("longmem> ")
    sys.stdout.flush()
    stream = client.chat(args.session_id, message, max_new_tokens=args.max_new_tokens,
                         temperature=args.temperature, top_k=args.top_k, seed=args.seed)
    try:
        with stream:
            for piece in stream:
                sys.stdout.write(piece)
                sys.stdout.flush()
    except KeyboardInterrupt:
        print("\n[stopped: the turn is saved only if the server had finished the reply]")
        return
    print("" if stream.saved else "\n[this turn was not saved]")


def _chat_command(client: LongMemClient, args: argparse.Namespace, line: str) -> bool:
    """Runs a /command; False for /quit."""
    command, _, rest = line.partition(" ")
    if command == "/quit":
        return False
    if command == "/reset":
        print(f"reset {format_memory(client.reset_memory(args.session_id))}")
    elif command == "/forget":
        client.delete_memory(args.session_id)
        print(f"deleted session '{args.session_id}'; the next message starts it afresh")
    elif command == "/retrieve" and rest.strip():
        spans = client.retrieve(args.session_id, rest.strip()).spans
        for span in spans:
            print(f"tokens {span.start_position}-{span.end_position} score={span.score:.3f}: {span.text!r}")
        if not spans:
            print("no spans retrieved")
    else:
        print(CHAT_HELP)
    return True


def _chat(client: LongMemClient, args: argparse.Namespace) -> int:
    if args.json:
        print("error: chat is interactive; --json is not supported (use the Chat RPC)", file=sys.stderr)
        return 2
    try:
        info = client.get_memory(args.session_id)
        print(f"session '{args.session_id}': {info.tokens_appended:,} tokens of conversation in memory")
    except LongMemError as e:
        if e.code != grpc.StatusCode.NOT_FOUND:
            raise
        print(f"session '{args.session_id}': new")
    print(CHAT_HELP)
    while True:
        try:
            line = input("you> ").strip()
        except EOFError:
            print()
            return 0
        except KeyboardInterrupt:
            print()
            continue
        if not line:
            continue
        try:
            if line.startswith("/"):
                if not _chat_command(client, args, line):
                    return 0
            else:
                _chat_turn(client, args, line)
        except LongMemError as e:
            print(f"\nerror: {e}")


# -- registration ---------------------------------------------------------------------------------

def add_client_commands(subparsers) -> None:
    """Registers the client subcommands (memory, append, score, score-choices, generate, chat, retrieve)
    on `subparsers`, the result of ArgumentParser.add_subparsers()."""
    common = _common_parser()

    def add(sub, name: str, handler, help: str) -> argparse.ArgumentParser:
        parser = sub.add_parser(name, parents=[common], help=help, description=help)
        parser.set_defaults(func=_command(handler))
        return parser

    memory = subparsers.add_parser("memory", help="create, describe, list, delete or reset memories",
                                   description="Manage the memories of a LongMem server.")
    memory_sub = memory.add_subparsers(dest="memory_command", metavar="{create,get,list,delete,reset}",
                                       required=True)
    p = add(memory_sub, "create", _memory_create, "create a memory")
    p.add_argument("--id", default="", help="memory id (default: the server picks one)")
    p.add_argument("--capacity", type=int, default=0, metavar="TOKENS",
                   help="FIFO capacity in tokens (default: the server's)")
    p.add_argument("--shards", type=int, default=0, help="shards to stripe the memory over (default: the server's)")
    add(memory_sub, "get", _memory_get, "describe a memory").add_argument("memory_id", metavar="MEMORY_ID")
    add(memory_sub, "list", _memory_list, "list memories")
    for name, handler, help in (("delete", _memory_delete, "delete a memory and everything it holds"),
                                ("reset", _memory_reset, "empty a memory, keeping its id and capacity")):
        add(memory_sub, name, handler, help).add_argument("memory_id", metavar="MEMORY_ID")

    def text_source(parser: argparse.ArgumentParser, required: bool) -> None:
        group = parser.add_mutually_exclusive_group(required=required)
        group.add_argument("--text", help="the text itself")
        group.add_argument("--file", metavar="PATH", help="read the text from a UTF-8 file")

    p = add(subparsers, "append", _append, "append a text to a memory (from --text, --file or stdin)")
    p.add_argument("memory_id", metavar="MEMORY_ID")
    text_source(p, required=False)
    p.add_argument("--piece-chars", type=int, default=DEFAULT_PIECE_CHARS, metavar="N",
                   help="characters per request; pieces are cut at whitespace (default: %(default)s)")
    p.add_argument("--no-progress", action="store_true", help="send the text in one request, without a progress bar")

    def memory_options(parser: argparse.ArgumentParser) -> None:
        parser.add_argument("--memory", default="", metavar="MEMORY_ID", help="memory to read (default: none)")
        parser.add_argument("--no-memory", action="store_true", help="do not read the memory")

    p = add(subparsers, "score", _score, "perplexity of a text, with and without memory")
    memory_options(p)
    p.add_argument("--append", action="store_true", help="append the scored text to the memory afterwards")
    text_source(p, required=True)

    p = add(subparsers, "score-choices", _score_choices, "log-probability of each continuation of a prefix")
    memory_options(p)
    p.add_argument("--prefix", required=True)
    p.add_argument("--choice", dest="choices", action="append", required=True,
                   help="a candidate continuation; repeat for each")

    p = add(subparsers, "generate", _generate, "continue a prompt, streaming the text as it is produced")
    memory_options(p)
    p.add_argument("--prompt", required=True)
    p.add_argument("--max-new-tokens", type=int, default=0, metavar="N", help="default: the server's")
    p.add_argument("--temperature", type=float, default=0.0, help="0: greedy (default)")
    p.add_argument("--top-k", type=int, default=0, metavar="K", help="0: no top-k filtering (default)")
    p.add_argument("--seed", type=int, default=None, help="sampling seed (default: the server picks)")

    p = add(subparsers, "chat", _chat, "an interactive chat whose memory is a session on the server")
    p.add_argument("session_id", metavar="SESSION", help="the conversation's memory id (created on first use)")
    p.add_argument("--max-new-tokens", type=int, default=0, metavar="N", help="reply tokens (default: the server's)")
    p.add_argument("--temperature", type=float, default=0.0, help="0: greedy (default)")
    p.add_argument("--top-k", type=int, default=0, metavar="K", help="0: no top-k filtering (default)")
    p.add_argument("--seed", type=int, default=None, help="sampling seed (default: the server's)")

    p = add(subparsers, "retrieve", _retrieve, "the memory spans a text retrieves")
    p.add_argument("memory_id", metavar="MEMORY_ID")
    p.add_argument("--text", required=True)
    p.add_argument("--max-spans", type=int, default=0, metavar="N", help="default: the server's")


__all__ = ["add_client_commands", "format_memory", "make_client", "to_dict"]
