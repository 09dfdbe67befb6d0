"""Exit statuses of ``visual-search``: the same meaning for every subcommand, for scripts.

====  ===========  ===============================================================================
code  name         meaning
====  ===========  ===============================================================================
0     OK           done (a job with per-file error rows, a partial search answer: see their help)
1     FAILED       the work failed: a job error, a shard build failed, the app answered 5xx
2     USAGE        bad arguments or settings (``--help`` shows them), a missing input or store
3     UNREACHABLE  the app or the Ray cluster cannot be reached, or the app never became ready
4     REFUSED      the app refused the request (4xx: ``unknown_id``, ``not_an_image``, ...)
130   INTERRUPTED  stopped by Ctrl-C (SIGINT); ``serve`` stopped by SIGINT/SIGTERM exits 0
====  ===========  ===============================================================================
"""

OK = 0
FAILED = 1
USAGE = 2
UNREACHABLE = 3
REFUSED = 4
INTERRUPTED = 130


def table() -> str:
    """The table above as plain text (for ``visual-search --help``)."""
    rows = __doc__.split("\n", 2)[2].strip().splitlines()
    return "\n".join("  " + r.replace("``", "") for r in rows if not r.startswith("====="))
