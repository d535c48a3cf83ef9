"""A gRPC client of a running LongMem service (`longmem serve`): a memory striped over two shards,
a book into it, scoring and generating with it (the README's client example).

    python examples/client.py book.txt [--target localhost:9000]
"""

import argparse

from longmem.client import LongMemClient


def main(book: str, target: str = "localhost:9000") -> None:
    with LongMemClient(target) as c:
        c.wait_ready(120)
        c.create_memory(memory_id="book", num_shards=2)  # the server's default capacity (memory.capacity_tokens)
        c.append("book", text=open(book).read(), progress=True)
        print(c.score(text="The most important thing is to make something people want.", memory_id="book").perplexity)
        print(c.generate_text("Once upon", memory_id="book", max_new_tokens=40))


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("book")
    parser.add_argument("--target", default="localhost:9000")
    args = parser.parse_args()
    main(args.book, args.target)
