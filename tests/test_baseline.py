"""The BM25 baseline (longmem/baseline.py) and its columns in the recall harness: windows cut every
stride tokens, the best-matching ones returned in stream order with overlaps merged, the backbone's own
greedy generation, and a recall trial end to end on the tiny random model."""

from __future__ import annotations

import dataclasses

import pytest
import torch
from tqdm.auto import tqdm

from conftest import TEXT, W
from longmem.baseline import BM25Prompt
from longmem.config import EvalConfig
from longmem.evaluate.harness import RECALL_EXTRA_TOKENS, FillerMemory, RecallItem, RecallTrials, accuracy_rows

# A stand-in tokenizer: token i is the word WORDS[i], so windows and the text BM25 sees are exact.
WORDS = ["lorem", "ipsum", "dolor", "amet", "consectetur", "adipiscing", "zanzibar", "quokka", "marmalade", "SEP"]
FILLER = [0, 1, 2, 3, 4, 5]  # cycled: every window holds all of these words
ZANZIBAR, QUOKKA, MARMALADE, SEP = 6, 7, 8, 9


def decode(ids: list[int]) -> str:
    return " ".join(WORDS[i] for i in ids)


def encode(text: str) -> list[int]:
    return [WORDS.index(w) for w in text.split()]


def stream(length: int, planted: dict[int, int]) -> list[int]:
    """`length` filler tokens with the token planted[p] at each position p."""
    return [planted.get(p, FILLER[p % len(FILLER)]) for p in range(length)]


def prompt(ids: list[int], window: int = 16, stride: int = 8, windows: int = 2) -> BM25Prompt:
    return BM25Prompt(ids, decode, encode, window, stride, windows, "SEP", "en")


def test_windows_start_every_stride_and_the_last_reaches_the_end():
    p = prompt(stream(100, {}), window=16, stride=8)
    assert p.starts == list(range(0, 84, 8)) + [84]
    assert prompt(stream(10, {}), window=16, stride=8).starts == [0]  # shorter than a window: one window
    assert prompt(stream(100, {}), window=16, stride=16).starts == [0, 16, 32, 48, 64, 80, 84]


def test_the_window_holding_a_rare_word_is_in_the_prompt():
    ids = stream(200, {133: ZANZIBAR})
    sel = prompt(ids, window=16, stride=8, windows=1).select("where is zanzibar")
    assert sel.starts in ([120], [128])  # a window that holds position 133
    (a, b), = sel.spans
    assert a <= 133 < b and b - a == 16
    assert sel.ids == ids[a:b] + [SEP]
    assert "zanzibar" in sel.texts[0]


def test_overlapping_windows_merge_so_no_token_repeats():
    ids = stream(200, {100: ZANZIBAR})
    sel = prompt(ids, window=16, stride=8, windows=2).select("zanzibar")
    assert sel.starts == [88, 96]  # the two windows that hold position 100, overlapping by 8 tokens
    assert sel.spans == [(88, 112)]
    assert sel.ids == ids[88:112] + [SEP]
    ids = stream(200, {100: ZANZIBAR, 117: QUOKKA})
    sel = prompt(ids, window=16, stride=16, windows=2).select("zanzibar quokka")
    assert sel.starts == [96, 112] and sel.spans == [(96, 128)]  # adjacent windows: one span
    assert sel.ids == ids[96:128] + [SEP]


def test_windows_come_back_in_stream_order_and_their_count_is_honoured():
    # The best-scoring window (quokka twice) is the latest in the stream.
    ids = stream(400, {30: ZANZIBAR, 200: MARMALADE, 340: QUOKKA, 344: QUOKKA})
    sel = prompt(ids, window=16, stride=16, windows=3).select("quokka marmalade zanzibar")
    assert sel.starts == [16, 192, 336]
    assert sel.spans == [(16, 32), (192, 208), (336, 352)]
    assert sel.ids == ids[16:32] + [SEP] + ids[192:208] + [SEP] + ids[336:352] + [SEP]
    assert len(prompt(ids, window=16, stride=16, windows=2).select("quokka marmalade zanzibar").starts) == 2


def test_windows_sharing_no_word_with_the_question_are_left_out():
    sel = prompt(stream(100, {}), windows=4).select("zanzibar")
    assert sel.starts == [] and sel.ids == [] and sel.texts == []


def test_a_stride_past_the_window_is_refused():
    with pytest.raises(ValueError, match="stride"):
        prompt(stream(100, {}), window=8, stride=16)
    with pytest.raises(ValueError, match="count"):
        prompt(stream(100, {}), windows=0)


def test_the_real_tokenizer_puts_a_planted_word_in_the_prompt(llama_zero):
    model = llama_zero
    ids = model.tokenize(TEXT * 4 + "The password is ocelot. " + TEXT * 4)
    sel = BM25Prompt(ids, model.decode, model.tokenize, 24, 12, 2, "\n", "en").select("What is the password?")
    assert any("ocelot" in t for t in sel.texts)
    assert sel.ids[-len(model.tokenize("\n")):] == model.tokenize("\n")


def test_backbone_greedy_matches_the_models_own_generate(llama_zero):
    backbone = llama_zero.backbone
    ids = llama_zero.tokenize(TEXT[:120])
    ours = backbone.generate_greedy(ids, 12)
    theirs = backbone.model.generate(torch.tensor([ids]), max_new_tokens=12, do_sample=False,
                                     eos_token_id=backbone.tokenizer.eos_token_id,
                                     pad_token_id=backbone.tokenizer.eos_token_id)[0, len(ids):].tolist()
    assert ours == theirs and len(set(ours)) > 1


@pytest.mark.parametrize("n", [3 * W + 5, 9 * W])  # inside the filler, and past it (segments repeat)
def test_document_ids_are_the_tokens_fill_appends(llama_zero, fresh_memory, n):
    model = llama_zero
    filler = FillerMemory(model, model.tokenize(TEXT * 3)[:4 * W + 7])
    intro_ids = model.tokenize("The pass key is 48213. Remember it.")
    document = filler.document_ids(intro_ids, n)
    assert len(document) == len(intro_ids) + n and document[:len(intro_ids)] == intro_ids
    cached, appended = fresh_memory(model, 1024), fresh_memory(model, 1024)
    filler.fill(cached, intro_ids, n)
    model.append(appended, token_ids=document)
    a, b = model.bank.get(cached).store, model.bank.get(appended).store
    assert a.live == b.live > 0
    assert a.token_ids[:a.live].tolist() == b.token_ids[:b.live].tolist()
    assert a.positions[:a.live].tolist() == b.positions[:b.live].tolist()


def test_a_recall_trial_runs_the_bm25_and_whole_text_columns(llama_zero):
    model = llama_zero
    filler = FillerMemory(model, model.tokenize(TEXT * 3)[:4 * W])
    intro_ids = model.tokenize("The pass key is 48213. Remember it. 48213 is the pass key.\n")
    question = "What is the pass key? The pass key is"
    item = RecallItem(intro_ids, model.tokenize(question), question, "48213", {"key": "48213"})
    ev = EvalConfig(bm25_window_tokens=32, bm25_stride_tokens=16, bm25_windows=2, full_window_tokens=512)
    n = 2 * W
    with tqdm(total=2, disable=True) as bar:
        fits = RecallTrials(model, filler, ev, bar).run(item, n)
        short = RecallTrials(model, filler, dataclasses.replace(ev, full_window_tokens=3 * W), bar).run(item, n)
    document = filler.document_ids(intro_ids, n)
    assert len(document + item.question_ids) <= 512 - 8 and len(document + item.question_ids) > 3 * W
    new_tokens = len(model.tokenize(" 48213")) + RECALL_EXTRA_TOKENS
    sel = BM25Prompt.from_config(document, model.decode, model.tokenize, ev).select(question)
    assert fits["bm25_windows"] == sel.starts and sel.starts[0] < len(intro_ids)  # the intro's window is chosen
    assert fits["bm25_hit"] and fits["bm25_prompt_tokens"] == len(sel.ids)
    bm25 = model.decode(model.backbone.generate_greedy(sel.ids + item.question_ids, new_tokens))
    assert fits["bm25_generated"] == bm25 and isinstance(fits["bm25_match"], bool)
    full = model.decode(model.backbone.generate_greedy(document + item.question_ids, new_tokens))
    assert fits["full_generated"] == full and isinstance(fits["full_match"], bool)
    assert short["full_generated"] is None and short["full_match"] is None  # the document exceeds 3 W tokens
    row, = accuracy_rows([fits, short], ["filler_tokens"])
    assert row["bm25_correct"] == fits["bm25_match"] + short["bm25_match"] and row["bm25_hits"] == 2
    assert row["full_trials"] == 1 and row["full_accuracy"] == float(fits["full_match"])
    assert accuracy_rows([short], ["filler_tokens"])[0]["full_accuracy"] is None
