"""Cloud overflow's provider layer: OpenAI, Azure OpenAI, OpenAI-compatible servers,
Anthropic Messages and AWS Bedrock Converse, spoken in OpenAI's chat format both ways.

The gateway holds one `Burst` (router.py) and calls it with a validated chat request
(`appliance.gateway.validate.Checked`); see router.py for the calls and
docs/cloud-overflow.md for what each provider gets. Modules:

    settings.py      the [burst] section of appliance.toml
    credentials.py   API keys and AWS credentials from the environment or 0600 files
    base.py          routes, usage and cost, OpenAI's answer and chunk shapes
    client.py        the aiohttp client every provider shares; transport errors
    errors.py        provider errors in the OpenAI envelope (and what the breaker counts)
    openai_api.py    OpenAI, Azure OpenAI, OpenAI-compatible: passthrough
    anthropic_api.py Anthropic Messages: translation both ways, SSE included
    bedrock_api.py   Bedrock Converse/ConverseStream via botocore (the [bedrock] extra)
    health.py        circuit breakers, latency EWMA, the order to try providers in
    spend.py         monthly spend caps, global and per key
    router.py        Burst: the one object the gateway calls
"""

from appliance.burst.base import Answer, Route, StreamAnswer, Usage
from appliance.burst.errors import ProviderError, Unhonourable
from appliance.burst.router import Burst, NoRoute, Refusal

__all__ = [
    "Answer",
    "Burst",
    "NoRoute",
    "ProviderError",
    "Refusal",
    "Route",
    "StreamAnswer",
    "Unhonourable",
    "Usage",
]
