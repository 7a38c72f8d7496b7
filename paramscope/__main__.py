import os
import sys

try:
    from paramscope.cli import main
except KeyboardInterrupt:  # Ctrl-C while the command line loads: the same one line as later
    print("paramscope: error: interrupted", file=sys.stderr)
    sys.stderr.flush()
    os._exit(130)

main()
