"""The desktop app: a PySide6 window over the appliance's HTTP API, for the person who double-clicks.

The GUI is an HTTP client of the server and nothing more (an import-linter contract keeps engines,
llama_cpp and onnxruntime out of it). ``client.py`` is the only module that touches the network,
and only from worker threads (``tasks.py``); viewmodels hold state and call it; views lay out
widgets bound to the viewmodel they are given.
"""
