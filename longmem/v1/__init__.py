"""Generated stubs for the longmem.v1 API; regenerate with scripts/gen_protos.py."""
