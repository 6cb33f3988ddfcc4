"""`Burst`: the one object the gateway holds for cloud overflow.

    burst = Burst(config.burst)            # reads credentials: ConfigError if one is bad
    await burst.start()                    # its aiohttp session
    why_not = burst.refusal(key_name, key_policy.data_class)   # None: may leave the site
    if why_not is None and burst.serves(model):
        answer = await burst.complete(checked, key_name, prompt_tokens)   # or .stream(...)
    await burst.close()

`complete` returns an `Answer` (the OpenAI body, usage, cost, the route it took);
`stream` a `StreamAnswer` whose `events` are the SSE bytes to send. Both try the
providers that map the model in turn: breaker closed (or the half-open probe free),
fastest first, within the spend caps; a provider that fails in a way another might not
(5xx, 429, timeout, or a parameter it cannot honour) passes the request to the next.
When none can take it, the error of the last one tried is raised (`ProviderError` or
`Unhonourable`, both `GatewayError`s in the OpenAI envelope), or `NoRoute` (503) when
no provider could be tried at all (caps, breakers). A stream that fails after its
first token raises `ProviderError` from `events`: nothing is retried once a token went
to the client.
"""

from __future__ import annotations

import time
from collections.abc import AsyncIterator, Callable, Iterator
from dataclasses import dataclass
from typing import Any

import aiohttp

from appliance.burst.anthropic_api import AnthropicProvider
from appliance.burst.base import Answer, Preamble, Route, StreamAnswer, Usage
from appliance.burst.client import Provider
from appliance.burst.errors import ProviderError, Unhonourable
from appliance.burst.health import Breaker, Clock, Latency, order
from appliance.burst.openai_api import (
    AzureOpenAIProvider,
    OpenAICompatibleProvider,
    OpenAIProvider,
)
from appliance.burst.settings import BurstConfig, ProviderConfig
from appliance.burst.spend import Hold, HoldStore, SpendBook
from appliance.gateway.errors import GatewayError
from appliance.gateway.validate import Checked


class _Outcome:
    """How one streamed request went, told to its provider's breaker and to the spend
    exactly once, however the stream ends (completed, failed, or abandoned)."""

    def __init__(self, burst: Burst, provider: str, hold: Hold, answer: StreamAnswer) -> None:
        self.breaker = burst.breakers[provider]
        self.spend = burst.spend
        self.hold = hold
        self.answer = answer
        self.ended = False

    def _end(self, how: Callable[[], None]) -> None:
        if not self.ended:
            self.ended = True
            how()
            self.spend.settle(self.hold, self.answer.route.cost(self.answer.usage))

    def completed(self) -> None:
        self._end(self.breaker.success)

    def failed(self) -> None:
        self._end(self.breaker.failure)

    def unknown(self) -> None:
        """Cancelled, or an error about the request: it says nothing about the provider."""
        self._end(self.breaker.release)


async def _rest(
    first: bytes, events: AsyncIterator[bytes], outcome: _Outcome
) -> AsyncIterator[bytes]:
    try:
        yield first
        async for event in events:
            yield event
        outcome.completed()
    except ProviderError as err:
        if err.counts:
            outcome.failed()
        raise
    finally:
        outcome.unknown()
        await events.aclose()  # type: ignore[attr-defined]


def _bedrock(name: str, config: ProviderConfig) -> Provider:
    # botocore is an extra: imported only when a bedrock provider is configured.
    from appliance.burst.bedrock_api import BedrockProvider

    return BedrockProvider(name, config)


PROVIDERS: dict[str, Callable[[str, ProviderConfig], Provider]] = {
    "openai": OpenAIProvider,
    "openai_compatible": OpenAICompatibleProvider,
    "azure_openai": AzureOpenAIProvider,
    "anthropic": AnthropicProvider,
    "bedrock": _bedrock,
}


@dataclass(frozen=True)
class Refusal:
    """Why a key's requests may not leave the site: a code (for headers, metrics and the
    audit log) and the sentence."""

    code: str
    message: str

    def __str__(self) -> str:
        return self.message


class NoRoute(GatewayError):
    """No provider could be tried; `reason`: spend_cap, breakers_open or no_provider."""

    def __init__(self, model: str, why: str, reason: str = "no_provider") -> None:
        super().__init__(
            503,
            f"No cloud provider can take this request for {model!r}: {why}.",
            type="server_error",
            code="burst_unavailable",
        )
        self.why = why
        self.reason = reason


class Burst:
    def __init__(
        self,
        config: BurstConfig,
        clock: Clock = time.monotonic,
        wall: Clock = time.time,
        holds: HoldStore | None = None,
    ) -> None:
        self.config = config
        self.clock = clock
        self.providers: dict[str, Provider] = {
            name: PROVIDERS[p.type](name, p) for name, p in config.providers.items()
        }
        self.breakers = {name: Breaker(config.breaker, clock) for name in self.providers}
        self.latency = {name: Latency(config.latency_alpha) for name in self.providers}
        self.spend = SpendBook(config.policy, wall, holds=holds)
        self._session: aiohttp.ClientSession | None = None

    async def start(self) -> None:
        self._session = aiohttp.ClientSession(
            connector=aiohttp.TCPConnector(limit=0, ttl_dns_cache=300),
            auto_decompress=True,
            skip_auto_headers=("User-Agent",),
        )
        for provider in self.providers.values():
            provider.bind(self._session)

    async def close(self) -> None:
        if self._session is not None:
            await self._session.close()
            self._session = None

    # Policy the provider layer can answer alone (triggers and share: the gateway's).

    def refusal(self, key: str | None, data_class: str) -> Refusal | None:
        """Why this key's requests may not leave the site, or None. The data class is
        checked against what the policy lets leave (`restricted` can never be listed)."""
        policy = self.config.policy
        if not self.config.enabled:
            return Refusal("off", "cloud overflow is off")
        if key is None:
            return Refusal("anonymous", "anonymous requests never leave the site")
        if data_class == "restricted" or data_class not in policy.data_classes:
            return Refusal(
                "data_class", f"the key's data class {data_class!r} may not leave the site"
            )
        if "*" not in policy.opt_in_keys and key not in policy.opt_in_keys:
            return Refusal("not_opted_in", "the key has not opted in to cloud overflow")
        return None

    def serves(self, model: str) -> bool:
        return any(p.route(model) for p in self.providers.values())

    def reads_images(self, model: str) -> bool:
        """Some provider maps the model to one that reads image parts."""
        return any(
            model in p.config.models and p.config.models[model].images
            for p in self.providers.values()
        )

    def candidates(self, model: str) -> list[Provider]:
        """Providers mapping the model whose breaker lets a request through, best first."""
        names = [n for n, p in self.providers.items() if p.route(model) is not None]
        return [self.providers[n] for n in order(names, self.latency) if self.breakers[n].allows()]

    def refresh_spend(self, total: float, per_key: dict[str, float]) -> None:
        """The ledger's sums since `spend.month` (State.cloud_spend), every few seconds."""
        self.spend.refresh(total, per_key)

    # Sending.

    def _worst_case(self, route: Route, provider: Provider, checked: Checked, prompt: int) -> float:
        completion = checked.max_tokens or provider.config.default_max_tokens
        return route.cost(Usage(prompt, completion))

    async def complete(
        self, checked: Checked, key: str, prompt_tokens: int, sent: list[str] | None = None
    ) -> Answer:
        """The whole answer; `sent` gets the name of every provider the request went to."""
        last: GatewayError | None = None
        skipped: list[tuple[str, str]] = []
        for provider, route, hold in self._attempts(checked, key, prompt_tokens, skipped, sent):
            try:
                answer = await provider.complete(checked, route)
            except (ProviderError, Unhonourable) as err:
                self._failed(provider, hold, err)
                if isinstance(err, ProviderError) and not err.retryable:
                    raise
                last = err
                continue
            except BaseException:  # cancelled by the client
                self.breakers[provider.name].release()
                self.spend.settle(hold, 0.0)
                raise
            self.spend.settle(hold, answer.cost)
            self.breakers[provider.name].success()
            self.latency[provider.name].observe(answer.latency_s)
            return answer
        raise last or self._no_route(checked.model, skipped)

    async def stream(
        self, checked: Checked, key: str, prompt_tokens: int, sent: list[str] | None = None
    ) -> StreamAnswer:
        last: GatewayError | None = None
        skipped: list[tuple[str, str]] = []
        for provider, route, hold in self._attempts(checked, key, prompt_tokens, skipped, sent):
            answer: StreamAnswer | None = None
            try:
                answer = await provider.stream(checked, route)
                # The first token is awaited here: a stream that fails before it (an
                # error event after the role chunk) can still go to the next provider.
                first = b""
                while True:
                    event = await anext(answer.events)
                    first += event
                    if not isinstance(event, Preamble):
                        break
            except (ProviderError, Unhonourable) as err:
                if answer is not None:
                    await answer.aclose()
                self._failed(provider, hold, err)
                if isinstance(err, ProviderError) and not err.retryable:
                    raise
                last = err
                continue
            except BaseException:
                if answer is not None:
                    await answer.aclose()
                self.breakers[provider.name].release()
                self.spend.settle(hold, 0.0)
                raise
            if answer.first_byte_s is not None:
                self.latency[provider.name].observe(answer.first_byte_s)
            outcome = _Outcome(self, provider.name, hold, answer)
            answer.inner.append(answer.events)
            answer.closers.append(outcome.unknown)
            answer.events = _rest(first, answer.events, outcome)
            return answer
        raise last or self._no_route(checked.model, skipped)

    def _attempts(
        self,
        checked: Checked,
        key: str,
        prompt_tokens: int,
        skipped: list[tuple[str, str]],
        sent: list[str] | None,
    ) -> Iterator[tuple[Provider, Route, Hold]]:
        """Each provider to try, with the spend held for it; why others were skipped; the
        providers tried, in `sent` (the audit log names every one the request reached)."""
        for provider in self.candidates(checked.model):
            route = provider.route(checked.model)
            assert route is not None
            held = self.spend.hold(key, self._worst_case(route, provider, checked, prompt_tokens))
            if isinstance(held, str):
                skipped.append(("spend_cap", held))
                continue
            if not self.breakers[provider.name].acquire():
                self.spend.settle(held, 0.0)  # another request took the half-open probe
                why = f"{provider.name}'s circuit breaker is half-open, probing"
                skipped.append(("breakers_open", why))
                continue
            if sent is not None:
                sent.append(provider.name)
            yield provider, route, held

    def _failed(self, provider: Provider, hold: Hold, err: GatewayError) -> None:
        self.spend.settle(hold, 0.0)
        breaker = self.breakers[provider.name]
        if isinstance(err, ProviderError) and err.counts:
            breaker.failure()
        else:
            # A 4xx about the request, or a parameter it cannot honour: the provider is fine.
            breaker.release()

    def _no_route(self, model: str, skipped: list[tuple[str, str]]) -> NoRoute:
        if skipped:
            return NoRoute(model, skipped[0][1], skipped[0][0])
        if any(p.route(model) for p in self.providers.values()):
            return NoRoute(model, "every provider's circuit breaker is open", "breakers_open")
        return NoRoute(model, "no provider maps this model")

    def status(self) -> dict[str, dict[str, Any]]:
        """Per provider: breaker state and recent latency (for metrics and `status`)."""
        return {
            name: {
                "breaker": self.breakers[name].state,
                "latency_s": self.latency[name].value,
            }
            for name in self.providers
        }
