"""Conversations that remember: a fact told in an early turn, then hundreds of turns on other topics, then
the question, asked with Chat (longmem/chat.py) over the conversation's memory; beside it, the same
question with the recent turns alone (no memory), with a BM25 prompt of the whole history before the
recent turns, and with the whole history in the backbone's window where it fits.

The other turns are scripted from the unseen corpora: the user's message is one paragraph, the reply the
next one. Each turn goes into memory as Chat appends it (one append of the turn as the chat format writes
it), so its keys/values do not depend on what precedes it: every turn of the pool is encoded once and its
keys/values go into each conversation's memory (as the recall parts' filler does).
"""

from __future__ import annotations

import random
import re
import statistics
import time
from dataclasses import dataclass
from pathlib import Path

from tqdm.auto import tqdm

from ..backbone import BackboneOutput
from ..baseline import BM25Prompt, BM25Selection
from ..chat import Conversation, encode_text, first_stop
from ..config import LongMemConfig
from ..curriculum import FIRST_NAMES, TOWNS
from ..memory import round_up
from ..model import LongMem
from ..report import markdown_table
from ..roles import fill_memory, pad_segments
from .common import EvalData, bar_plot, fmt_acc, md_literal

# (the user's statement, the later question); {v} is the value asked for, {name} a first name.
FACTS = (
    ("By the way, the code of my bike lock is {v}.", "What is the code of my bike lock?"),
    ("Please note that my employee number is {v}.", "What is my employee number?"),
    ("Remember this for later: my parcel tracking number is {v}.", "What is my parcel tracking number?"),
    ("My cousin {name} has just moved to {v}.", "Which town did my cousin {name} move to?"),
)
FACT_REPLY = "Got it, I will remember that."


def answered(reply: str, answer: str) -> bool:
    """The reply states the answer as a whole word or number (a chat reply may open with other words)."""
    return re.search(rf"(?<!\w){re.escape(answer)}(?!\w)", reply) is not None


def paragraphs(data: EvalData, chat: Conversation, min_words: int, max_tokens: int) -> list[str]:
    """The unseen corpora's paragraphs of at least min_words words, each cut to at most max_tokens tokens
    (at the last whole word)."""
    out = []
    for doc in data.unseen_documents:
        for block in re.split(r"\n\s*\n", doc.text):
            text = " ".join(block.split())
            if len(text.split()) < min_words:
                continue
            ids = encode_text(chat.runner.tokenizer, text)
            if len(ids) > max_tokens:
                text = chat.runner.decode(ids[:max_tokens]).rsplit(" ", 1)[0]
            out.append(text)
    return out


@dataclass
class Turn:
    message: str
    reply: str
    ids: list[int]  # as the memory stores it


class TurnPool:
    """Scripted turns (one paragraph asked, the next one answered), each encoded once: those that fit one
    window, as every turn Chat stores does, until they hold history_tokens tokens."""

    def __init__(self, model: LongMem, chat: Conversation, texts: list[str], history_tokens: int):
        self.model = model
        self.turns: list[Turn] = []
        encode = lambda text: encode_text(model.tokenizer, text)
        held = 0
        for message, reply in zip(texts[0::2], texts[1::2]):
            ids = chat.format.turn(encode(message), encode(reply))
            if len(ids) <= model.config.read.segment_tokens:
                self.turns.append(Turn(message, reply, ids))
                held += len(ids)
            if held >= history_tokens:
                break
        self.encoded: dict[int, BackboneOutput] = {}  # the memory layer's keys/values of each turn encoded
        self.encode_seconds = 0.0

    def append(self, memory_id: str, index: int) -> None:
        """Appends pool turn `index` to a memory, as Chat's append of it would (one segment: fill_memory)."""
        if index not in self.encoded:
            t0 = time.perf_counter()
            backbone = self.model.backbone
            keys, values = backbone.encode_memory(pad_segments([self.turns[index].ids], backbone.device))
            self.encoded[index] = BackboneOutput(None, keys, values, None)
            self.encode_seconds += time.perf_counter() - t0
        fill_memory(self.model.bank, memory_id, self.encoded[index], 0, self.turns[index].ids,
                    self.model.config.memory.sink_tokens)


def fact(rng: random.Random, avoid: str) -> tuple[str, str, str]:
    """(statement, question, answer): a 5-digit number or a town, neither occurring in `avoid`."""
    statement, question = rng.choice(FACTS)
    name = rng.choice(FIRST_NAMES)
    if "{name}" in statement:
        value = rng.choice([t for t in TOWNS if not re.search(rf"\b{t}\b", avoid)])
    else:
        value = str(rng.randint(10_000, 99_999))
        while value in avoid:
            value = str(rng.randint(10_000, 99_999))
    return statement.format(v=value, name=name), question.format(name=name), value


def run(model: LongMem, config: LongMemConfig, data: EvalData, out_dir: Path, progress: bool) -> dict:
    ev = config.eval
    chat = Conversation(model)
    fmt, new = chat.format, ev.conversation_reply_tokens
    texts = paragraphs(data, chat, ev.conversation_min_words, ev.conversation_turn_tokens)
    pool = TurnPool(model, chat, texts, max(ev.conversation_lengths))
    # The BM25 prompt's most tokens: its windows, each with its separator (merged windows take fewer).
    bm25_tokens = ev.bm25_windows * (ev.bm25_window_tokens + len(model.tokenize(ev.bm25_separator)))
    everything = " ".join(t.message + " " + t.reply for t in pool.turns)
    full_window = min(ev.full_window_tokens, model.backbone.max_positions)
    rng, trials = random.Random(ev.seed + 2), []
    total = len(ev.conversation_lengths) * ev.conversation_trials
    with tqdm(total=total, desc="conversation", unit="trial", disable=not progress) as bar:
        for n in ev.conversation_lengths:
            for _ in range(ev.conversation_trials):
                statement, question, answer = fact(rng, everything)
                start = rng.randrange(len(pool.turns))
                told = fmt.turn(encode_text(model.tokenizer, statement), encode_text(model.tokenizer, FACT_REPLY))
                order, tokens = [], len(told)
                while tokens < n:
                    order.append((start + len(order)) % len(pool.turns))
                    tokens += len(pool.turns[order[-1]].ids)
                at = min(ev.conversation_fact_turn, len(order))
                history = [pool.turns[i].ids for i in order[:at]] + [told] + [pool.turns[i].ids for i in order[at:]]
                memory_id = model.create_memory(capacity_tokens=round_up(tokens, config.memory.chunk_size))
                try:
                    for i in order[:at]:
                        pool.append(memory_id, i)
                    model.append(memory_id, token_ids=told)
                    for i in order[at:]:
                        pool.append(memory_id, i)
                    t0 = time.perf_counter()
                    turn = chat.turn(memory_id, question, max_new_tokens=new, save=False)
                    reply = "".join(text for text, _ in turn.pieces)
                    seconds = time.perf_counter() - t0
                    control = chat.turn(memory_id, question, max_new_tokens=new, use_memory=False, save=False)
                    control_reply = "".join(text for text, _ in control.pieces)
                    recent = model.bank.recent(memory_id)
                finally:
                    model.delete_memory(memory_id)
                msg = encode_text(model.tokenizer, question)
                document = [t for ids in history for t in ids]
                # BM25 searches the history the window leaves out (as Chat re-reads no span the window holds)
                held, _ = chat.window(recent, msg, bm25_tokens, new)
                searched = document[:len(document) - len(held)]
                selection = (BM25Prompt.from_config(searched, model.decode, model.tokenize, ev).select(question)
                             if searched else BM25Selection([], [], [], []))
                window, _ = chat.window(recent, msg, len(selection.ids), new)
                bm25 = reply_text(chat, model.backbone.generate_greedy(selection.ids + fmt.prompt(window, msg), new))
                whole = fmt.prompt(document, msg)
                full = (reply_text(chat, model.backbone.generate_greedy(whole, new))
                        if len(whole) + new <= full_window else None)
                trials.append({
                    "history_tokens": n, "turns": len(history), "fact_turn": at, "conversation_tokens": len(document),
                    "statement": statement, "question": question, "answer": answer,
                    "window_history_tokens": turn.history_tokens,
                    "fact_in_window": sum(map(len, history[:at])) >= len(document) - turn.history_tokens,
                    "reply": reply, "match": answered(reply, answer), "seconds": seconds,
                    "reread": [[s.start_position, s.end_position] for s in turn.reread],
                    "reread_hit": any(answer in s.text for s in turn.reread),
                    "control_reply": control_reply, "control_match": answered(control_reply, answer),
                    "bm25_reply": bm25, "bm25_match": answered(bm25, answer),
                    "bm25_hit": any(answer in text for text in selection.texts),
                    "full_reply": full, "full_match": None if full is None else answered(full, answer)})
                bar.update()
    rows = []
    for n in ev.conversation_lengths:
        ts = [t for t in trials if t["history_tokens"] == n]
        full = [t["full_match"] for t in ts if t["full_match"] is not None]
        count = lambda key: sum(t[key] for t in ts)
        rows.append({"history_tokens": n, "trials": len(ts), "turns": statistics.median(t["turns"] for t in ts),
                     "correct": count("match"), "accuracy": count("match") / len(ts),
                     "control_correct": count("control_match"), "control_accuracy": count("control_match") / len(ts),
                     "bm25_correct": count("bm25_match"), "bm25_accuracy": count("bm25_match") / len(ts),
                     "full_trials": len(full), "full_correct": sum(full),
                     "full_accuracy": sum(full) / len(full) if full else None,
                     "fact_in_window": count("fact_in_window"), "reread_hits": count("reread_hit"),
                     "bm25_hits": count("bm25_hit"), "reply_seconds": statistics.median(t["seconds"] for t in ts)})
    result = {"items": len(trials), "by_length": rows, "trials": trials, "pool_turns": len(pool.turns),
              "turn_tokens": ev.conversation_turn_tokens, "reply_tokens": new, "full_window_tokens": full_window,
              "encode_seconds": pool.encode_seconds, "facts": [s for s, _ in FACTS], "fact_reply": FACT_REPLY,
              "chat": vars(config.chat).copy(), "recent_tokens": config.memory.recent_tokens}
    result["plots"] = [bar_plot(out_dir, "conversation_accuracy.png", "A fact from an early turn, by history length",
                                [f"{r['history_tokens']:,}" for r in rows], [r["accuracy"] for r in rows])]
    return result


def reply_text(chat: Conversation, ids: list[int]) -> str:
    """A baseline's greedy continuation as a reply: up to eos or the first stop text."""
    eos = chat.runner.tokenizer.eos_token_id
    text = chat.runner.decode(ids[:ids.index(eos)] if eos in ids else ids)
    return text[:first_stop(text, chat.format.stops)]


def report(r: dict) -> str:
    table = markdown_table(
        ["history tokens", "turns (median)", "LongMem Chat", "recent turns only (no memory)",
         "BM25 prompt + recent turns (backbone)", "whole history in window (backbone)",
         "fact in the window's turns", "re-read spans hold it", "BM25 windows hold it", "reply s (median)"],
        [[f"{b['history_tokens']:,}", f"{b['turns']:g}", fmt_acc(b["correct"], b["trials"]),
          fmt_acc(b["control_correct"], b["trials"]), fmt_acc(b["bm25_correct"], b["trials"]),
          fmt_acc(b["full_correct"], b["full_trials"]), f"{b['fact_in_window']}/{b['trials']}",
          f"{b['reread_hits']}/{b['trials']}", f"{b['bm25_hits']}/{b['trials']}", f"{b['reply_seconds']:.2f}"]
         for b in r["by_length"]])
    first = {}
    for t in r["trials"]:
        first.setdefault(t["history_tokens"], t)
    examples = markdown_table(["history tokens", "question", "answer", "LongMem reply", "BM25 reply"],
                              [[f"{t['history_tokens']:,}", md_literal(t["question"]), t["answer"],
                                md_literal(t["reply"]), md_literal(t["bm25_reply"])] for t in first.values()], "rllll")
    facts = "; ".join(f"`{f}`" for f in r["facts"])
    return "\n\n".join([
        f"A conversation of N tokens of scripted turns (the user's "
        f"message a paragraph of the unseen corpora, at most {r['turn_tokens']} tokens, the reply the next "
        f"paragraph; {r['pool_turns']} distinct turns, encoded once in {r['encode_seconds']:.1f} s), with a fact "
        f"told in an early turn (one of {facts}, answered {r['fact_reply']!r}); then the question, asked with "
        f"Chat over the conversation's memory (the recent turns that fit in the window, re-reading and the "
        f"memory read), greedy, {r['reply_tokens']} reply tokens; a trial counts when the reply states the "
        "answer. The same question with the recent turns alone (no memory); with the conversation's best BM25 "
        "windows (as in the recall parts) before the recent turns, read by the backbone alone; and with the "
        f"whole conversation in the backbone's window where it fits in {r['full_window_tokens']:,} tokens.",
        table, f"![conversation accuracy]({r['plots'][0]})", "First trial of each length:", examples])
