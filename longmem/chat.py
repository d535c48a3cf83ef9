"""Conversations that remember: a chat session is a memory whose turns go into it by themselves.

A turn (`Conversation.turn`): the user's message is written as the backbone's chat template writes a
user turn (or as plain `User:` / `Assistant:` lines, chat.format), after the system message and the most
recent turns that fit in the window; the reader answers it over the session's memory with everything it
has (the memory read, re-reading the memory's best spans); once the reply is complete, the turn and the
reply are appended to the memory, once per turn id. The recent turns come back from the memory itself
(the newest tokens it keeps verbatim, memory.recent_tokens), so no conversation state lives beside the
memory: any replica serves any session, and a restarted server continues where it was.

The window of one turn, W = read.segment_tokens tokens:

    [re-read spans] [system] [recent turns ...] [user open] message [user close] reply [reply close]

Re-read spans come first (`LongMemRunner.reread`); the reply gets max_new_tokens; the recent turns get
what is left, whole turns only, newest kept. A turn therefore always fits one segment, so its append
is one bank append: atomic, and applied at most once for its request id (TURN_REQUEST + turn id).
"""

from __future__ import annotations

import uuid
from collections.abc import Iterator
from dataclasses import dataclass, field

import numpy as np

from .config import ChatConfig
from .memory import NO_POSITION, MemoryExists, MemoryNotFound, MemoryStats, RecentTokens
from .model import LongMemRunner
from .roles import Span

TURN_REQUEST = "chat:"  # a turn's append has request id TURN_REQUEST + its turn id (Append refuses the prefix)
# Stand-ins for message texts, to find where a template puts them (no template writes these itself).
_SLOTS = ("LONGMEMUSERONE", "LONGMEMREPLYONE", "LONGMEMUSERTWO", "LONGMEMREPLYTWO")


class TurnTooLong(ValueError):
    """A message that, with the reply it asks for, does not fit in one window."""


class TurnForgotten(ValueError):
    """A turn id saved before whose turn is older than the memory's recent tokens: its reply cannot be sent again."""


@dataclass
class ChatFormat:
    """How a conversation's turns are written, in token ids."""

    system: list[int]  # opens every prompt; never stored
    user_open: list[int]  # starts a turn (and marks where one starts)
    user_close: list[int]  # ends the message and opens the reply
    reply_close: list[int]  # ends the reply and the turn
    stops: list[str]  # texts that end a reply when the model writes them

    def prompt(self, history: list[int], message: list[int]) -> list[int]:
        return self.system + history + self.user_open + message + self.user_close

    def turn(self, message: list[int], reply: list[int]) -> list[int]:
        """What a turn stores: its message and its reply."""
        return self.user_open + message + self.user_close + reply + self.reply_close

    def turn_starts(self, ids: np.ndarray) -> list[int]:
        """Where turns start in a run of stored tokens (the user_open marker), ascending."""
        n = len(self.user_open)
        if len(ids) < n:
            return []
        windows = np.lib.stride_tricks.sliding_window_view(np.asarray(ids), n)
        return np.flatnonzero((windows == np.asarray(self.user_open)).all(1)).tolist()

    def history(self, recent: np.ndarray, budget: int) -> tuple[list[int], int]:
        """The newest whole turns of `recent` (a memory's newest tokens) within `budget` tokens, and the
        offset in `recent` they start at (len(recent) when none fits)."""
        fits = [s for s in self.turn_starts(recent) if len(recent) - s <= budget]
        start = fits[0] if fits else len(recent)
        return [int(t) for t in recent[start:]], start

    def stored_turn(self, stored: np.ndarray, message: list[int]) -> tuple[list[int], list[int]] | None:
        """(the reply, the whole turn) of the turn with this message that `stored` starts with (a memory's
        tokens from where the turn's append began); None when `stored` does not start with it."""
        ids = [int(t) for t in stored]
        opening = self.user_open + message + self.user_close
        if ids[:len(opening)] != opening:
            return None
        later = [s for s in self.turn_starts(np.asarray(ids)) if s >= len(opening)]
        end = later[0] if later else len(ids)
        close = end - len(self.reply_close) if ids[end - len(self.reply_close):end] == self.reply_close else end
        return ids[len(opening):max(close, len(opening))], ids[:end]


def encode_text(tokenizer, text: str) -> list[int]:
    """A user's or the model's text as token ids, special-token names spelled out as plain text: what a
    user types can never open or close a turn."""
    return tokenizer(text, add_special_tokens=False, split_special_tokens=True)["input_ids"]


def template_parts(tokenizer, system_prompt: str | None) -> tuple[str, str, str, str]:
    """(system, user open, user close, reply close) as the tokenizer's chat template writes them, read
    off a rendered two-turn conversation. ValueError for a template that does not write a conversation
    turn after turn (the prompt for a turn is not the conversation so far plus that turn)."""
    system = [] if system_prompt is None else [{"role": "system", "content": system_prompt}]
    u1, a1, u2, a2 = _SLOTS
    turns = [{"role": "user", "content": u1}, {"role": "assistant", "content": a1},
             {"role": "user", "content": u2}, {"role": "assistant", "content": a2}]
    full = tokenizer.apply_chat_template(system + turns, tokenize=False)
    if not all(s in full for s in _SLOTS):
        raise ValueError("the tokenizer's chat template drops or rewrites message texts; set chat.format: plain")
    at = [full.index(s) for s in _SLOTS]
    head, user_close = full[:at[0]], full[at[0] + len(u1):at[1]]
    between, reply_close = full[at[1] + len(a1):at[2]], full[at[3] + len(a2):]
    if not between.startswith(reply_close) or not head.endswith(between[len(reply_close):]):
        raise ValueError("the tokenizer's chat template writes turns differently from one turn to the next; "
                         "set chat.format: plain")
    user_open = between[len(reply_close):]
    parts = head[:len(head) - len(user_open)], user_open, user_close, reply_close
    prompt = tokenizer.apply_chat_template(system + turns[:1], tokenize=False, add_generation_prompt=True)
    if prompt != parts[0] + user_open + u1 + user_close:
        raise ValueError("the tokenizer's chat template opens a reply differently from how it stores one; "
                         "set chat.format: plain")
    return parts


def chat_format(tokenizer, config: ChatConfig) -> ChatFormat:
    """The turn format chat.format asks for, over this tokenizer."""
    has_template = bool(getattr(tokenizer, "chat_template", None))
    if config.format == "template" and not has_template:
        raise ValueError("chat.format is template but the backbone's tokenizer has no chat template")
    parts = None
    if config.format != "plain" and has_template:
        try:
            parts = template_parts(tokenizer, config.system_prompt)
        except ValueError:
            if config.format == "template":
                raise
    if parts is not None:  # "auto" with a template that cannot be written turn by turn writes plain turns
        system, user_open, user_close, reply_close = parts
    else:
        system = f"{config.system_prompt}\n" if config.system_prompt else ""
        user_open, user_close, reply_close = config.plain_user, f"\n{config.plain_assistant}", "\n"
    encode = lambda text: tokenizer.encode(text, add_special_tokens=False)
    stops = [s for s in dict.fromkeys((reply_close.strip(), user_open.strip())) if s]
    return ChatFormat(encode(system), encode(user_open), encode(user_close), encode(reply_close), stops)


def first_stop(text: str, stops: list[str]) -> int | None:
    """Where the first stop text begins in text; None when none occurs."""
    found = [i for i in (text.find(s) for s in stops) if i >= 0]
    return min(found) if found else None


def held_back(text: str, stops: list[str]) -> tuple[int, bool]:
    """How much of a reply's text may be shown: (the length before the first stop text, True) once one
    occurs; else (the length without the longest tail that could begin a stop text, or that is an
    incomplete character, False)."""
    stop = first_stop(text, stops)
    if stop is not None:
        return stop, True
    hold = max((k for s in stops for k in range(1, len(s)) if text.endswith(s[:k])), default=0)
    return min(len(text) - hold, len(text.rstrip("\ufffd"))), False


@dataclass
class ChatTurn:
    """One turn as it happens: what it read, then its reply piece by piece (`pieces`), then whether it was
    saved. `replayed`: this turn id was saved by an earlier call; the pieces are that call's reply."""

    turn_id: str
    history_tokens: int  # tokens of recent turns in the window
    reread: list[Span]
    replayed: bool
    pieces: Iterator[tuple[str, list[int]]] = field(repr=False, default_factory=lambda: iter(()))
    finish_reason: str = ""  # once pieces are exhausted: "eos" (the model ended the reply), "length"
    saved: bool = False  # once pieces are exhausted: the turn and its reply are in the memory
    stats: MemoryStats | None = None  # the session's memory after the turn
    stored: list[int] = field(default_factory=list)  # once saved: the token ids the turn put in the memory


class Conversation:
    """Chat over any LongMemRunner (in process, or the gateway's over the services)."""

    def __init__(self, runner: LongMemRunner, config: ChatConfig | None = None):
        self.runner = runner
        self.config = config or runner.config.chat
        self.format = chat_format(runner.tokenizer, self.config)

    def recent(self, session_id: str, request_id: str) -> RecentTokens:
        """The session memory's newest tokens; the memory is created on first use (chat.capacity_tokens,
        chat.num_shards)."""
        try:
            return self.runner.bank.recent(session_id, request_id)
        except MemoryNotFound:
            try:
                self.runner.create_memory(session_id, self.config.capacity_tokens or None,
                                          self.config.num_shards or None)
            except MemoryExists:  # another turn of this session created it meanwhile
                pass
            return self.runner.bank.recent(session_id, request_id)

    def turn(self, session_id: str, message: str, turn_id: str | None = None, max_new_tokens: int = 0,
             temperature: float = 0.0, top_k: int = 0, seed: int | None = None, reread: bool | None = None,
             use_memory: bool = True, save: bool = True) -> ChatTurn:
        """Starts one turn of the conversation in memory `session_id` (see the module docstring). The
        reply streams from the returned turn's `pieces`; the turn is saved after its last piece, never
        when the pieces are not all taken. max_new_tokens=0: chat.max_new_tokens; reread None: as
        read.reread says for "generate". use_memory=False answers from the recent turns alone (nothing
        read from memory), save=False leaves the memory as it was: what the evaluation's controls ask."""
        if not message:
            raise ValueError("message is required")
        if not self.runner.config.memory.request_id_window:
            raise ValueError("Chat saves each turn once by its request id: memory.request_id_window must be positive")
        turn_id = turn_id or uuid.uuid4().hex
        request_id = f"{TURN_REQUEST}{turn_id}"
        msg = encode_text(self.runner.tokenizer, message)
        max_new = max_new_tokens or self.config.max_new_tokens
        room = self.room(msg, max_new)
        recent = self.recent(session_id, f"{request_id}:0")  # a turn is one segment: one append
        if recent.request_applied:
            return self._replay(session_id, turn_id, msg, recent)
        spans = self.runner.answer_spans("generate", session_id, self.format.prompt([], msg), use_memory, reread)
        while len(self.runner.reread_prefix(spans)) > room:  # a long message leaves room for fewer spans
            spans.remove(min(spans, key=lambda s: s.score))
        history, start = self.window(recent, msg, len(self.runner.reread_prefix(spans)), max_new)
        spans = [s for s in spans if s.end_position <= start]  # what the window holds is not re-read
        tokens = self.runner.generate(token_ids=self.format.prompt(history, msg), memory_id=session_id,
                                      max_new_tokens=max_new, temperature=temperature, top_k=top_k, seed=seed,
                                      use_memory=use_memory, reread=spans)
        turn = ChatTurn(turn_id, len(history), spans, False)
        turn.pieces = self._reply(turn, session_id, msg, tokens, request_id if save else None)
        return turn

    def room(self, msg: list[int], max_new: int) -> int:
        """Window tokens left beside the message and a reply of max_new tokens (for re-read spans and
        recent turns). TurnTooLong when the message and the reply alone do not fit."""
        w = self.runner.config.read.segment_tokens
        room = w - len(self.format.prompt([], msg)) - max_new - len(self.format.reply_close)
        if room < 0:
            raise TurnTooLong(f"message has {len(msg)} tokens; with max_new_tokens {max_new} a turn fits at most "
                              f"{room + len(msg)} (read.segment_tokens {w})")
        return room

    def window(self, recent: RecentTokens, msg: list[int], prefix_tokens: int, max_new: int) -> tuple[list[int], int]:
        """The newest whole turns of `recent` that fit in the window beside `prefix_tokens` tokens placed
        before the conversation, the message and a reply of max_new tokens, and the stream position they
        start at (`room`)."""
        history, start = self.format.history(recent.token_ids, self.room(msg, max_new) - prefix_tokens)
        return history, recent.start_position + start

    def _reply(self, turn: ChatTurn, session_id: str, msg: list[int], tokens: Iterator[int],
               request_id: str | None) -> Iterator[tuple[str, list[int]]]:
        """The reply's pieces; after the last, the turn is appended (with request_id; None: not saved)."""
        eos = self.runner.tokenizer.eos_token_id
        reply: list[int] = []
        shown, unsent, stopped, turn.finish_reason = 0, [], False, "length"
        for token in tokens:
            if token == eos:
                turn.finish_reason = "eos"
                break
            reply.append(token)
            unsent.append(token)
            text = self.runner.decode(reply)
            upto, stopped = held_back(text, self.format.stops)
            if upto > shown:
                yield text[shown:upto], unsent
                shown, unsent = upto, []
            if stopped:  # the reply is the text before the stop, in at most the tokens generated
                turn.finish_reason = "eos"
                cut = encode_text(self.runner.tokenizer, text[:upto])
                if len(cut) > len(reply):  # re-encoding grew it (a special token spelled out): cut the tokens
                    while reply and len(self.runner.decode(reply)) > upto:
                        reply = reply[:-1]
                    cut = reply
                reply = cut
                break
        text = self.runner.decode(reply)
        if not stopped and (len(text) > shown or unsent):
            yield text[shown:], unsent
        if request_id is not None:
            stored = self.format.turn(msg, reply)
            self.runner.append(session_id, token_ids=stored, request_id=request_id)
            turn.saved, turn.stats, turn.stored = True, self.runner.memory_stats(session_id), stored

    def _replay(self, session_id: str, turn_id: str, msg: list[int], recent: RecentTokens) -> ChatTurn:
        """A turn saved by an earlier call: its saved reply, read back from the memory's recent tokens."""
        offset = recent.request_position - recent.start_position
        found = (self.format.stored_turn(recent.token_ids[offset:], msg)
                 if recent.request_position != NO_POSITION and 0 <= offset < len(recent.token_ids) else None)
        if found is None:
            raise TurnForgotten(f"turn '{turn_id}' was saved already, but it is no longer among the memory's "
                                "recent tokens (memory.recent_tokens) as this message, so its reply cannot be sent again")
        reply, stored = found
        return ChatTurn(turn_id, 0, [], True, iter([(self.runner.decode(reply), reply)]), "eos", True,
                        self.runner.memory_stats(session_id), stored)
