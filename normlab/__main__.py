"""``python -m normlab``: the same command line as the ``normlab`` entry point."""

from normlab.cli import main

if __name__ == "__main__":
    main(prog_name="normlab")
