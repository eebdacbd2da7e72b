"""The HTTP API: OpenAI wire types, thin routes, error mapping."""
