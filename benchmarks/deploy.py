"""The deployment benchmark; its code lives in :mod:`medunet.bench.deploy` (``medunet bench --deploy``)."""

from medunet.bench.deploy import main

if __name__ == "__main__":
    main()
