"""The fake providers against the providers' own SDKs: if the SDK parses a fake's answers,
streams and errors, the fake speaks the real wire format (and the translators' tests
against the fakes mean something)."""

from __future__ import annotations

import binascii
from collections.abc import Iterator
from typing import Any

import anthropic
import boto3
import openai
import pytest
from botocore.config import Config as BotoConfig
from botocore.eventstream import ChecksumMismatch, EventStreamBuffer
from botocore.exceptions import ClientError, EventStreamError

from appliance.testing.fake_clouds import (
    ANTHROPIC_KEY,
    AWS_KEY_ID,
    AWS_SECRET,
    AZURE_KEY,
    OPENAI_KEY,
    FakeCloud,
    Fault,
    event_frame,
)

WEATHER = {
    "name": "weather",
    "description": "The weather in a city.",
    "input_schema": {"type": "object", "properties": {"city": {"type": "string"}}},
}


@pytest.fixture(scope="module")
def cloud() -> Iterator[FakeCloud]:
    with FakeCloud() as fake:
        yield fake


@pytest.fixture(autouse=True)
def _fresh(cloud: FakeCloud) -> None:
    cloud.faults.clear()
    cloud.requests.clear()


# Anthropic.


def _claude(cloud: FakeCloud, key: str = ANTHROPIC_KEY) -> anthropic.Anthropic:
    return anthropic.Anthropic(api_key=key, base_url=cloud.url, max_retries=0)


def test_anthropic_sdk_parses_the_fakes_message_and_tool_use(cloud: FakeCloud) -> None:
    client = _claude(cloud)
    message = client.messages.create(
        model="claude-x", max_tokens=50, messages=[{"role": "user", "content": "hi there"}]
    )
    assert message.content[0].type == "text"
    assert message.content[0].text == "Hello from the cloud."
    assert message.stop_reason == "end_turn"
    assert message.usage.input_tokens == 2
    tool = client.messages.create(
        model="claude-x",
        max_tokens=50,
        tools=[WEATHER],  # type: ignore[list-item]
        messages=[{"role": "user", "content": "weather?"}],
    )
    assert tool.stop_reason == "tool_use"
    block = tool.content[0]
    assert block.type == "tool_use"
    assert block.input == {"city": "Paris"}


def test_anthropic_sdk_parses_the_fakes_streams(cloud: FakeCloud) -> None:
    client = _claude(cloud)
    with client.messages.stream(
        model="claude-x", max_tokens=50, messages=[{"role": "user", "content": "hi"}]
    ) as stream:
        text = "".join(stream.text_stream)
        final = stream.get_final_message()
    assert text == "Hello from the cloud."
    assert final.usage.output_tokens == 4
    with client.messages.stream(
        model="claude-x",
        max_tokens=50,
        tools=[WEATHER],  # type: ignore[list-item]
        messages=[{"role": "user", "content": "weather?"}],
    ) as stream:
        kinds = [event.type for event in stream]
        final = stream.get_final_message()
    assert kinds[0] == "message_start"
    assert "input_json" in kinds
    assert final.content[0].type == "tool_use"
    assert final.content[0].input == {"city": "Paris"}
    assert final.stop_reason == "tool_use"


def test_anthropic_sdk_reads_the_fakes_errors(cloud: FakeCloud) -> None:
    with pytest.raises(anthropic.AuthenticationError):
        _claude(cloud, key="wrong").messages.create(
            model="m", max_tokens=5, messages=[{"role": "user", "content": "x"}]
        )
    cloud.faults.append(Fault(429, retry_after=3))
    with pytest.raises(anthropic.RateLimitError) as caught:
        _claude(cloud).messages.create(
            model="m", max_tokens=5, messages=[{"role": "user", "content": "x"}]
        )
    assert caught.value.response.headers["retry-after"] == "3"
    assert caught.value.body["error"]["type"] == "rate_limit_error"  # type: ignore[index]
    cloud.faults.append(Fault(kind="stream_error"))
    with (
        pytest.raises(anthropic.APIStatusError, match="Overloaded"),
        _claude(cloud).messages.stream(
            model="m", max_tokens=5, messages=[{"role": "user", "content": "x"}]
        ) as stream,
    ):
        list(stream)


# Bedrock.


def _bedrock(cloud: FakeCloud) -> Any:
    return boto3.client(
        "bedrock-runtime",
        endpoint_url=cloud.url,
        region_name="us-east-1",
        aws_access_key_id=AWS_KEY_ID,
        aws_secret_access_key=AWS_SECRET,
        config=BotoConfig(retries={"total_max_attempts": 1}),
    )


BEDROCK_TOOLS = {
    "tools": [
        {
            "toolSpec": {
                "name": "weather",
                "inputSchema": {"json": {"type": "object", "properties": {}}},
            }
        }
    ]
}


def test_botocore_parses_the_fakes_converse(cloud: FakeCloud) -> None:
    client = _bedrock(cloud)
    answer = client.converse(
        modelId="anthropic.claude-3-haiku-20240307-v1:0",
        messages=[{"role": "user", "content": [{"text": "hi there"}]}],
        inferenceConfig={"maxTokens": 20},
    )
    assert answer["output"]["message"]["content"][0]["text"] == "Hello from the cloud."
    assert answer["stopReason"] == "end_turn"
    assert answer["usage"]["inputTokens"] == 2
    assert cloud.requests[-1].path == "/model/anthropic.claude-3-haiku-20240307-v1:0/converse"
    tool = client.converse(
        modelId="m",
        messages=[{"role": "user", "content": [{"text": "weather?"}]}],
        inferenceConfig={"maxTokens": 20},
        toolConfig=BEDROCK_TOOLS,
    )
    assert tool["output"]["message"]["content"][0]["toolUse"]["input"] == {"city": "Paris"}


def test_the_bedrock_fake_verifies_the_signature(cloud: FakeCloud) -> None:
    client = boto3.client(
        "bedrock-runtime",
        endpoint_url=cloud.url,
        region_name="eu-west-1",
        aws_access_key_id=AWS_KEY_ID,
        aws_secret_access_key="not-" + AWS_SECRET,
        config=BotoConfig(retries={"total_max_attempts": 1}),
    )
    with pytest.raises(ClientError) as caught:
        client.converse(
            modelId="m:0",
            messages=[{"role": "user", "content": [{"text": "x"}]}],
            inferenceConfig={"maxTokens": 5},
        )
    assert caught.value.response["Error"]["Code"] == "InvalidSignatureException"


def test_botocore_decodes_the_fakes_event_stream(cloud: FakeCloud) -> None:
    client = _bedrock(cloud)
    answer = client.converse_stream(
        modelId="m",
        messages=[{"role": "user", "content": [{"text": "weather?"}]}],
        inferenceConfig={"maxTokens": 20},
        toolConfig=BEDROCK_TOOLS,
    )
    events = list(answer["stream"])
    kinds = [next(iter(e)) for e in events]
    assert kinds[0] == "messageStart"
    assert kinds[-2:] == ["messageStop", "metadata"]
    start = next(e["contentBlockStart"] for e in events if "contentBlockStart" in e)
    assert start["start"]["toolUse"]["name"] == "weather"
    args = "".join(
        e["contentBlockDelta"]["delta"]["toolUse"]["input"]
        for e in events
        if "contentBlockDelta" in e
    )
    assert args == '{"city": "Paris"}'
    assert events[-1]["metadata"]["usage"]["outputTokens"] == 4


def test_botocore_reads_the_fakes_errors(cloud: FakeCloud) -> None:
    client = _bedrock(cloud)
    cloud.faults.append(Fault(429))
    with pytest.raises(ClientError) as caught:
        client.converse(
            modelId="m",
            messages=[{"role": "user", "content": [{"text": "x"}]}],
            inferenceConfig={"maxTokens": 5},
        )
    assert caught.value.response["Error"]["Code"] == "ThrottlingException"
    cloud.faults.append(Fault(kind="stream_error"))
    answer = client.converse_stream(
        modelId="m",
        messages=[{"role": "user", "content": [{"text": "x"}]}],
        inferenceConfig={"maxTokens": 5},
    )
    with pytest.raises(EventStreamError, match="throttlingException"):
        list(answer["stream"])


def test_the_event_stream_frames_carry_checksums_botocore_verifies() -> None:
    raw = bytearray(event_frame("messageStart", {"role": "assistant"}))
    buffer = EventStreamBuffer()
    buffer.add_data(bytes(raw))
    (message,) = list(buffer)
    assert message.headers[":event-type"] == "messageStart"
    raw[-5] ^= 0xFF  # one payload byte changed: the message CRC no longer matches
    broken = EventStreamBuffer()
    broken.add_data(bytes(raw))
    with pytest.raises(ChecksumMismatch):
        list(broken)
    assert binascii.crc32(b"") == 0


# OpenAI and Azure OpenAI.


def test_openai_sdk_parses_the_fakes_answers_and_streams(cloud: FakeCloud) -> None:
    client = openai.OpenAI(api_key=OPENAI_KEY, base_url=f"{cloud.url}/v1", max_retries=0)
    answer = client.chat.completions.create(
        model="gpt-x", messages=[{"role": "user", "content": "hi"}]
    )
    assert answer.choices[0].message.content == "Hello from the cloud."
    chunks = list(
        client.chat.completions.create(
            model="gpt-x",
            messages=[{"role": "user", "content": "hi"}],
            stream=True,
            stream_options={"include_usage": True},
        )
    )
    assert "".join(c.choices[0].delta.content or "" for c in chunks if c.choices) == (
        "Hello from the cloud."
    )
    assert chunks[-1].usage is not None and chunks[-1].usage.completion_tokens == 4
    cloud.faults.append(Fault(429, retry_after=2))
    with pytest.raises(openai.RateLimitError):
        client.chat.completions.create(model="gpt-x", messages=[{"role": "user", "content": "x"}])


def test_azure_sdk_parses_the_fakes_deployment_answers(cloud: FakeCloud) -> None:
    client = openai.AzureOpenAI(
        api_key=AZURE_KEY, azure_endpoint=cloud.url, api_version="2024-10-21", max_retries=0
    )
    answer = client.chat.completions.create(
        model="my-gpt-deployment", messages=[{"role": "user", "content": "hi"}]
    )
    assert answer.choices[0].message.content == "Hello from the cloud."
    seen = cloud.requests[-1]
    assert seen.path == "/openai/deployments/my-gpt-deployment/chat/completions"
    assert seen.query == {"api-version": "2024-10-21"}
    assert seen.headers["api-key"] == AZURE_KEY
    with pytest.raises(openai.NotFoundError, match="deployment for this resource") as caught:
        client.chat.completions.create(
            model="missing-deployment", messages=[{"role": "user", "content": "hi"}]
        )
    assert caught.value.code == "DeploymentNotFound"
