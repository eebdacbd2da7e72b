"""Engines: load model files and decode batches; no HTTP, no Qt, nothing from appliance/."""
