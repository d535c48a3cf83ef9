"""The benchmark parts that need Ray: `service` (the gRPC API against the in-process core) and `search`
(a memory striped over shard actors). `longmem bench` (longmem/bench/run.py) runs them with the rest."""
