from service.cli import main

if __name__ == "__main__":  # guard: embedded Dask workers are spawned processes that re-import __main__
    main()
