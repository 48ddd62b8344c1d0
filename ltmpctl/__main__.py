"""`python -m ltmpctl`: the same CLI as the `ltmpctl` script."""
from .cli import main

if __name__ == "__main__":
    main()
