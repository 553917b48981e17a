"""Keel host tools. The CLI (keel.cli) is thin; these modules are the API."""
