"""Data folder shipped inside the package as ``vitreg._weights``: the checkpoint registry."""
