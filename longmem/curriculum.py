"""Recall curriculum: cheap examples that teach the SideNet to read what it retrieves.

One example is
- a *fact segment*: some filler tokens (often none, so that facts also open a segment), one or more
  facts separated by filler, a few more filler tokens. It goes into a small memory of its own, which
  is searched together with a large memory of cached filler segments (see longmem/train.py): only the
  fact segment costs a backbone pass;
- a *reading segment*: some filler tokens, a question about one of the facts, and its answer; only the
  answer tokens are scored.

Kinds of facts (`KINDS`):
- "passkey": one number of several digits under a name such as "the pass key";
- "words": several "the number for <word>" facts in one memory, the ones not asked being distractors;
- "person": facts about people in plain sentences, a name and an attribute (a number or a town).

Phrasings: every statement and question comes from STATEMENTS and QUESTIONS. Those marked `heldout`
never occur in training examples; an evaluation of unseen phrasings asks for `heldout=True` examples,
which use only them.

Answers occur only where they are stated: numbers and towns are drawn among those that do not occur in
the filler text, and the facts of one example have distinct values.
"""

from __future__ import annotations

import dataclasses
import random
import re
from collections.abc import Callable
from dataclasses import dataclass, field

from .config import LongMemConfig
from .data import FACT_WORDS

KINDS = ("passkey", "words", "person")
PASSKEY_NAMES = ("the pass key", "the secret code", "the access code", "the PIN", "the password")
FIRST_NAMES = ("Alice", "Bruno", "Clara", "Dmitri", "Elena", "Farid", "Greta", "Hugo", "Ingrid", "Jonas",
               "Keiko", "Lars", "Marta", "Nadia", "Oscar", "Priya", "Quentin", "Rosa", "Stefan", "Tamsin",
               "Ulrich", "Vera", "Wanda", "Xavier", "Yusuf", "Zora")
LAST_NAMES = ("Albrecht", "Barros", "Castellano", "Dubois", "Eriksen", "Fontaine", "Gallagher", "Halvorsen",
              "Ivanova", "Jovanovic", "Kowalski", "Lindqvist", "Moreau", "Novak", "Okafor", "Petrov",
              "Quintero", "Rasmussen", "Salazar", "Takahashi", "Urquhart", "Varga", "Whitfield", "Yamamoto")
TOWNS = ("Lisbon", "Bergen", "Tallinn", "Valencia", "Krakow", "Utrecht", "Graz", "Porto", "Ghent", "Turku",
         "Bologna", "Seville", "Aarhus", "Lucerne", "Bratislava", "Ljubljana", "Salzburg", "Trieste", "Cork",
         "Dresden", "Nantes", "Malmo", "Split", "Bilbao", "Verona", "Galway", "Innsbruck", "Riga", "Vilnius",
         "Zagreb", "Tampere", "Leipzig", "Granada", "Genoa", "Bruges", "Uppsala", "Lyon", "Kaunas")
# Attributes of people: (name, None) for a town, (name, (min digits, max digits)) for a number.
ATTRIBUTES = (("home town", None), ("room number", (4, 4)), ("employee number", (5, 6)),
              ("phone extension", (4, 5)), ("locker code", (5, 5)))
MAX_PERSON_FACTS = 4


@dataclass(frozen=True)
class Phrasing:
    text: str  # {subject}, {Subject} (capitalised) and, in a statement, {value}
    heldout: bool = False  # never in training; used by the unseen-phrasing evaluation


STATEMENTS = (
    Phrasing("{Subject} is {value}. Remember it. {value} is {subject}."),
    Phrasing("Remember this: {subject} is {value}."),
    Phrasing("Note that {subject} is {value}."),
    Phrasing("{Subject} is {value}."),
    Phrasing("For the record, {subject} is {value}, and it will not change."),
    Phrasing("Keep in mind that {subject} is {value}."),
    Phrasing("{Subject}: {value}."),
    Phrasing("Here is something to remember. {Subject} is {value}."),
    Phrasing("I was told that {subject} is {value}."),
    Phrasing("{Subject} has been set to {value}."),
    Phrasing("Make a note: {subject} equals {value}."),
    Phrasing("Don't forget, {subject} is {value}."),
    Phrasing("The value of {subject} is {value}, as stated here."),
    Phrasing("Please write down {value}: that is {subject}.", heldout=True),
    Phrasing("It was agreed that {subject} would be {value} from now on.", heldout=True),
)
QUESTIONS = (  # each ends where the answer begins
    Phrasing("What is {subject}? {Subject} is"),
    Phrasing("Question: what is {subject}?\nAnswer: {Subject} is"),
    Phrasing("Do you remember {subject}? {Subject} is"),
    Phrasing("Can you recall {subject}? {Subject} is"),
    Phrasing("Which value was given for {subject}? {Subject} is"),
    Phrasing("Quick question: what is {subject}? Answer:"),
    Phrasing("Remind me of {subject}. It is"),
    Phrasing("What did the text say {subject} was? It said"),
    Phrasing("Q: {subject}?\nA:"),
    Phrasing("Tell me {subject}. {Subject} is", heldout=True),
    Phrasing("Earlier you were told {subject}. Which was it? {Subject} is", heldout=True),
)


# How an update restates a fact with a new value (the evaluation of updated facts; never in training).
UPDATES = (
    Phrasing("Update: {subject} has changed. {Subject} is now {value}.", heldout=True),
    Phrasing("Correction: {subject} is no longer what was said before; it is now {value}.", heldout=True),
    Phrasing("{Subject} was changed today. From now on {subject} is {value}.", heldout=True),
)


def phrasings(options: tuple[Phrasing, ...], heldout: bool) -> list[Phrasing]:
    return [p for p in options if p.heldout == heldout]


@dataclass
class Fact:
    subject: str  # e.g. "the pass key", "the number for apple", "Alice Moreau's home town"
    value: str  # e.g. "48213", "Lisbon"

    def render(self, phrasing: Phrasing) -> str:
        subject_cap = self.subject[:1].upper() + self.subject[1:]
        return phrasing.text.format(subject=self.subject, Subject=subject_cap, value=self.value)


@dataclass
class RecallExample:
    kind: str
    facts: list[Fact]
    asked: int  # index of the fact the question asks for
    statements: list[str]  # the text of each fact's statement, in the fact segment
    question: str
    fact_segment: list[int]  # token ids: goes into the example's own memory
    reading: list[int]  # token ids: local filler, the question, the answer
    answer_tokens: int  # the last answer_tokens tokens of `reading` are the answer (and answer_end)
    replaced: str | None = None  # an updated fact's earlier value (Curriculum.example's update_gap)
    statement_spans: list[tuple[int, int]] = field(default_factory=list)  # [start, end) of each statement in fact_segment
    answered_by: int = 0  # the statement holding the answer (the asked fact's, or its update)
    question_tokens: int = 0  # the question's tokens in `reading`, just before the answer's
    reread: bool = False  # `reading` opens with re-read spans, which alone are `fact_segment` (Curriculum.reread)

    @property
    def answer_span(self) -> tuple[int, int]:
        """[start, end) in fact_segment of the statement that holds the answer."""
        return self.statement_spans[self.answered_by]

    @property
    def answer(self) -> str:
        return self.facts[self.asked].value


@dataclass
class CurriculumConfig:
    """The sizes of examples (TrainConfig's recall_* values)."""

    segment_tokens: int  # W: a fact or reading segment never exceeds it
    prefix_tokens: int  # most filler tokens before the first fact
    segment_start_fraction: float  # share of fact segments whose first fact opens the segment
    gap_tokens: int  # most filler tokens between two facts
    suffix_tokens: int  # most filler tokens after the last fact
    local_tokens: int  # most filler tokens before the question
    max_facts: int  # facts in one "words" example: 2..max_facts
    number_digits: tuple[int, int]  # digits of pass keys and of "words" values: min, max
    answer_end: str  # text after the value in the scored answer (e.g. "."): where a greedy answer stops
    reread_spans: int = 4  # re-read examples (Curriculum.reread): spans before the question
    reread_span_tokens: int = 64  # tokens of a span, its separator included
    reread_separator: str = "\n"  # after each span


def curriculum_config(config: LongMemConfig, segment_tokens: int) -> CurriculumConfig:
    """The example sizes of `config.train` for segments of `segment_tokens` tokens."""
    t, r = config.train, config.read
    spans = min(r.reread_spans, r.reread_budget // r.reread_span_tokens)
    return CurriculumConfig(segment_tokens, t.recall_prefix_tokens, t.recall_segment_start_fraction,
                            t.recall_gap_tokens, t.recall_suffix_tokens, t.recall_local_tokens, t.recall_max_facts,
                            tuple(t.recall_number_digits), t.recall_answer_end, spans, r.reread_span_tokens,
                            r.reread_separator)


class Curriculum:
    """Draws recall examples; filler comes from `pool`, token id lists of real text (the cached segments)."""

    def __init__(self, pool: list[list[int]], tokenize: Callable[[str], list[int]],
                 decode: Callable[[list[int]], str], config: CurriculumConfig):
        if not pool:
            raise ValueError("the curriculum needs filler segments")
        self.pool, self.tokenize, self.decode, self.config = pool, tokenize, decode, config
        self.filler_text = "\n".join(decode(seg) for seg in pool)
        self.towns = [t for t in TOWNS if not re.search(rf"\b{t}\b", self.filler_text)]

    def filler(self, rng: random.Random, n: int) -> list[int]:
        """n consecutive tokens (fewer if the segment is shorter) of a random pool segment."""
        if n <= 0:
            return []
        seg = rng.choice(self.pool)
        n = min(n, len(seg))
        start = rng.randint(0, len(seg) - n)
        return seg[start:start + n]

    def stretch(self, rng: random.Random, n: int) -> list[int]:
        """n tokens of filler, from as many random pool segments as it takes."""
        ids: list[int] = []
        while len(ids) < n:
            ids += self.filler(rng, n - len(ids))
        return ids

    def _number(self, rng: random.Random, digits: tuple[int, int], taken: set[str]) -> str:
        for _ in range(10_000):
            n = rng.randint(*digits)
            value = str(rng.randint(10 ** (n - 1), 10 ** n - 1))
            if value not in taken and value not in self.filler_text:
                return value
        raise ValueError(f"no {digits}-digit number absent from the filler text")

    def _town(self, rng: random.Random, taken: set[str]) -> str:
        free = [t for t in self.towns if t not in taken]
        if not free:
            raise ValueError("every town occurs in the filler text or is taken")
        return rng.choice(free)

    def facts(self, rng: random.Random, kind: str, n_facts: int | None = None) -> list[Fact]:
        """The facts of one example; n_facts (None: random, see KINDS) fixes how many ("words", "person")."""
        taken: set[str] = set()

        def number(digits):
            taken.add(value := self._number(rng, digits, taken))
            return value

        if kind == "passkey":
            if n_facts not in (None, 1):
                raise ValueError("a passkey example states one fact")
            return [Fact(rng.choice(PASSKEY_NAMES), number(self.config.number_digits))]
        if kind == "words":
            words = rng.sample(FACT_WORDS, n_facts or rng.randint(2, self.config.max_facts))
            return [Fact(f"the number for {w}", number(self.config.number_digits)) for w in words]
        if kind == "person":
            n = n_facts or rng.randint(1, min(MAX_PERSON_FACTS, self.config.max_facts))
            firsts, lasts = rng.sample(FIRST_NAMES, n), rng.sample(LAST_NAMES, n)
            facts = []
            for first, last in zip(firsts, lasts):
                attribute, digits = rng.choice(ATTRIBUTES)
                if digits is None:
                    taken.add(value := self._town(rng, taken))
                else:
                    value = number(digits)
                facts.append(Fact(f"{first} {last}'s {attribute}", value))
            return facts
        raise ValueError(f"unknown recall kind {kind!r}: expected one of {KINDS}")

    def _replacement(self, rng: random.Random, value: str, taken: set[str]) -> str:
        """Another value of the same kind as `value`: a number of as many digits, or a town."""
        return self._number(rng, (len(value), len(value)), taken) if value.isdigit() else self._town(rng, taken)

    def example(self, rng: random.Random, kind: str, heldout: bool = False, n_facts: int | None = None,
                update_gap: int | None = None) -> RecallExample:
        """One example; heldout=True: statement and question phrasings that training never uses;
        n_facts: how many facts it states (None: random). update_gap: the asked fact is then stated
        again with a new value (an UPDATES phrasing), update_gap filler tokens after the fact segment's
        end, and the new value is the answer; the old one stays in `statements` and `replaced`."""
        c = self.config
        facts = self.facts(rng, kind, n_facts)
        statements = [f.render(rng.choice(phrasings(STATEMENTS, heldout))) for f in facts]
        prefix = 0 if rng.random() < c.segment_start_fraction else rng.randint(1, c.prefix_tokens)
        segment = self.filler(rng, prefix)
        spans = []
        for i, statement in enumerate(statements):
            if i:
                segment += self.filler(rng, rng.randint(0, c.gap_tokens))
            spans.append(len(segment))
            segment += self.tokenize(("\n" if segment else "") + statement + "\n")
            spans[-1] = (spans[-1], len(segment))
        segment += self.filler(rng, rng.randint(0, c.suffix_tokens))
        asked = rng.randrange(len(facts))
        answered_by, replaced = asked, None
        if update_gap is not None:
            replaced = facts[asked].value
            facts[asked] = Fact(facts[asked].subject, self._replacement(rng, replaced, {f.value for f in facts}))
            statements.append(facts[asked].render(rng.choice(UPDATES)))
            segment += self.stretch(rng, update_gap)
            start = len(segment)
            segment += self.tokenize("\n" + statements[-1] + "\n")
            spans.append((start, len(segment)))
            answered_by = len(statements) - 1
        question = facts[asked].render(rng.choice(phrasings(QUESTIONS, heldout)))
        answer = self.tokenize(" " + facts[asked].value + c.answer_end)
        asking = self.tokenize("\n" + question)
        reading = self.filler(rng, rng.randint(0, c.local_tokens)) + asking + answer
        if max(len(segment), len(reading)) > c.segment_tokens:
            raise ValueError(f"a recall segment of {max(len(segment), len(reading))} tokens exceeds "
                             f"{c.segment_tokens}: lower train.recall_prefix_tokens / gap / local tokens")
        return RecallExample(kind, facts, asked, statements, question, segment, reading,
                             len(answer), replaced, spans, answered_by, len(asking))

    def reread(self, rng: random.Random, example: RecallExample) -> RecallExample:
        """The example as re-reading answers it (read.reread_memory_read "spans"): its reading segment opens
        with reread_spans spans of at most reread_span_tokens tokens each (separator included), in stream
        order, and its memory holds those spans alone. The spans: a window of the fact segment around the
        answer's statement (at a random offset), windows around the other statements not yet covered
        while spans remain (the distractors re-reading also finds), then windows of filler, taken where
        they hold a digit when one of a few draws does (hard negatives for numbers), at random places in
        the stream."""
        c = self.config
        separator = self.tokenize(c.reread_separator) if c.reread_separator else []
        room = c.reread_span_tokens - len(separator)
        segment = example.fact_segment
        if room < max(e - s for s, e in example.statement_spans):
            raise ValueError(f"a re-read span of {room} tokens cannot hold a statement: raise read.reread_span_tokens")
        order = [example.answered_by] + rng.sample([i for i in range(len(example.statements))
                                                    if i != example.answered_by], len(example.statements) - 1)
        windows: list[tuple[int, int]] = []  # [start, end) in the fact segment, none overlapping another
        for i in order[:c.reread_spans]:
            s, e = example.statement_spans[i]
            start = rng.randint(max(0, e - room), max(0, min(s, len(segment) - room)))
            end = min(len(segment), start + room)
            if not any(start < b and a < end for a, b in windows):
                windows.append((start, end))
        items: list[tuple[int | None, list[int]]] = [(a, segment[a:b]) for a, b in sorted(windows)]
        for _ in range(c.reread_spans - len(items)):  # (None: filler from elsewhere in the memory)
            draws = [self.filler(rng, room) for _ in range(4)]
            filler = next((d for d in draws if any(ch.isdigit() for ch in self.decode(d))), draws[0])
            items.insert(rng.randint(0, len(items)), (None, filler))
        prefix, offsets = [], {}
        for start, span in items:
            if start is not None:
                offsets[start] = len(prefix)
            prefix += span + separator
        shifted = []  # where each statement is in the prefix; (0, 0) where it is not re-read
        for s, e in example.statement_spans:
            a = next((a for a, b in windows if a <= s and e <= b), None)
            shifted.append((offsets[a] + s - a, offsets[a] + e - a) if a is not None else (0, 0))
        return dataclasses.replace(example, fact_segment=prefix, reading=prefix + example.reading,
                                   statement_spans=shifted, reread=True)
