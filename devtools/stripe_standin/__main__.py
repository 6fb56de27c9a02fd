"""`python -m devtools.stripe_standin ...`: see `main` (--help)."""

from devtools.stripe_standin.launch import main

main()
