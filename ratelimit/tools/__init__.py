"""Helper programs: an OpenAI-compatible upstream for tests and demos."""
