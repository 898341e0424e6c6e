"""What train.py and generate.py do when their user gave something they cannot use.

Why one place: a bad setting, a missing checkpoint or a path that cannot be read is
refused deep inside the code with an exception whose message already names what is
wrong and how to fix it. Under a traceback that message is the last line of a screen
of frames and reads like a bug in this code. So each CLI runs its main function
through `run_main`: a user's mistake prints `error: <message>` on stderr and exits with
status 2 (what argparse exits with for a bad command line); any other exception is a
bug and keeps its traceback.
"""

from __future__ import annotations

import sys
from typing import Callable

# ValueError covers moe.config.ConfigError, moe.io.files.CheckpointError (both subclass
# it) and the refusals of bad settings by the engine, the sampler and the benchmark;
# the others are paths named on the command line that cannot be read or written.
USER_ERRORS = (ValueError, FileNotFoundError, FileExistsError, IsADirectoryError, NotADirectoryError,
               PermissionError)


def run_main(main: Callable[[list[str]], object], argv: list[str]) -> None:
    """Call main(argv); on a user's mistake print `error: <message>` to stderr and exit 2."""
    try:
        main(argv)
    except USER_ERRORS as error:
        print(f"error: {error}", file=sys.stderr)
        sys.exit(2)
