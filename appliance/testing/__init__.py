"""Stand-ins for what cannot run on a machine without GPUs, kept apart from the real parts.

`fake_engine` speaks vLLM's wire format (OpenAI API, `vllm:*` metrics): tests, benchmarks
and GPU-less demos of GPU plans use it where a real engine cannot start. `engines` is the
other way round: the real engine, started outside Ray as a replica starts it. `fake_clouds`
speaks the cloud providers' wire formats (Anthropic Messages, Bedrock Converse, OpenAI,
Azure OpenAI) on loopback: the burst tests and benchmarks/burst.py send overflow there.
"""
