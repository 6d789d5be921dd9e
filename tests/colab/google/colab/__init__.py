"""Stand-in for Colab's ``google.colab`` package (tests only, never shipped)."""
