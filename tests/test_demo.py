"""`longmem demo` end to end on a tiny random model: it prints the three perplexities, the recall
demonstration with and without memory, and retrieved spans."""

from __future__ import annotations

import re

from longmem.cli import main


def test_demo_prints_perplexities_recall_and_spans(tiny_llama_dir, capsys):
    code = main(["demo", "--set", f"backbone.name_or_path={tiny_llama_dir}", "--set", "read.segment_tokens=32",
                 "--set", "memory.capacity_tokens=1024", "--set", "memory.chunk_size=4",
                 "--set", "demo.tokens=256", "--set", "demo.fact_position=40"])
    out = capsys.readouterr().out
    assert code == 0
    for label in ("backbone with a 32-token window", "SideNet without memory", "LongMem with memory"):
        assert re.search(rf"perplexity, {label}: +\d+\.\d+", out), label
    assert "with 'Remember this: the code of the blue safe is 73914.'" in out.replace("\\n", "")
    assert re.search(r"  LongMem with memory: .*\((right|wrong); the fact says 73914\)", out)
    assert re.search(r"  SideNet without memory: .*\((right|wrong); the fact says 73914\)", out)
    assert re.search(r"  backbone with a BM25 prompt \(\d+ spans?, \d+ tokens, (holding|without) the fact\): "
                     r".*\((right|wrong); the fact says 73914\)", out)
    assert re.search(r"    re-read: tokens \d+-\d+: ", out)  # which memory spans the answer re-read
    assert out.count("  tokens ") >= 1  # retrieved spans
