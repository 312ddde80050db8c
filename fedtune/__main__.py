"""`python -m fedtune` is the `fedtune` command."""

from fedtune.cli.main import main

main()
