"""The front end's parts: configuration, the ZeroMQ broker, worker supervision, and the
request/response shapes of the OpenAI-compatible API. ``server.py`` wires them together."""
