"""`python -m mexport` runs the CLI (the same as the `mexport` script)."""

from mexport.cli import main

main()
