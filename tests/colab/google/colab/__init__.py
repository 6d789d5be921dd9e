"""Stand-in for Colab's ``google.colab`` package (tests only, never shipped)."""

events: list[str] = []  # calls whose order a test checks: Drive's flush, the unassign
