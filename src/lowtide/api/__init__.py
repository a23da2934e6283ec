"""HTTP API in the OpenAI wire format."""
