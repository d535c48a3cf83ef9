"""LongMem as an lm-evaluation-harness model (longmem/lm_eval_model.py) on the tiny llama: each request
type against LongMem's own calls, and a whole lm-eval run of a local task, offline."""

from __future__ import annotations

import ast
import json

import numpy as np
import pytest
from lm_eval.api.instance import Instance

from conftest import TEXT
from longmem.lm_eval_model import LongMemLM
from longmem.memory import MemoryNotFound

TASK = """task: longmem_mini_choice
dataset_path: json
dataset_kwargs:
  data_files:
    test: {data}
test_split: test
output_type: multiple_choice
doc_to_text: "{{{{question}}}}"
doc_to_choice: "{{{{choices}}}}"
doc_to_target: label
metric_list:
  - metric: acc
    aggregation: mean
    higher_is_better: true
"""


def request(kind: str, *args) -> Instance:
    return Instance(request_type=kind, doc={}, arguments=args, idx=0)


@pytest.fixture
def lm(llama_bb, fresh_memory):
    memory_id = fresh_memory(llama_bb)
    llama_bb.append(memory_id, TEXT * 4)
    return LongMemLM(llama_bb, memory_id=memory_id)


def test_loglikelihood_is_longmems_score_of_the_continuation(lm):
    model = lm.model
    (logprob, greedy), = lm.loglikelihood([request("loglikelihood", TEXT * 2 + "The quick", " brown fox")])
    ctx, cont = model.tokenize(TEXT * 2 + "The quick"), model.tokenize(TEXT * 2 + "The quick brown fox")
    cont = cont[len(ctx):]
    want, _ = model.score_continuations([ctx], [cont], lm.memory_id)
    assert logprob == pytest.approx(float(want[0, 0]), abs=1e-4)
    assert greedy == (list(model.generate(token_ids=ctx, memory_id=lm.memory_id, max_new_tokens=len(cont))) == cont)


def test_loglikelihood_rolling_scores_every_token(lm):
    model = lm.model
    text = TEXT * 3
    (total,) = lm.loglikelihood_rolling([request("loglikelihood_rolling", text)])
    r = model.score(token_ids=[lm.prefix_token] + model.tokenize(text), memory_id=lm.memory_id)
    assert len(r.logprobs) == len(model.tokenize(text))
    assert total == pytest.approx(float(np.sum(r.logprobs)), abs=1e-3)


def test_generate_until_stops_at_the_first_stop_string(lm):
    model = lm.model
    ids = list(model.generate(token_ids=model.tokenize(TEXT), memory_id=lm.memory_id, max_new_tokens=8))
    full = model.decode(ids)
    (free,) = lm.generate_until([request("generate_until", TEXT, {"until": [], "max_gen_toks": 8})])
    assert free == full
    stop = full[len(full) // 2:len(full) // 2 + 2]
    (cut,) = lm.generate_until([request("generate_until", TEXT, {"until": [stop], "max_gen_toks": 8})])
    assert stop not in cut and full.startswith(cut)


def test_a_memory_that_does_not_exist_is_refused(llama_bb):
    with pytest.raises(MemoryNotFound):
        LongMemLM(llama_bb, memory_id="no-such-memory")


def test_the_readme_example_runs_a_local_task_offline(llama_bb, tmp_path, capsys):
    """examples/lm_eval_task.py: notes into a memory, then a multiple-choice task from a local JSONL."""
    import importlib.util

    from test_examples import EXAMPLES, main_body

    data = tmp_path / "data.jsonl"
    rows = [{"question": TEXT + "The quick brown", "choices": [" fox", " dog"], "label": 0},
            {"question": TEXT + "Memory lets a model read far", "choices": [" back.", " ahead."], "label": 0}]
    data.write_text("\n".join(json.dumps(r) for r in rows) + "\n")
    (tmp_path / "task.yaml").write_text(TASK.format(data=data))
    notes = tmp_path / "notes.txt"
    notes.write_text(TEXT * 4)
    spec = importlib.util.spec_from_file_location("lm_eval_task", EXAMPLES / "lm_eval_task.py")
    example = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(example)
    try:
        example.main(llama_bb, str(notes), str(tmp_path), "longmem_mini_choice")
    finally:
        llama_bb.delete_memory("notes")
    result = ast.literal_eval(capsys.readouterr().out.strip().splitlines()[-1])
    assert result["sample_len"] == 2 and 0.0 <= result["acc,none"] <= 1.0
    assert main_body(EXAMPLES / "lm_eval_task.py") in (EXAMPLES.parent / "README.md").read_text()

