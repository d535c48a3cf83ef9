"""A gRPC client of a running LongMem service (`longmem serve`): a memory striped over two shards,
a book into it, scoring and generating with it; then a conversation whose turns go to its own memory
(the README's client example).

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
        for piece in c.chat("my-chat", "My locker code is 4417.", max_new_tokens=24):  # streamed as it comes
            print(piece, end="", flush=True)
        print()
        print(c.chat("my-chat", "What is my locker code?", max_new_tokens=24).text())
        print(c.get_memory("my-chat").tokens_appended)  # both turns, each appended once
        c.delete_memory("my-chat")


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("book")
    parser.add_argument("--target", default="localhost:9000")
    args = parser.parse_args()
    main(args.book, args.target)
