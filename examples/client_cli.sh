#!/usr/bin/env bash
# The same from the shell (`longmem` client commands; LONGMEM_TARGET, default localhost:9000, names
# the service). Usage: examples/client_cli.sh book.txt
set -euo pipefail
book=$1

longmem memory create --id book-cli --shards 2   # --capacity TOKENS, else the server's default
longmem append book-cli --file "$book"         # a progress bar on a terminal
longmem score --memory book-cli --text "The most important thing is to make something people want."
longmem generate --memory book-cli --prompt "Once upon" --max-new-tokens 40
longmem retrieve book-cli --text "Who had the key?"
longmem memory delete book-cli
# a terminal chat (type lines; /retrieve TEXT, /reset, /forget, /quit); here two lines from a pipe
printf 'My locker code is 4417.\nWhat is my locker code?\n' | longmem chat chat-cli --max-new-tokens 24
longmem memory delete chat-cli
