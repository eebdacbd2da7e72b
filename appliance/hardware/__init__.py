"""Hardware detection and the plan it leads to.

One probe module per platform (``cpu``, ``nvidia``, ``rocm``, ``metal``) returns plain facts and
never raises; ``detect`` runs the probes that touch drivers in short-lived subprocesses with a
timeout; ``planner`` turns facts, engine capabilities, model sizes and the user's overrides into
a plan per model, each decision with its reason; ``report`` tells it to people and programs.
"""
