"""`fedtune serve`: one frozen base, many adapters, batched decoding behind an OpenAI-compatible API.

`engine` generates: requests for different LoRA adapters share each forward pass of the base, each
row through its own adapter, with a KV cache and continuous batching. The HTTP layer sits on top.
"""
