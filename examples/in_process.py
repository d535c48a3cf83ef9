"""LongMem in this process: a memory, a book into it, reading, scoring, generating and retrieving
with it (the README's first example).

    python examples/in_process.py chapter1.txt chapter2.txt [--config my.yaml] [--set section.key=value ...]
"""

import argparse

from longmem.config import LongMemConfig
from longmem.model import LongMem


def main(chapter1: str, chapter2: str, config: LongMemConfig) -> None:
    lm = LongMem(config)
    lm.create_memory("book", capacity_tokens=65_536)
    lm.append("book", open(chapter1).read(), progress=True)         # frozen encoder -> memory
    r = lm.score(open(chapter2).read(), "book")                     # reads memory; memory unchanged
    print(r.perplexity, r.backbone_perplexity)                      # LongMem vs backbone, same window
    print(lm.score_choices("The butler", [" did it.", " was innocent."], "book"))
    print(lm.decode(list(lm.generate("The butler", "book", max_new_tokens=30))))
    for span in lm.retrieve("book", "Who had the key?"):            # what the SideNet would read
        print(span.start_position, span.hits, span.text)
    for span in lm.reread("book", "Who had the key?"):              # what an answer re-reads first
        print(span.start_position, span.end_position, span.text)


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("chapter1")
    parser.add_argument("chapter2")
    parser.add_argument("--config")
    parser.add_argument("--set", dest="overrides", action="append", default=[])
    args = parser.parse_args()
    main(args.chapter1, args.chapter2, LongMemConfig.load(args.config, ["read.segment_tokens=512", *args.overrides]))
