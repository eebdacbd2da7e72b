"""The request log: every exchange through the API, kept on the box in SQLite for fine-tuning.

``record`` is what the API hands over, ``writer`` commits it off the hot path, ``schema`` owns
the versioned tables, ``store`` reads and curates them, ``export`` turns them into training files.
Nothing here knows about HTTP or llama.cpp.
"""
