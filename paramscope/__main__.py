import os
import sys

try:
    from paramscope.cli import main
except KeyboardInterrupt:  # Ctrl-C before the command line could heed it: the same one line
    sys.stderr.write("paramscope: error: interrupted\n")
    sys.stderr.flush()
    os._exit(130)

main()
