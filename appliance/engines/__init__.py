"""Engine adapters, looked up by name.

Each adapter turns a plan into an engine command line; runners (appliance.engines.runner)
start that command as a process or inside a container.
"""

from __future__ import annotations

from appliance.config import EngineConfig
from appliance.engines.base import EngineAdapter, EngineLaunch, EngineLoad, LaunchSpec
from appliance.engines.trtllm import TrtllmEngine
from appliance.engines.vllm import VllmEngine
from appliance.errors import EngineError

ADAPTERS: dict[str, type[EngineAdapter]] = {
    VllmEngine.name: VllmEngine,
    TrtllmEngine.name: TrtllmEngine,
}


def get_adapter(name: str, settings: EngineConfig | None = None) -> EngineAdapter:
    try:
        return ADAPTERS[name](settings)
    except KeyError:
        known = ", ".join(sorted(ADAPTERS))
        raise EngineError(f"unknown engine {name!r}", hint=f"Use one of: {known}.") from None


__all__ = ["ADAPTERS", "EngineAdapter", "EngineLaunch", "EngineLoad", "LaunchSpec", "get_adapter"]
