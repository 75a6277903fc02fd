"""`python -m alphadpo_ray ...`: the command line run by the interpreter named, not by a script found on
PATH — the form for `ray job submit`, whose entrypoint runs in the environment that started Ray."""

import sys

from .cli import main

sys.exit(main())
