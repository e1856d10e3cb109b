"""The SDK surface users write services with. Knows nothing of LLMs or of NATS."""
