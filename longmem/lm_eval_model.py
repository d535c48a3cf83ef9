"""LongMem as an lm-evaluation-harness model: any lm-eval task, read with memory (optional extra:
`pip install 'longmem[lm-eval]'`).

    import lm_eval
    from longmem.lm_eval_model import LongMemLM

    lm = LongMem(config)
    lm.create_memory("book")
    lm.append("book", open("book.txt").read())
    results = lm_eval.simple_evaluate(model=LongMemLM(lm, memory_id="book"), tasks=["my_task"])

Every request reads the memory `memory_id` (when given) besides its own text; a request longer than
one segment also reads its own earlier segments, as LongMem.score does (a scratch memory). No
request changes a memory. Where read.reread says so, `loglikelihood` re-reads as ScoreChoices does
("choices") and `generate_until` as Generate does ("generate"). The three request types:
- `loglikelihood`: (context, continuation) -> (sum of log p of the continuation's tokens, whether greedy
  decoding from the context, re-reading what the score re-read, gives exactly those tokens); the context's trailing spaces go to the
  continuation and the continuation's tokens are those of the whole text after the context's, as in
  lm-eval's Hugging Face model;
- `loglikelihood_rolling`: a text's log-likelihood with every token scored (the first after the
  tokenizer's BOS, or EOS when it has none);
- `generate_until`: text generated from the context up to the first stop string (`until`) or
  `max_gen_toks` tokens (else read.max_new_tokens), greedy unless the request asks for a temperature.
"""

from __future__ import annotations

from lm_eval.api.instance import Instance
from lm_eval.api.model import LM

from .model import LongMem


class LongMemLM(LM):
    """The lm-eval model interface over a LongMem (in process)."""

    def __init__(self, model: LongMem, memory_id: str | None = None, use_memory: bool = True):
        super().__init__()
        if memory_id is not None:
            model.memory_stats(memory_id)  # MemoryNotFound now rather than at the first request
        self.model, self.memory_id, self.use_memory = model, memory_id, use_memory
        tokenizer = model.tokenizer
        self.prefix_token = tokenizer.bos_token_id if tokenizer.bos_token_id is not None else tokenizer.eos_token_id

    def _pair(self, context: str, continuation: str) -> tuple[list[int], list[int]]:
        spaces = len(context) - len(context.rstrip())
        if spaces:
            context, continuation = context[:-spaces], context[-spaces:] + continuation
        whole = self.model.tokenize(context + continuation)
        ctx = self.model.tokenize(context)
        return (ctx or [self.prefix_token]), whole[len(ctx):]

    def _score(self, docs: list[list[int]], prefixes: list[list[int]] | None = None) -> list:
        return self.model.score_batch(docs, [self.memory_id] * len(docs), use_memory=self.use_memory,
                                      append=False, backbone_logprobs=False, prefixes=prefixes)

    def _generate(self, ids: list[int], max_new_tokens: int, temperature: float = 0.0, reread=None):
        return self.model.generate(token_ids=ids, memory_id=self.memory_id, max_new_tokens=max_new_tokens,
                                   temperature=temperature, use_memory=self.use_memory, reread=reread)

    def loglikelihood(self, requests: list[Instance]) -> list[tuple[float, bool]]:
        pairs = [self._pair(*r.args) for r in requests]
        spans = [self.model.answer_spans("choices", self.memory_id, ctx, self.use_memory) for ctx, _ in pairs]
        results = self._score([ctx + cont for ctx, cont in pairs], [self.model.reread_prefix(s) for s in spans])
        out = []
        for (ctx, cont), r, reread in zip(pairs, results, spans):
            greedy = list(self._generate(ctx, len(cont), reread=reread)) == cont
            out.append((float(r.logprobs[-len(cont):].sum()), greedy))
        return out

    def loglikelihood_rolling(self, requests: list[Instance]) -> list[float]:
        results = self._score([[self.prefix_token] + self.model.tokenize(r.args[0]) for r in requests])
        return [float(r.logprobs.sum()) for r in results]

    def generate_until(self, requests: list[Instance]) -> list[str]:
        out = []
        for r in requests:
            context, kwargs = r.args
            until = kwargs.get("until") or []
            stops = [until] if isinstance(until, str) else list(until)
            temperature = float(kwargs.get("temperature", 0.0)) if kwargs.get("do_sample") else 0.0
            text, tokens = "", []
            max_new = int(kwargs.get("max_gen_toks", self.model.config.read.max_new_tokens))
            for token in self._generate(self.model.tokenize(context), max_new,
                                        temperature):
                tokens.append(token)
                text = self.model.decode(tokens)
                if any(s in text for s in stops):
                    break
            cut = min((text.index(s) for s in stops if s in text), default=len(text))
            out.append(text[:cut])
        return out
