"""What tokens cost at prices per million: one formula for local models ([governance]
prices, `appliance usage`, the gateway's spend metric) and cloud routes ([burst])."""


def token_cost(
    prompt_tokens: int, completion_tokens: int, input_per_million: float, output_per_million: float
) -> float:
    return (prompt_tokens * input_per_million + completion_tokens * output_per_million) / 1e6
