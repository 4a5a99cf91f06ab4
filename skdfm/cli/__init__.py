"""The ``skdfm`` command: demo, fit, score, export and evaluate from a shell.

Exit codes: 0 done; 1 failed (a message says why; no model or score table is
written, though ``score --maps`` keeps the overlays of the batches done before);
2 bad command line; 3 done, but some images could not be read and were skipped
(each is listed on stderr); 130 interrupted (Ctrl-C), 143 terminated (SIGTERM): files
being written are removed, the ones they would replace are left as they were.

Model files are ``.skdfm`` files (:func:`skdfm.save`): data that loading parses and
checks, never code. A joblib/pickle model runs whatever code it holds when loaded,
so the command loads one only with ``--allow-pickle``, for files you trust.

The package only parses, calls the library and prints: :mod:`.options` holds what
every command shares (exit codes, argument types, option groups, checks),
:mod:`.common` the shared helpers (reading files, loading models), and one module
per command its parser, its checks and its ``run``.
"""

from .command import build_parser, main

__all__ = ["build_parser", "main"]
