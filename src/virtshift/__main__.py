"""``python -m virtshift`` runs the command line."""

from virtshift.cli.main import main

if __name__ == "__main__":
    raise SystemExit(main())
