"""LongMem as Ray services: thin adapters over the Ray-free core in `longmem`.

encoder.py  Serve deployment running the frozen backbone (Encoder role)
reader.py   Serve deployment running the SideNet (Reader role)
bank.py     Ray actor placing memories over shards, striping chunks, merging exact top-k (Bank role)
shard.py    Ray actor holding chunk stores for its slice of many memories
gateway.py  Serve gRPC ingress implementing longmem.v1.LongMem
app.py      builds the application and starts the bank and shards
"""
