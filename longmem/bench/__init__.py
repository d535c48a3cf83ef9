"""`longmem bench`: one question per module, each returning plain, JSON-ready data.

- `roofline`: the in-process core's tokens/s against the FLOP bound of this machine;
- `eviction`: the ring buffer against the official code's remove_ids eviction;
- `memory_cost`: bytes per token, build time, latency and recall of storage options;
- `long_context`: LongMem against full attention, time and peak memory per token;
- `retrieval`: approximate against exact retrieval from memories of real text;
- the service parts, `service` and `search`, are services/bench/ (they need Ray).

Each part module has `run` (the measurement, its sizes from config.bench), `Result` (the typed shape
of what `run` returns: JSON-ready TypedDicts), `table` (its Markdown) and `plot` (its subplots,
`PANELS` of them); `run.py` runs any of them and writes the report; `common.py` is what they share.
"""
