"""Python client of the public LongMem gRPC API (protos/longmem/v1/longmem.proto).

    from longmem.client import LongMemClient

    with LongMemClient("localhost:9000", api_key="...") as client:
        client.wait_ready(60)  # the Serve gRPC port opens before the application is ready
        info = client.create_memory("notes")
        client.append("notes", text=open("book.txt").read(), progress=True)
        print(client.score(text="...", memory_id="notes").perplexity)
        for chunk in client.generate("Once upon a time", memory_id="notes", max_new_tokens=32):
            print(chunk.text, end="", flush=True)
        for piece in client.chat("my-session", "Remember: my locker code is 4417."):
            print(piece, end="", flush=True)

Every method takes keyword arguments named after the request's proto fields and returns the
response message. Failed calls raise `LongMemError`, which carries the gRPC status code and details
and keeps the original `grpc.RpcError` as its `__cause__` (and `.rpc_error`).
"""

from __future__ import annotations

import os
import re
import time
import uuid
from collections import Counter
from collections.abc import Callable, Sequence
from typing import Any, TypeVar

import grpc

from .v1 import longmem_pb2 as pb
from .v1 import longmem_pb2_grpc as pb_grpc

DEFAULT_TARGET = "localhost:9000"
# Characters per Append request when `append(..., progress=True)` splits a long text. Small enough
# that a piece stays far below gRPC's default 4 MiB message limit (4 bytes a character at worst),
# large enough that the per-request overhead is negligible next to encoding the piece.
DEFAULT_PIECE_CHARS = 100_000
# A call that is safe to repeat (an append, with its request id; a read) and answers UNAVAILABLE (a
# service restarting) is sent again for up to RETRY_S seconds (the client's `retry_s`), waiting
# FIRST_BACKOFF_S, then twice as long each time (at most MAX_BACKOFF_S).
RETRY_S = 120.0
FIRST_BACKOFF_S = 0.5
MAX_BACKOFF_S = 8.0

# Status codes after which wait_ready stops waiting: the application answered and refuses the
# caller, which more waiting will not change.
_NOT_RETRIED = frozenset({grpc.StatusCode.UNAUTHENTICATED, grpc.StatusCode.PERMISSION_DENIED})

_CHANNEL_OPTIONS = [
    # Scores of long texts return several numbers per token; the server enforces its own limits.
    ("grpc.max_receive_message_length", -1),
    ("grpc.max_send_message_length", -1),
    # gRPC's reconnect backoff grows to 120 s by default; cap it so that a client started before
    # its server (or wait_ready) notices the server within seconds.
    ("grpc.max_reconnect_backoff_ms", 5_000),
]

# A cut point: a whitespace character followed by a non-whitespace one. Cutting there puts the
# whitespace at the start of the next piece, where BPE tokenizers attach it to the following word
# (" word" is one token), so each piece tokenizes as it would inside the unsplit text.
_CUT = re.compile(r"\s(?=\S)")

T = TypeVar("T")


class LongMemError(Exception):
    """A failed LongMem call: the gRPC status `code` (grpc.StatusCode) and its `details`."""

    def __init__(self, code: grpc.StatusCode, details: str, rpc_error: grpc.RpcError | None = None):
        self.code = code
        self.details = details or ""
        self.rpc_error = rpc_error
        super().__init__(str(self))

    def __str__(self) -> str:
        name = getattr(self.code, "name", str(self.code))
        return f"{name}: {self.details}" if self.details else name

    def __repr__(self) -> str:
        return f"LongMemError({self})"

    @classmethod
    def from_rpc_error(cls, error: grpc.RpcError) -> "LongMemError":
        code = error.code() if hasattr(error, "code") else grpc.StatusCode.UNKNOWN
        details = error.details() if hasattr(error, "details") else str(error)
        return cls(code or grpc.StatusCode.UNKNOWN, details or "", error)


class Backoff:
    """The waits between resends of one call, for up to `retry_s` seconds in all: FIRST_BACKOFF_S, then
    twice as long each time (at most MAX_BACKOFF_S)."""

    def __init__(self, retry_s: float):
        self.deadline, self.delay = time.monotonic() + retry_s, FIRST_BACKOFF_S

    def allows(self) -> bool:
        """Whether the next wait still ends before the deadline."""
        return time.monotonic() + self.delay <= self.deadline

    def wait(self) -> None:
        time.sleep(self.delay)
        self.delay = min(2 * self.delay, MAX_BACKOFF_S)


def resend(call: Callable[[], T], retry_s: float, retryable: Callable[[LongMemError], bool],
           on_retry: Callable[[LongMemError], None] = lambda error: None) -> T:
    """Returns `call()`, calling it again while it raises a LongMemError that `retryable` accepts, for up
    to `retry_s` seconds (`Backoff`). `on_retry` hears each error that was resent; the last error is raised."""
    backoff = Backoff(retry_s)
    while True:
        try:
            return call()
        except LongMemError as error:
            if not retryable(error) or not backoff.allows():
                raise
            on_retry(error)
        backoff.wait()


def split_text(text: str, piece_chars: int = DEFAULT_PIECE_CHARS) -> list[str]:
    """Splits `text` into consecutive pieces of at most about `piece_chars` characters whose
    concatenation is exactly `text`.

    Pieces are cut only at whitespace, just before the last whitespace character that precedes a
    word, so no word is broken and the space before a word stays with it: tokenizing the pieces one
    by one then gives (nearly always exactly) the tokens of the unsplit text, which a cut inside a
    word or between a space and its word would not. A piece is longer than `piece_chars` only when
    the text has no such whitespace within it; after `2 * piece_chars` characters without one (e.g.
    text written without spaces), the piece is cut there anyway.
    """
    if piece_chars <= 0:
        raise ValueError("piece_chars must be positive")
    pieces = []
    start, n = 0, len(text)
    while n - start > piece_chars:
        target = start + piece_chars
        cut = None
        # The last cut point in (start, target]; endpos lets the lookahead see text[target + 1].
        for match in _CUT.finditer(text, start + 1, target + 2):
            cut = match.start()
        if cut is None:  # none up to the target: the first one after it, within reason
            limit = start + 2 * piece_chars
            match = _CUT.search(text, target + 1, limit + 2)
            cut = match.start() if match else limit
        if cut >= n:
            break
        pieces.append(text[start:cut])
        start = cut
    if start < n:
        pieces.append(text[start:])
    return pieces


def _exactly_one(text: str | None, token_ids: Sequence[int] | None) -> None:
    if (text is None) == (token_ids is None):
        raise ValueError("pass exactly one of text and token_ids")


class GenerateStream:
    """The responses of one Generate call, as they arrive; iterate it, or cancel() it early.

    Raises LongMemError from iteration when the call fails. Usable as a context manager, which
    cancels the call if it is left before the stream ended.
    """

    def __init__(self, call):
        self._call = call

    def __iter__(self) -> "GenerateStream":
        return self

    def __next__(self) -> pb.GenerateResponse:
        try:
            return next(self._call)
        except grpc.RpcError as e:
            raise LongMemError.from_rpc_error(e) from e

    def cancel(self) -> None:
        self._call.cancel()

    close = cancel

    def __enter__(self) -> "GenerateStream":
        return self

    def __exit__(self, *exc: Any) -> None:
        self.cancel()


class ChatStream:
    """One Chat turn as it arrives: iterate it for the reply's text pieces (str). A stream that answers
    UNAVAILABLE is resent with the same turn id (for up to the client's retry_s): the server saves a turn
    once, and the resent reply (the saved one, or the same greedy or seeded answer again) continues
    where the text already seen ends. After the last piece: `saved`, `finish_reason`, `memory` (the
    session's MemoryInfo), `turn_token_ids` (what the turn stored), `replayed`; from the first:
    `turn_id`, `history_tokens`, `reread`.
    cancel() (or leaving its `with` block early) ends the turn unsaved."""

    def __init__(self, start: Callable[[], Any], retry_s: float, on_retry: Callable[[LongMemError], None]):
        self._start, self._retry_s, self._on_retry = start, retry_s, on_retry
        self._call = None
        self._pieces = self._run()
        self.turn_id, self.history_tokens, self.reread = "", 0, []
        self.saved, self.replayed, self.finish_reason, self.memory = False, False, "", None
        self.turn_token_ids: list[int] = []

    def __iter__(self) -> "ChatStream":
        return self

    def __next__(self) -> str:
        return next(self._pieces)

    def _responses(self):
        """One Chat call's responses, its failure as LongMemError."""
        self._call = self._start()
        try:
            yield from self._call
        except grpc.RpcError as e:
            raise LongMemError.from_rpc_error(e) from e

    def _run(self):
        seen = ""  # the reply's text passed on so far, over every resend
        backoff = Backoff(self._retry_s)
        while True:
            text = ""  # this call's reply so far
            try:
                for response in self._responses():
                    if response.turn_id:
                        self.turn_id, self.history_tokens = response.turn_id, response.history_tokens
                        self.reread = list(response.reread)
                    self.replayed = response.replayed
                    text += response.text
                    n = min(len(text), len(seen))
                    if text[:n] != seen[:n] or (response.finish_reason and text != seen and len(text) < len(seen)):
                        self._call.cancel()
                        raise LongMemError(grpc.StatusCode.ABORTED, "the resent turn answered differently from "
                                           "the reply already shown; resend it with its turn id to see what was saved")
                    if len(text) > len(seen):
                        piece, seen = text[len(seen):], text
                        yield piece
                    if response.finish_reason:
                        self.saved, self.finish_reason = response.saved, response.finish_reason
                        self.memory, self.turn_token_ids = response.memory, list(response.turn_token_ids)
                return
            except LongMemError as error:
                if error.code != grpc.StatusCode.UNAVAILABLE or not backoff.allows():
                    raise
                self._on_retry(error)
            backoff.wait()

    def text(self) -> str:
        """The rest of the reply, joined."""
        return "".join(self)

    def cancel(self) -> None:
        if self._call is not None:
            self._call.cancel()
        self._pieces.close()

    close = cancel

    def __enter__(self) -> "ChatStream":
        return self

    def __exit__(self, *exc: Any) -> None:
        self.cancel()


class LongMemClient:
    """A connection to a LongMem server.

    target: host:port of the server (the Ray Serve gRPC proxy).
    api_key: sent as `authorization: Bearer <api_key>` metadata on every call.
    tls_root_cert: PEM root certificate(s), as a path or bytes, to verify the server with over TLS;
        True for TLS with the system's roots; None for a plaintext channel.
    timeout: deadline in seconds of every call (for generate: of the whole stream); None: none.
    application: sent as `application: <name>` metadata, which Ray Serve routes on when it serves
        several applications.
    retry_s: how long a call that is safe to repeat (append, get_memory, list_memories, score
        without append, score_choices, retrieve, chat with its turn id) is resent while it answers
        UNAVAILABLE; 0: never.
        create/delete/reset_memory, score with append=True and generate are never resent.

    `retried` counts the answers that were resent, by status code name.
    """

    def __init__(self, target: str = DEFAULT_TARGET, api_key: str | None = None,
                 tls_root_cert: str | os.PathLike | bytes | bool | None = None,
                 timeout: float | None = None, application: str | None = None, retry_s: float = RETRY_S):
        self.target = target
        self.timeout = timeout
        self.retry_s = retry_s
        self.retried: Counter[str] = Counter()
        metadata = []
        if api_key:
            metadata.append(("authorization", f"Bearer {api_key}"))
        if application:
            metadata.append(("application", application))
        self._metadata = tuple(metadata)
        if tls_root_cert is None or tls_root_cert is False:
            self._channel = grpc.insecure_channel(target, options=_CHANNEL_OPTIONS)
        else:
            if tls_root_cert is True:
                root = None
            elif isinstance(tls_root_cert, (bytes, bytearray)):
                root = bytes(tls_root_cert)
            else:
                with open(tls_root_cert, "rb") as f:
                    root = f.read()
            credentials = grpc.ssl_channel_credentials(root_certificates=root)
            self._channel = grpc.secure_channel(target, credentials, options=_CHANNEL_OPTIONS)
        self._stub = pb_grpc.LongMemStub(self._channel)

    # -- lifecycle -------------------------------------------------------------------------------

    def close(self) -> None:
        self._channel.close()

    def __enter__(self) -> "LongMemClient":
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()

    def _call(self, method: str, request, timeout: float | None = None, retry: bool = False):
        """One call; with retry, resent while it answers UNAVAILABLE (for up to retry_s, with backoff)."""
        def send():
            try:
                return getattr(self._stub, method)(
                    request, timeout=self.timeout if timeout is None else timeout, metadata=self._metadata)
            except grpc.RpcError as e:
                raise LongMemError.from_rpc_error(e) from e
        return resend(send, self.retry_s if retry else 0.0, lambda e: e.code == grpc.StatusCode.UNAVAILABLE,
                      lambda e: self.retried.update([e.code.name]))

    def wait_ready(self, timeout_s: float = 60.0, interval_s: float = 0.25) -> None:
        """Polls ListMemories until it succeeds; raises TimeoutError after `timeout_s` seconds.

        The Serve gRPC port accepts connections before the application is deployed (calls answer
        NOT_FOUND or UNAVAILABLE meanwhile), so a real call is the only reliable readiness check.
        Raises LongMemError at once on UNAUTHENTICATED / PERMISSION_DENIED: the server is up and
        refuses these credentials.
        """
        deadline = time.monotonic() + timeout_s
        last: LongMemError | None = None
        while True:
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                raise TimeoutError(f"LongMem at {self.target} not ready after {timeout_s:g} s"
                                   + (f" (last error: {last})" if last else ""))
            try:
                self._call("ListMemories", pb.ListMemoriesRequest(), timeout=min(remaining, 5.0))
                return
            except LongMemError as e:
                if e.code in _NOT_RETRIED:
                    raise
                last = e
            time.sleep(max(0.0, min(interval_s, deadline - time.monotonic())))

    # -- memories --------------------------------------------------------------------------------

    def create_memory(self, memory_id: str = "", capacity_tokens: int = 0, num_shards: int = 0) -> pb.MemoryInfo:
        """Creates a memory; zero values let the server choose (an id, its default capacity...)."""
        return self._call("CreateMemory", pb.CreateMemoryRequest(
            memory_id=memory_id, capacity_tokens=capacity_tokens, num_shards=num_shards))

    def get_memory(self, memory_id: str) -> pb.MemoryInfo:
        return self._call("GetMemory", pb.GetMemoryRequest(memory_id=memory_id), retry=True)

    def list_memories(self) -> pb.ListMemoriesResponse:
        return self._call("ListMemories", pb.ListMemoriesRequest(), retry=True)

    def delete_memory(self, memory_id: str) -> pb.DeleteMemoryResponse:
        return self._call("DeleteMemory", pb.DeleteMemoryRequest(memory_id=memory_id))

    def reset_memory(self, memory_id: str) -> pb.MemoryInfo:
        return self._call("ResetMemory", pb.ResetMemoryRequest(memory_id=memory_id))

    def append(self, memory_id: str, text: str | None = None, token_ids: Sequence[int] | None = None,
               progress: bool = False, piece_chars: int = DEFAULT_PIECE_CHARS,
               request_id: str | None = None) -> pb.AppendResponse:
        """Appends text or token ids (exactly one) to a memory.

        With progress=True, a text is sent in pieces of about `piece_chars` characters, cut only at
        whitespace (see `split_text`: the pieces then tokenize as the unsplit text does), one
        request after another under a progress bar over characters. The result is the last
        response (the memory's final state) with tokens_appended summed over all pieces. Unlike a
        single request, this is not atomic: if a piece fails, the pieces before it stay appended.
        Without progress the text goes in one request.

        Every request carries a request id (`request_id`, else a random one; each piece its own) and is
        sent again while it answers UNAVAILABLE (see `retry_s`): the server applies an id at most once,
        so a retried append never doubles the text.
        """
        _exactly_one(text, token_ids)
        request_id = request_id or uuid.uuid4().hex
        if token_ids is not None:
            return self._call("Append", pb.AppendRequest(memory_id=memory_id, token_ids=token_ids,
                                                         request_id=request_id), retry=True)
        if not progress:
            return self._call("Append", pb.AppendRequest(memory_id=memory_id, text=text, request_id=request_id),
                              retry=True)
        from tqdm.auto import tqdm

        result = pb.AppendResponse()
        total = 0
        with tqdm(total=len(text), unit="char", unit_scale=True, desc=f"append {memory_id}") as bar:
            for i, piece in enumerate(split_text(text, piece_chars) or [text]):
                response = self._call("Append", pb.AppendRequest(memory_id=memory_id, text=piece,
                                                                  request_id=f"{request_id}-{i}"), retry=True)
                total += response.tokens_appended
                result = response
                bar.update(len(piece))
                bar.set_postfix(tokens=total, refresh=False)
        result.tokens_appended = total
        return result

    # -- reading ---------------------------------------------------------------------------------

    def score(self, text: str | None = None, token_ids: Sequence[int] | None = None, memory_id: str = "",
              use_memory: bool | None = None, append: bool = False,
              backbone_logprobs: bool = True) -> pb.ScoreResponse:
        """Per-token log-probabilities and perplexity of a text (or token ids), optionally reading
        (use_memory, default: when memory_id is set) and then appending to (append) a memory;
        backbone_logprobs=False skips the backbone-alone baseline."""
        _exactly_one(text, token_ids)
        request = pb.ScoreRequest(memory_id=memory_id, append=append, skip_backbone_logprobs=not backbone_logprobs)
        if text is not None:
            request.text = text
        else:
            request.token_ids.extend(token_ids)
        if use_memory is not None:
            request.use_memory = use_memory
        return self._call("Score", request, retry=not append)

    def score_choices(self, prefix: str, choices: Sequence[str], memory_id: str = "",
                      use_memory: bool | None = None) -> pb.ScoreChoicesResponse:
        """Log-probability of each candidate continuation of `prefix`, in the order given."""
        if isinstance(choices, str):
            raise TypeError("choices must be a sequence of strings, not one string")
        request = pb.ScoreChoicesRequest(memory_id=memory_id, prefix=prefix, choices=list(choices))
        if use_memory is not None:
            request.use_memory = use_memory
        return self._call("ScoreChoices", request, retry=True)

    def generate(self, prompt: str, memory_id: str = "", max_new_tokens: int = 0, temperature: float = 0.0,
                 top_k: int = 0, seed: int | None = None, use_memory: bool | None = None,
                 reread: bool | None = None) -> GenerateStream:
        """Starts continuing `prompt`; returns an iterator of GenerateResponse chunks (the text added
        since the previous chunk; the first one also lists the memory spans re-read before the prompt,
        the last one has finish_reason). max_new_tokens=0: the server's default; temperature=0: greedy;
        seed/use_memory/reread None: left unset for the server."""
        request = pb.GenerateRequest(memory_id=memory_id, prompt=prompt, max_new_tokens=max_new_tokens,
                                     temperature=temperature, top_k=top_k)
        if seed is not None:
            request.seed = seed
        if use_memory is not None:
            request.use_memory = use_memory
        if reread is not None:
            request.reread = reread
        try:
            call = self._stub.Generate(request, timeout=self.timeout, metadata=self._metadata)
        except grpc.RpcError as e:
            raise LongMemError.from_rpc_error(e) from e
        return GenerateStream(call)

    def generate_text(self, prompt: str, memory_id: str = "", max_new_tokens: int = 0, temperature: float = 0.0,
                      top_k: int = 0, seed: int | None = None, use_memory: bool | None = None,
                      reread: bool | None = None) -> str:
        """generate(), joined into the whole new text."""
        with self.generate(prompt, memory_id=memory_id, max_new_tokens=max_new_tokens, temperature=temperature,
                           top_k=top_k, seed=seed, use_memory=use_memory, reread=reread) as stream:
            return "".join(chunk.text for chunk in stream)

    def chat(self, session_id: str, message: str, turn_id: str | None = None, max_new_tokens: int = 0,
             temperature: float = 0.0, top_k: int = 0, seed: int | None = None,
             reread: bool | None = None) -> ChatStream:
        """One turn of the conversation in memory `session_id` (created on first use): an iterator of the
        reply's text pieces (`ChatStream`). Once it is exhausted the turn and the reply are in the session's
        memory (`stream.saved`). turn_id: a random one by default; the stream is resent with it while it
        answers UNAVAILABLE (see `retry_s`), and the server saves the turn once."""
        request = pb.ChatRequest(session_id=session_id, message=message, turn_id=turn_id or uuid.uuid4().hex,
                                 max_new_tokens=max_new_tokens, temperature=temperature, top_k=top_k)
        if seed is not None:
            request.seed = seed
        if reread is not None:
            request.reread = reread
        start = lambda: self._stub.Chat(request, timeout=self.timeout, metadata=self._metadata)
        return ChatStream(start, self.retry_s, lambda e: self.retried.update([e.code.name]))

    def retrieve(self, memory_id: str, text: str, max_spans: int = 0) -> pb.RetrieveResponse:
        """The memory spans `text` retrieves, highest score first (max_spans=0: server default)."""
        return self._call("Retrieve", pb.RetrieveRequest(memory_id=memory_id, text=text, max_spans=max_spans),
                          retry=True)


__all__ = ["ChatStream", "DEFAULT_PIECE_CHARS", "DEFAULT_TARGET", "GenerateStream", "LongMemClient", "LongMemError", "split_text"]
