"""Viewmodels: the state of each screen, and the client calls that change it (off the GUI thread)."""
