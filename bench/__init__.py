"""Side-by-side benchmark of compute-api against the usual ways of serving CPU-bound work (issue 5).

Run with ``python -m bench`` (``make bench``); ``python -m bench --help`` lists the options.
"""
