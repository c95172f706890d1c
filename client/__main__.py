"""`python -m moord.client` runs moorctl."""

from moord.client.cli import main

main()
