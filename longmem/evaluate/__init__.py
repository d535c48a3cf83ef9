"""The paper's evaluations of LongMem, on held-out real text, at sizes set by `config.eval`.

`evaluate(model, config, out_dir)` (run.py) runs any of five parts, one module each, and writes `report.md`, `results.json` and
PNG plots into `out_dir`:

- "ppl": long-document perplexity, overall and by token position, for the backbone with the W-token
  window, the backbone with its full window, the SideNet without memory and LongMem with a memory of
  the document's own earlier segments;
- "chapter": ChapterBreak-style suffix identification: a long prefix ending at a reST section break
  goes into memory, and the model picks the true next section opening among openings of other
  sections of the same document;
- "icl": many-shot in-context learning on word sentiment, with thousands of demonstrations in memory
  and a few in the local context;
- "passkey": a 5-digit key stated at the start of N tokens of real filler, asked for at the end;
- "recall": eight word -> number facts at once, and facts stated and asked in phrasings no training
  example used (longmem/curriculum.py), with the filler of "passkey".

Perplexity, passkey and recall read corpora the training never saw (`config.eval.unseen_corpora`);
ChapterBreak reads held-out documents of `config.eval.corpus` (it needs their reST sections). Every
question is also asked without memory (the control). `results.json` starts with a `headline` object
of the figures that matter. `config` supplies the `eval` sizes and the held-out split
(`train.heldout_fraction`); everything about how the model reads (segment W, memory sizes) is the
model's own configuration. Cost is bounded by the `config.eval` sizes alone.

The parts ask a model three kinds of question: choice log-likelihood (LongMem.score_continuations:
chapter, icl), rolling perplexity (LongMem.score_batch: ppl) and generate-and-match (harness.RecallTrials:
passkey, recall).
"""
