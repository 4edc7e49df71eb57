"""Golden input/expected pairs for the conversions (issue 4). See README.md here."""
