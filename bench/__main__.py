"""``python -m bench [options]``: the comparison; ``python -m bench capacity [options]``: the
capacity scenario (CPU per request of each process, bench/capacity.py)."""

import sys

if __name__ == "__main__":
    if sys.argv[1:2] == ["capacity"]:
        from bench.capacity import main as capacity

        capacity(sys.argv[2:])
        raise SystemExit(0)
    from bench.run import main

    raise SystemExit(main())
