"""`python -m sparsify ...` (and `torchrun ... -m sparsify prune ...`): the same command line as `sparsify`."""
from sparsify.cli import main

if __name__ == "__main__":
    main()
