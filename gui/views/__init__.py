"""Views: widgets laid out for one screen, bound to the viewmodel passed to their constructor."""
